"""PyTorch reference of the split with the rotary embedding (Megatron's non-interleaved form:
x cos + rotate_half(x) sin, rotate_half(x1, x2) = (-x2, x1), over the whole head width)."""
from __future__ import annotations

import torch


def rotary_heads_first(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [s, b, heads, d] with freqs [s, 1, 1, d] -> [b, heads, s, d] contiguous in x's dtype (fp32
    arithmetic)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    y = xf * freqs.cos() + torch.cat((-x2, x1), dim=-1) * freqs.sin()
    return y.permute(1, 2, 0, 3).contiguous().to(x.dtype)


def split_rotary_torch(mixed: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                       heads_per_group: int):
    """mixed [s, b, groups, (heads_per_group + 2) * d] -> query with RoPE [b, heads, s, d], key with
    RoPE [b, groups, s, d], value [b, groups, s, d]."""
    s, b, groups, width = mixed.shape
    parts = mixed.view(s, b, groups, heads_per_group + 2, width // (heads_per_group + 2))
    query = parts[:, :, :, :heads_per_group].reshape(s, b, groups * heads_per_group, -1)
    return (rotary_heads_first(query, q_freqs), rotary_heads_first(parts[:, :, :, -2], k_freqs),
            parts[:, :, :, -1].permute(1, 2, 0, 3).contiguous())
