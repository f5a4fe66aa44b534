"""Core attention for the sliding-window (SWA) layers.

The SWA layer is Megatron-Core's SelfAttention (RoPE, grouped-query heads, TP and SP as usual) with
`config.window_size = (window - 1, 0)`: each query attends to itself and the window - 1 tokens
before it. Its core attention is chosen by `swa_core_attention(config)`:

    "te"     Transformer Engine's TEDotProductAttention (flash / fused kernels, packed sequences)
    "sdpa"   BlockedSlidingWindowAttention below: torch SDPA over query blocks, never a T x T matrix
    "local"  Megatron's DotProductAttention (materialises the [T, T] scores; CPU tests)

`config.swa_attention_impl = None` picks "te" when the layers use Transformer Engine, else "sdpa" on
a GPU and "local" on CPU.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import MegatronModule

SWA_ATTENTION_IMPLS = ("te", "sdpa", "local")


class BlockedSlidingWindowAttention(MegatronModule):
    """Causal sliding-window attention by blocks of `window` queries.

    A block of queries [s, s + W) needs keys [s - W + 1, s + W): SDPA runs on that [W, 2W - 1]
    tile with a boolean band mask, so memory is O(T W); on a GPU, SDPA's memory-efficient kernel
    does not materialise even the tile's scores. Same constructor and call as Megatron's
    DotProductAttention (the arguments it does not need are accepted for that reason).
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config)
        if config.context_parallel_size != 1:
            raise ValueError("BlockedSlidingWindowAttention does not support context parallelism")
        if config.window_size is None or config.window_size[1] != 0 or config.window_size[0] < 0:
            raise ValueError(f"BlockedSlidingWindowAttention needs a causal window_size (left, 0), got "
                             f"{config.window_size}")
        self.window = config.window_size[0] + 1
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, heads, d], key/value [s, b, groups, d] -> [s, b, heads * d]. The mask
        argument is ignored: the band mask is built here."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("packed sequences and attention bias in SWA layers need the "
                                      "Transformer Engine core attention (swa_attention_impl='te')")
        seq_len, batch, heads, head_dim = query.shape
        if key.shape[0] != seq_len:
            raise ValueError(f"sliding-window attention needs as many keys as queries, got {key.shape[0]} "
                             f"keys for {seq_len} queries")
        per_group = heads // key.shape[2]
        q = query.permute(1, 2, 0, 3)
        k, v = (x.repeat_interleave(per_group, dim=2).permute(1, 2, 0, 3) for x in (key, value))
        dropout = self.dropout if self.training else 0.0
        positions = torch.arange(seq_len, device=query.device)
        blocks = []
        # Dropout draws from the tensor-parallel RNG, as in Megatron's DotProductAttention.
        with get_cuda_rng_tracker().fork() if dropout > 0 else contextlib.nullcontext():
            for start in range(0, seq_len, self.window):
                end = min(start + self.window, seq_len)
                first_key = max(0, start - self.window + 1)
                offset = positions[start:end, None] - positions[None, first_key:end]
                band = (offset >= 0) & (offset < self.window)
                blocks.append(F.scaled_dot_product_attention(
                    q[:, :, start:end], k[:, :, first_key:end], v[:, :, first_key:end], attn_mask=band,
                    dropout_p=dropout, scale=self.softmax_scale))
        out = torch.cat(blocks, dim=2)
        return out.permute(2, 0, 1, 3).reshape(seq_len, batch, heads * head_dim)


def swa_core_attention(config) -> type:
    """The core-attention class for SWA layers under this config (see the module docstring)."""
    impl = config.swa_attention_impl
    if impl is None:
        if config.transformer_impl == "transformer_engine":
            impl = "te"
        else:
            impl = "sdpa" if torch.cuda.is_available() else "local"
    if impl not in SWA_ATTENTION_IMPLS:
        raise ValueError(f"swa_attention_impl must be one of {SWA_ATTENTION_IMPLS} or None, got {impl!r}")
    if impl == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return BlockedSlidingWindowAttention if impl == "sdpa" else DotProductAttention
