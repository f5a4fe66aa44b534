"""The GDN-2 mixer's pointwise stages around the chunk kernel: its inputs (gdn2_kernels' fused
Triton stage with the Triton chunk kernels, else the PyTorch form compiled) and the gated output
norm (PyTorch, compiled on a GPU, eager elsewhere: the same math).

Spelled out eagerly these stages were the largest cost of a training step on the H200
(benchmarks/RESULTS.md): the depthwise conv through cuDNN with [b, C, s] transposes, fp32 casts of
every gate, q/k L2 normalisation in the kernel's wrapper (again in its backward) and layout copies
between Megatron's sequence-major [s, b, .] and the kernel's [b, s, heads, dim] - about twenty
passes over [tokens, heads, dim] tensors per layer and direction. Compiled, each direction of each
function is one or two fused kernels; the hand-written Triton stage also avoids the compiled
backward's recomputation and fp32 round trips.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gdn2_kernels.mixer_inputs import mixer_inputs as gdn2_mixer_inputs
from gdn2_kernels.mixer_inputs.naive import mixer_inputs_torch
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


@compiled_on_gpu
def _mixer_inputs_checkpointed(projected, conv_weight, positions, decay, A_log, dt_bias, erase_scale,
                               head_k_dim, head_v_dim):
    """The PyTorch form, keeping only its inputs for the backward, which recomputes it. Left to
    itself the compiled graph keeps fp32 intermediates, four shifted fp32 copies of the conv input
    among them: 8.0 KB per token against 1.55 KB checkpointed at the test shapes (CPU inductor),
    about 125 KB against 24 KB per token and GDN-2 layer at the 1.3B shapes."""
    return checkpoint(mixer_inputs_torch, projected, conv_weight, positions, decay, A_log, dt_bias,
                      erase_scale, head_k_dim, head_v_dim, use_reentrant=False)


def mixer_inputs(projected: torch.Tensor, conv_weight: torch.Tensor, positions: torch.Tensor,
                 decay: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, erase_scale: float,
                 head_k_dim: int, head_v_dim: int, kernel_backend: str | None = None):
    """The chunk kernel's inputs from the projections (gdn2_kernels.mixer_inputs has the math).
    With the Triton chunk kernels on a GPU, gdn2_kernels' fused Triton stage (about a third of the
    compiled form's time, benchmarks/RESULTS.md); otherwise the PyTorch form, compiled on a GPU.
    Both keep only their inputs for the backward."""
    triton_stage = projected.is_cuda and kernel_backend in (None, "triton")
    if triton_stage:
        return gdn2_mixer_inputs(projected, conv_weight, positions, decay, A_log, dt_bias, erase_scale,
                                 head_k_dim, head_v_dim, backend="triton")
    return _mixer_inputs_checkpointed(projected, conv_weight, positions, decay, A_log, dt_bias, erase_scale,
                                      head_k_dim, head_v_dim)


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
