"""The GDN-2 mixer's input stage in plain PyTorch: the reference for the fused Triton kernels and
the path on CPUs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..gdn2.naive import L2NORM_EPS


def split_widths(conv_weight: torch.Tensor, decay: torch.Tensor) -> tuple[int, int]:
    """(key_dim, value_dim) of the projections: the conv covers [q | k | v], decay is key-wide."""
    key_dim = decay.shape[-1]
    return key_dim, conv_weight.shape[0] - 2 * key_dim


def mixer_inputs_torch(projected: torch.Tensor, conv_weight: torch.Tensor, positions: torch.Tensor,
                       decay: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
                       erase_scale: float, head_k_dim: int, head_v_dim: int):
    """Sequence-major projections (in_proj's [s, b, q | k | v | erase | write] and the decay
    projection [s, b, key_dim]) -> the chunk kernel's inputs [b, s, heads, dim]:

        q, k = l2norm(silu(conv(.))), v = silu(conv(.))   causal depthwise conv, taps before a
                                                           sequence start (positions) read zero
        g = -exp(A_log[head]) softplus(decay + dt_bias)    fp32
        erase = erase_scale sigmoid(erase_logits), write = sigmoid(write_logits)

    The conv is its taps as shifted products, so torch.compile fuses it with the rest; arithmetic
    in fp32 (fp64 for fp64 inputs), outputs in projected's dtype except g. The split of `projected`
    happens here, so its gradient comes out of one backward whole.
    """
    seq_len, batch, _ = projected.shape
    key_dim, value_dim = split_widths(conv_weight, decay)
    qkv, erase_logits, write_logits = projected.split([2 * key_dim + value_dim, key_dim, value_dim], dim=-1)
    width = conv_weight.shape[1]
    work = torch.promote_types(projected.dtype, torch.float32)
    x, weight = qkv.to(work), conv_weight.to(work)
    y = x * weight[:, width - 1]
    for shift in range(1, width):
        tap = F.pad(x, (0, 0, 0, 0, shift, 0))[:seq_len]
        y = y + torch.where((positions >= shift)[..., None], tap, 0.0) * weight[:, width - 1 - shift]
    y = F.silu(y)

    def l2_normalised(t):
        t = t.reshape(seq_len, batch, -1, head_k_dim)
        return t * torch.rsqrt((t * t).sum(-1, keepdim=True) + L2NORM_EPS)

    def kernel_layout(t, head_dim, dtype):
        return t.reshape(seq_len, batch, -1, head_dim).transpose(0, 1).contiguous().to(dtype)

    q, k, v = y.split([key_dim, key_dim, value_dim], dim=-1)
    q, k = l2_normalised(q), l2_normalised(k)
    rate = A_log.to(work).exp().repeat_interleave(head_k_dim)
    g = -rate * F.softplus(decay.to(work) + dt_bias.to(work))
    erase = torch.sigmoid(erase_logits.to(work)) * erase_scale
    write = torch.sigmoid(write_logits.to(work))
    dtype = projected.dtype
    return (kernel_layout(q, head_k_dim, dtype), kernel_layout(k, head_k_dim, dtype),
            kernel_layout(v, head_v_dim, dtype), kernel_layout(g, head_k_dim, work),
            kernel_layout(erase, head_k_dim, dtype), kernel_layout(write, head_v_dim, dtype))
