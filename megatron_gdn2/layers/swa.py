"""Core attention for the sliding-window (SWA) layers.

The SWA layer is Megatron-Core's SelfAttention (RoPE, grouped-query heads, TP and SP as usual) with
`config.window_size = (window - 1, 0)`: each query attends to itself and the window - 1 tokens
before it. Its core attention is chosen by `swa_core_attention(config)`:

    "te"     Transformer Engine's TEDotProductAttention (flash / fused kernels, packed sequences)
    "cudnn"  CudnnSlidingWindowAttention below: cuDNN's fused attention over the window's diagonal
             band (`cudnn_attention.py`; needs the optional nvidia-cudnn-frontend package)
    "flex"   FlexSlidingWindowAttention below: torch FlexAttention with a sliding-window block mask,
             compiled on a GPU (block-sparse: the work and memory are O(T W))
    "sdpa"   BlockedSlidingWindowAttention below: torch SDPA over query blocks, never a T x T matrix
    "local"  Megatron's DotProductAttention (materialises the [T, T] scores; CPU tests)

With "flex" and "sdpa" the layer is RotaryInCoreSelfAttention: it applies the rotary embedding
itself, fused with the query/key/value split and the core attention's [s, b] -> [b, heads, s]
layout change.

`config.swa_attention_impl = None` picks "te" when the layers use Transformer Engine, else on a GPU
"cudnn" where the cuDNN frontend is installed and "flex" where not ("sdpa" for heads under 16 wide,
which the compiled FlexAttention refuses), and "local" on CPU. "cudnn", "flex" and "sdpa" run full
causal attention (a window that covers the sequence) as one SDPA call with `is_causal=True` and no
mask, which is cuDNN's or the flash kernel on a GPU.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from gdn2_kernels.rotary_split import split_rotary
from gdn2_kernels.rotary_split.naive import rotary_heads_first as naive_rotary_heads_first
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from megatron_gdn2.layers import cudnn_attention
from megatron_gdn2.layers.compiled import compiled_on_gpu

SWA_ATTENTION_IMPLS = ("te", "cudnn", "flex", "sdpa", "local")
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
        if self.rotary_pos_emb is None:
            q, k = (x.permute(1, 2, 0, 3) for x in (query, key))
        else:
            q_freqs, k_freqs = (self.rotary_pos_emb if isinstance(self.rotary_pos_emb, tuple)
                                else (self.rotary_pos_emb,) * 2)
            q, k = rotary_heads_first(query, q_freqs), rotary_heads_first(key, k_freqs)
        v = value.permute(1, 2, 0, 3)
        dropout = self.dropout if self.training else 0.0
        # Dropout draws from the tensor-parallel RNG, as in Megatron's DotProductAttention.
        with get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            if seq_len <= self.window:
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True,
                                                     scale=self.softmax_scale, enable_gqa=True)
            else:
                out = self._windowed(q, k, v, dropout)
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, heads * head_dim)

    def _windowed(self, q, k, v, dropout: float):
        """q [b, heads, s, d], k/v [b, groups, s, d] with s > window -> [b, heads, s, d]."""
        raise NotImplementedError


# one fused pass on a GPU where Megatron's unfused version (Transformer Engine holds the fused one)
# makes two concatenations and four products
rotary_heads_first = compiled_on_gpu(naive_rotary_heads_first)


class RotaryInCoreSelfAttention(SelfAttention):
    """Megatron's SelfAttention with the rotary embedding taken out of Megatron's hands: applied with
    the query/key/value split and the core attention's heads-first layout in one pass over the
    projection's output (`gdn2_kernels.rotary_split`), or, where Megatron's own split is
    needed (query/key norms, an output gate, more TP ranks than key/value heads), by the core
    attention (SlidingWindowCoreAttention) fused with its layout change."""

    _rotary_pos_emb = None  # this forward's RoPE frequencies

    def forward(self, hidden_states, *args, rotary_pos_emb=None, **kwargs):
        self._rotary_pos_emb = rotary_pos_emb
        return super().forward(hidden_states, *args, rotary_pos_emb=None, **kwargs)

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        rotary = self._rotary_pos_emb
        fused = (rotary is not None and key_value_states is None and not output_gate and split_qkv
                 and all(norm is None or isinstance(norm, IdentityOp)
                         for norm in (self.q_layernorm, self.k_layernorm))
                 and self.config.num_query_groups >= self.world_size and not self.config.test_mode)
        # the core attention applies RoPE when this split does not (and again, with the same
        # frequencies, when selective recompute reruns it in the backward)
        self.core_attention.rotary_pos_emb = None if fused else rotary
        if not fused:
            return super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                       output_gate=output_gate, split_qkv=split_qkv)
        mixed, _ = self.linear_qkv(hidden_states)
        groups = self.num_query_groups_per_partition
        q_freqs, k_freqs = rotary if isinstance(rotary, tuple) else (rotary, rotary)
        # one pass each way, so that the backward writes the projection's gradient once: after
        # Megatron's split it is a concatenation of three strided gradients (4.4 ms of a 4K x 4 step
        # of swa_gdn2_1.3B, RESULTS.md run 11)
        q, k, v = split_rotary(mixed.view(*mixed.shape[:2], groups, -1), q_freqs, k_freqs,
                               self.num_attention_heads_per_partition // groups)
        # Megatron's [s, b, heads, d] shapes over heads-first storage: the core attention's
        # permute back to [b, heads, s, d] is a view
        return tuple(x.permute(2, 0, 1, 3) for x in (q, k, v))


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
                                       enable_gqa=True)


class CudnnSlidingWindowAttention(FlexSlidingWindowAttention):
    """Sliding-window attention on cuDNN's fused kernels (`cudnn_attention.py`): the window is
    cuDNN's diagonal band, so only the band's tiles are computed. cuDNN takes 16-bit inputs only:
    fp32 runs FlexAttention."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        cudnn_attention.require()

    def _windowed(self, q, k, v, dropout):
        if q.dtype not in cudnn_attention.DTYPES:
            return super()._windowed(q, k, v, dropout)
        return cudnn_attention.cudnn_window_attention(q, k, v, self.window, self.softmax_scale)


def swa_core_attention(config) -> type:
    """The core-attention class for SWA layers under this config (see the module docstring)."""
    impl = config.swa_attention_impl
    if impl is None:
        if config.transformer_impl == "transformer_engine":
            impl = "te"
        elif torch.cuda.is_available():
            if config.kv_channels < FLEX_MIN_HEAD_DIM:
                impl = "sdpa"
            else:
                impl = "cudnn" if cudnn_attention.available() else "flex"
        else:
            impl = "local"
    if impl not in SWA_ATTENTION_IMPLS:
        raise ValueError(f"swa_attention_impl must be one of {SWA_ATTENTION_IMPLS} or None, got {impl!r}")
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return {"cudnn": CudnnSlidingWindowAttention, "flex": FlexSlidingWindowAttention,
            "sdpa": BlockedSlidingWindowAttention, "local": DotProductAttention}[impl]
