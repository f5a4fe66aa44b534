"""The GDN-2 mixer's pointwise stages around the chunk kernel, as two functions of plain PyTorch
that torch.compile fuses on a GPU (eager elsewhere: the same math).

Spelled out eagerly these stages were the largest cost of a training step on the H200
(benchmarks/RESULTS.md): the depthwise conv through cuDNN with [b, C, s] transposes, fp32 casts of
every gate, q/k L2 normalisation in the kernel's wrapper (again in its backward) and layout copies
between Megatron's sequence-major [s, b, .] and the kernel's [b, s, heads, dim] - about twenty
passes over [tokens, heads, dim] tensors per layer and direction. Compiled, each direction of each
function is one or two fused kernels that read the projections once and write the kernel's
inputs (or the out_proj input) once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gdn2_kernels import L2NORM_EPS
from torch.utils.checkpoint import checkpoint

from megatron_gdn2.layers.compiled import compiled_on_gpu


def positions_in_sequence(seq_len: int, batch: int, cu_seqlens: torch.Tensor | None,
                          device: torch.device) -> torch.Tensor:
    """[s, b or 1] offset of every token from the start of its sequence (packed boundaries from
    cu_seqlens, found with searchsorted so there is no host sync)."""
    tokens = torch.arange(seq_len, device=device)
    if cu_seqlens is None:
        return tokens[:, None]
    starts = cu_seqlens[torch.searchsorted(cu_seqlens, tokens, right=True) - 1]
    return (tokens - starts)[:, None]


def _l2_normalised(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


@compiled_on_gpu
def mixer_inputs(projected: torch.Tensor, conv_weight: torch.Tensor, positions: torch.Tensor,
                 decay: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, erase_scale: float,
                 head_k_dim: int, head_v_dim: int):
    """mixer_inputs_math, keeping only its inputs for the backward, which recomputes it. Left to
    itself the compiled graph keeps fp32 intermediates, four shifted fp32 copies of the conv input
    among them: 8.0 KB per token against 1.55 KB checkpointed at the test shapes (CPU inductor),
    about 125 KB against 24 KB per token and GDN-2 layer at the 1.3B shapes."""
    return checkpoint(mixer_inputs_math, projected, conv_weight, positions, decay, A_log, dt_bias,
                      erase_scale, head_k_dim, head_v_dim, use_reentrant=False)


def mixer_inputs_math(projected: torch.Tensor, conv_weight: torch.Tensor, positions: torch.Tensor,
                      decay: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, erase_scale: float,
                      head_k_dim: int, head_v_dim: int):
    """Sequence-major projections (in_proj's [s, b, q | k | v | erase | write] and the decay
    projection [s, b, key_dim]) -> the chunk kernel's inputs [b, s, heads, dim]:

        q, k = l2norm(silu(conv(.))), v = silu(conv(.))   causal depthwise conv, taps before a
                                                           sequence start (positions) read zero
        g = -exp(A_log[head]) softplus(decay + dt_bias)    fp32
        erase = erase_scale sigmoid(erase_logits), write = sigmoid(write_logits)

    The conv is its taps as shifted products, so it fuses with the rest; arithmetic in fp32,
    outputs in projected's dtype except g. The split of `projected` happens here, so its gradient
    comes out of the fused backward whole (split outside, autograd would concatenate the parts).
    """
    seq_len, batch, _ = projected.shape
    key_dim = decay.shape[-1]
    value_dim = conv_weight.shape[0] - 2 * key_dim
    qkv, erase_logits, write_logits = projected.split([2 * key_dim + value_dim, key_dim, value_dim], dim=-1)
    width = conv_weight.shape[1]
    x, weight = qkv.float(), conv_weight.float()
    y = x * weight[:, width - 1]
    for shift in range(1, width):
        tap = F.pad(x, (0, 0, 0, 0, shift, 0))[:seq_len]
        y = y + torch.where((positions >= shift)[..., None], tap, 0.0) * weight[:, width - 1 - shift]
    y = F.silu(y)

    def kernel_layout(t, head_dim, dtype):
        return t.reshape(seq_len, batch, -1, head_dim).transpose(0, 1).contiguous().to(dtype)

    q, k, v = y.split([key_dim, key_dim, value_dim], dim=-1)
    q, k = (_l2_normalised(t.reshape(seq_len, batch, -1, head_k_dim)) for t in (q, k))
    rate = A_log.float().exp().repeat_interleave(head_k_dim)
    g = -rate * F.softplus(decay.float() + dt_bias.float())
    erase = torch.sigmoid(erase_logits.float()) * erase_scale
    write = torch.sigmoid(write_logits.float())
    dtype = projected.dtype
    return (kernel_layout(q, head_k_dim, dtype), kernel_layout(k, head_k_dim, dtype),
            kernel_layout(v, head_v_dim, dtype), kernel_layout(g, head_k_dim, torch.float32),
            kernel_layout(erase, head_k_dim, dtype), kernel_layout(write, head_v_dim, dtype))


@compiled_on_gpu
def gated_norm_output(o: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float):
    """Kernel output o [b, s, heads, d] -> out_proj input [s, b, heads * d]: RMSNorm over each
    head's d channels (one weight [d] for all heads) times silu(gate [s, b, heads * d]); fp32
    arithmetic, result in o's dtype."""
    batch, seq_len, heads, dim = o.shape
    x = o.transpose(0, 1).float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    y = x * F.silu(gate.float().reshape(seq_len, batch, heads, dim))
    return y.reshape(seq_len, batch, heads * dim).to(o.dtype).contiguous()
