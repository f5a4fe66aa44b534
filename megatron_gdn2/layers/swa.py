"""Core attention for the sliding-window (SWA) layers.

The SWA layer is Megatron-Core's SelfAttention (RoPE, grouped-query heads, TP and SP as usual) with
`config.window_size = (window - 1, 0)`: each query attends to itself and the window - 1 tokens
before it. Its core attention is chosen by `swa_core_attention(config)`:

    "te"     Transformer Engine's TEDotProductAttention (flash / fused kernels, packed sequences)
    "flex"   FlexSlidingWindowAttention below: torch FlexAttention with a sliding-window block mask,
             compiled on a GPU (block-sparse: the work and memory are O(T W))
    "flash"  FlashSlidingWindowAttention below: FlashAttention-2's local attention through torch's
             flash op (CUDA, fp16/bf16; not yet measured against "flex", so not the default)
    "sdpa"   BlockedSlidingWindowAttention below: torch SDPA over query blocks, never a T x T matrix
    "local"  Megatron's DotProductAttention (materialises the [T, T] scores; CPU tests)

With "flex", "flash" and "sdpa" the layer is RotaryInCoreSelfAttention: it hands the rotary embedding to
the core attention, which applies it fused with its [s, b] -> [b, heads, s] layout change, and,
where the layout allows (`config.swa_fuse_qkv`), also linear_qkv's output whole, so the q/k/v split
joins that fused function and its backward writes the projection's gradient in one pass.

`config.swa_attention_impl = None` picks "te" when the layers use Transformer Engine, else "flex" on
a GPU ("sdpa" for heads under 16 wide, which the compiled FlexAttention refuses) and "local" on
CPU. "flex" and "sdpa" run full causal attention (a window that covers the
sequence) as one SDPA call with `is_causal=True` and no mask, which is the flash kernel on a GPU.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from megatron.core.parallel_state import get_tensor_model_parallel_world_size
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megatron_gdn2.layers.compiled import compiled_on_gpu

SWA_ATTENTION_IMPLS = ("te", "flex", "flash", "sdpa", "local")
# orders of [s, b, heads, d] the core attentions work in
HEADS_FIRST = (1, 2, 0, 3)  # [b, heads, s, d]: torch SDPA and FlexAttention
TOKENS_FIRST = (1, 0, 2, 3)  # [b, s, heads, d]: FlashAttention's varlen kernels
# the compiled FlexAttention kernel refuses smaller heads (tiny test models use 8)
FLEX_MIN_HEAD_DIM = 16


class SlidingWindowCoreAttention(MegatronModule):
    """Causal sliding-window attention on Megatron's [s, b, heads, d] layout; subclasses compute
    the windowed case (`_windowed`), this class the full causal one. Same constructor and call as
    Megatron's DotProductAttention (the arguments it does not need are accepted for that reason)."""

    supports_dropout = True

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config)
        name = type(self).__name__
        if config.context_parallel_size != 1:
            raise ValueError(f"{name} does not support context parallelism "
                             f"(context_parallel_size={config.context_parallel_size})")
        if config.window_size is None or config.window_size[1] != 0 or config.window_size[0] < 0:
            raise ValueError(f"{name} needs a causal window_size (left, 0), got {config.window_size}")
        self.window = config.window_size[0] + 1
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if self.dropout > 0 and not self.supports_dropout:
            raise ValueError(f"{name} has no attention dropout, got attention_dropout={self.dropout}; "
                             f"use swa_attention_impl='sdpa'")

    # RoPE frequencies [s, 1, 1, d] set by RotaryInCoreSelfAttention for each forward (None: the
    # caller applied RoPE). Kept after the call: a recomputed core attention (selective
    # recompute) runs again in the backward with the same sequence length, hence the same value.
    rotary_pos_emb = None
    # linear_qkv's output [s, b, groups * (heads per group + 2) * d], set by RotaryInCoreSelfAttention
    # during its forward only (a selective recompute in the backward takes query, key, value)
    mixed_qkv = None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, heads, d], key/value [s, b, groups, d] -> [s, b, heads * d]. The mask
        argument is ignored: the window defines the mask."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias in SWA layers need the "
                                      "Transformer Engine core attention (swa_attention_impl='te')")
        seq_len, batch, heads, head_dim = query.shape
        if key.shape[0] != seq_len:
            raise ValueError(f"sliding-window attention needs as many keys as queries, got {key.shape[0]} "
                             f"keys for {seq_len} queries")
        q_freqs, k_freqs = (self.rotary_pos_emb if isinstance(self.rotary_pos_emb, tuple)
                            else (self.rotary_pos_emb,) * 2)
        mixed, groups, order = self.mixed_qkv, key.shape[2], self.layout
        if (q_freqs is not None and mixed is not None and mixed.shape[:2] == (seq_len, batch)
                and mixed.shape[2] == groups * (heads // groups + 2) * head_dim):
            q, k, v = split_rotary(mixed.view(seq_len, batch, groups, -1), q_freqs, k_freqs,
                                   heads // groups, order)
        elif q_freqs is None:
            q, k, v = (x.permute(*order) for x in (query, key, value))
        else:
            q, k = rotary(query, q_freqs, order), rotary(key, k_freqs, order)
            v = value.permute(*order)
        dropout = self.dropout if self.training else 0.0
        # Dropout draws from the tensor-parallel RNG, as in Megatron's DotProductAttention.
        with get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            out = self._attend(q, k, v, dropout)
        back_to_sbhd = [order.index(axis) for axis in range(4)]
        return out.permute(*back_to_sbhd).reshape(seq_len, batch, heads * head_dim)

    # the order the subclass attends in, as a permutation of [s, b, heads, d]
    layout = HEADS_FIRST

    def _attend(self, q, k, v, dropout: float):
        """q [b, heads, s, d], k/v [b, groups, s, d] -> [b, heads, s, d]: one causal SDPA call (no
        mask: the flash kernel on a GPU) when the window covers the sequence, else _windowed."""
        if q.shape[2] <= self.window:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                  scale=self.softmax_scale, enable_gqa=True)
        return self._windowed(q, k, v, dropout)

    def _windowed(self, q, k, v, dropout: float):
        """q [b, heads, s, d], k/v [b, groups, s, d] with s > window -> [b, heads, s, d]."""
        raise NotImplementedError


def _rotary(x: torch.Tensor, freqs: torch.Tensor, order: tuple) -> torch.Tensor:
    """Rotary embedding (Megatron's non-interleaved form: x cos + rotate_half(x) sin, rotate_half
    (x1, x2) = (-x2, x1)) of x [s, b, heads, d] with freqs [s, 1, 1, d], returned permuted by `order`
    and contiguous in x's dtype (fp32 arithmetic). One fused pass on a GPU where Megatron's unfused
    version (Transformer Engine holds the fused one) makes two concatenations and four products."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    y = xf * freqs.cos() + torch.cat((-x2, x1), dim=-1) * freqs.sin()
    return y.permute(*order).contiguous().to(x.dtype)


rotary = compiled_on_gpu(_rotary)


@compiled_on_gpu
def split_rotary(mixed: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor, heads_per_group: int,
                 order: tuple):
    """linear_qkv's output as Megatron lays it out, [s, b, groups, (heads_per_group + 2) * d] (each
    group's query heads, then its key and its value head), -> RoPE'd q, RoPE'd k and v, permuted by
    `order`. Megatron splits it into three views whose gradients autograd then concatenates (~0.5 ms
    per layer at the 1.3B widths and 16K tokens on an H200); taken whole, the backward of this
    function writes the projection's gradient in its own fused pass."""
    x = mixed.unflatten(-1, (heads_per_group + 2, -1))
    q = x[:, :, :, :heads_per_group].flatten(2, 3)
    k, v = x[:, :, :, heads_per_group], x[:, :, :, heads_per_group + 1]
    return _rotary(q, q_freqs, order), _rotary(k, k_freqs, order), v.permute(*order).contiguous()


class RotaryInCoreSelfAttention(SelfAttention):
    """Megatron's SelfAttention with the rotary embedding handed to the core attention (ours,
    SlidingWindowCoreAttention), which applies it fused with its layout change. With
    `config.swa_fuse_qkv` the core attention also gets linear_qkv's output (kept by a forward hook
    for the duration of this layer's forward) and splits it itself, where Megatron's query, key and
    value are plain views of it: no q/k norm, no output gate, at least one key-value group per TP
    rank, no inference context."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._keep_mixed_qkv = False
        norms_absent = all(norm is None or isinstance(norm, IdentityOp)
                           for norm in (self.q_layernorm, self.k_layernorm))
        tp = get_tensor_model_parallel_world_size()
        if (config.swa_fuse_qkv and norms_absent and not getattr(config, "attention_output_gate", False)
                and config.num_query_groups >= tp):
            self.linear_qkv.register_forward_hook(self._store_mixed_qkv)

    def _store_mixed_qkv(self, module, args, output):
        if self._keep_mixed_qkv:
            self.core_attention.mixed_qkv = output[0] if isinstance(output, tuple) else output

    def forward(self, hidden_states, *args, rotary_pos_emb=None, inference_context=None, **kwargs):
        self.core_attention.rotary_pos_emb = rotary_pos_emb
        self._keep_mixed_qkv = inference_context is None
        try:
            return super().forward(hidden_states, *args, rotary_pos_emb=None,
                                   inference_context=inference_context, **kwargs)
        finally:
            self._keep_mixed_qkv = False
            self.core_attention.mixed_qkv = None


class BlockedSlidingWindowAttention(SlidingWindowCoreAttention):
    """Sliding-window attention by blocks of `window` queries: a block [s, s + W) needs keys
    [s - W + 1, s + W), so SDPA runs on that [W, 2W - 1] tile with a boolean band mask and memory is
    O(T W). The mask makes SDPA use its memory-efficient kernel on a GPU, not flash: the fallback
    when FlexAttention is not available."""

    def _windowed(self, q, k, v, dropout):
        window, seq_len = self.window, q.shape[2]
        # The memory-efficient kernel has no grouped-query support: expand the kv groups.
        k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        # The band of a full tile; the first tile (no keys before 0) and the last (cut at seq_len)
        # are slices of it.
        rows = torch.arange(window, device=q.device)
        offset = rows[:, None] + window - 1 - torch.arange(2 * window - 1, device=q.device)
        band = (offset >= 0) & (offset < window)
        blocks = []
        for start in range(0, seq_len, window):
            end = min(start + window, seq_len)
            first_key = max(0, start - window + 1)
            skip = first_key - (start - window + 1)
            blocks.append(F.scaled_dot_product_attention(
                q[:, :, start:end], k[:, :, first_key:end], v[:, :, first_key:end],
                attn_mask=band[:end - start, skip:skip + end - first_key], dropout_p=dropout,
                scale=self.softmax_scale))
        return torch.cat(blocks, dim=2)


def sliding_window_mask_mod(window: int):
    """FlexAttention mask_mod: query q sees key k when 0 <= q - k < window."""
    def mask_mod(batch, head, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


# compiled on a GPU; eager on CPU, where torch allows FlexAttention no compiled backward
windowed_flex_attention = compiled_on_gpu(flex_attention)

# Every query row sees at least its own key, so the kernel may skip its guard for fully masked rows:
# 2.429 -> 2.345 ms at 4x4096 and 2.941 -> 2.847 ms at 1x16384 per layer, forward and backward
# (bench_swa.py, H200, benchmarks/RESULTS.md)
FLEX_KERNEL_OPTIONS = {"ROWS_GUARANTEED_SAFE": True}


FLEX_BLOCK = 128  # FlexAttention's default sparse block size


@functools.lru_cache(maxsize=32)
def sliding_window_block_mask(seq_len: int, window: int, device: torch.device) -> BlockMask:
    """The block mask of a causal window over `seq_len` tokens, broadcast over batch and heads.

    Built from the window's block structure: a (query block, key block) tile is full when every
    q - k of it lies in [0, window), skipped when none does, else partial (mask_mod applied).
    create_block_mask would evaluate the mask over all T x T pairs (compiled per sequence length
    on a GPU; the 16K first step took 145 s, benchmarks/RESULTS.md). Cached, so every layer and
    step gets the same object and the compiled flex_attention never recompiles for it."""
    n = -(-seq_len // FLEX_BLOCK)
    first = torch.arange(n, device=device) * FLEX_BLOCK
    last = torch.clamp(first + FLEX_BLOCK - 1, max=seq_len - 1)
    lowest = first[:, None] - last[None, :]  # smallest q - k of the block's real pairs
    highest = last[:, None] - first[None, :]
    # the last block's rows past seq_len count as masked pairs, so a block holding them is partial
    whole = last - first == FLEX_BLOCK - 1
    full = (lowest >= 0) & (highest < window) & whole[:, None] & whole[None, :]
    partial = (highest >= 0) & (lowest < window) & ~full

    def as_indices(mask):
        # per query block: how many key blocks, and their indices first (stable: ascending)
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)
        return mask.sum(-1).to(torch.int32)[None, None], order.to(torch.int32)[None, None]

    return BlockMask.from_kv_blocks(*as_indices(partial), *as_indices(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=sliding_window_mask_mod(window),
                                    seq_lengths=(seq_len, seq_len))


class FlexSlidingWindowAttention(SlidingWindowCoreAttention):
    """Sliding-window attention with torch FlexAttention: a block-sparse kernel that visits only the
    key blocks of each query block's window (compiled with torch.compile on a GPU; eager elsewhere,
    where torch allows no backward on CPU). Grouped-query heads are native (`enable_gqa`).
    FlexAttention has no attention dropout."""

    supports_dropout = False

    def _windowed(self, q, k, v, dropout):
        block_mask = sliding_window_block_mask(q.shape[2], self.window, q.device)
        return windowed_flex_attention(q, k, v, block_mask=block_mask, scale=self.softmax_scale,
                                       enable_gqa=True, kernel_options=FLEX_KERNEL_OPTIONS)


def flash_window_available() -> bool:
    """Whether torch's FlashAttention-2 varlen op takes a window (window_size_left)."""
    op = getattr(torch.ops.aten, "_flash_attention_forward", None)
    return op is not None and "window_size_left" in str(op.default._schema)


def flash_ops():
    """torch's FlashAttention-2 varlen forward and backward ops (looked up per call)."""
    return torch.ops.aten._flash_attention_forward, torch.ops.aten._flash_attention_backward


@functools.lru_cache(maxsize=32)
def _uniform_cu_seqlens(batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * seq_len, seq_len, device=device, dtype=torch.int32)


class FlashWindowFunction(torch.autograd.Function):
    """FlashAttention-2's causal local attention over packed sequences (varlen: q [tokens, heads, d],
    k/v [tokens, groups, d], sequence offsets cu_seqlens), forward and backward through torch's
    aten flash ops. left: keys before the query each query sees (-1: all); no dropout."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_len: int, left: int, scale: float):
        out, lse, rng_state, unused, _ = flash_ops()[0](
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, True, False, scale=scale,
            window_size_left=left, window_size_right=0)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.max_len, ctx.left, ctx.scale = max_len, left, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = flash_ops()[1](
            grad.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, ctx.max_len, ctx.max_len, 0.0,
            True, rng_state, unused, scale=ctx.scale, window_size_left=ctx.left, window_size_right=0)
        return dq, dk, dv, None, None, None, None


class FlashSlidingWindowAttention(SlidingWindowCoreAttention):
    """Sliding-window attention with FlashAttention-2's local attention (torch's bundled flash
    kernels with a left window): one kernel that visits only each query block's window, the same
    kernel for a window that covers the sequence. Grouped-query heads are native. CUDA with fp16 or
    bf16 only; no attention dropout."""

    supports_dropout = False
    layout = TOKENS_FIRST

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        if not flash_window_available():
            raise ValueError("swa_attention_impl='flash' needs torch's flash attention op with a window "
                             "(aten._flash_attention_forward(..., window_size_left)); use 'flex'")

    def _attend(self, q, k, v, dropout):
        """q [b, s, heads, d], k/v [b, s, groups, d] -> [b, s, heads, d]."""
        if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"swa_attention_impl='flash' needs fp16 or bf16 activations, got {q.dtype}")
        batch, seq_len = q.shape[:2]
        left = self.window - 1 if self.window < seq_len else -1
        out = FlashWindowFunction.apply(
            q.reshape(batch * seq_len, *q.shape[2:]), k.reshape(batch * seq_len, *k.shape[2:]),
            v.reshape(batch * seq_len, *v.shape[2:]), _uniform_cu_seqlens(batch, seq_len, q.device),
            seq_len, left, self.softmax_scale)
        return out.view(q.shape)


def swa_core_attention(config) -> type:
    """The core-attention class for SWA layers under this config (see the module docstring)."""
    impl = config.swa_attention_impl
    if impl is None:
        if config.transformer_impl == "transformer_engine":
            impl = "te"
        elif torch.cuda.is_available():
            impl = "flex" if config.kv_channels >= FLEX_MIN_HEAD_DIM else "sdpa"
        else:
            impl = "local"
    if impl not in SWA_ATTENTION_IMPLS:
        raise ValueError(f"swa_attention_impl must be one of {SWA_ATTENTION_IMPLS} or None, got {impl!r}")
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return {"flex": FlexSlidingWindowAttention, "flash": FlashSlidingWindowAttention,
            "sdpa": BlockedSlidingWindowAttention, "local": DotProductAttention}[impl]
