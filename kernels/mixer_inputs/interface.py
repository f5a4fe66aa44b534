"""Public entry: checks the arguments, then runs the fused Triton kernels on CUDA tensors or the
PyTorch reference elsewhere."""
from __future__ import annotations

import torch

from .naive import mixer_inputs_torch, split_widths

BACKENDS = ("triton", "torch")


def _check(projected, conv_weight, positions, decay, A_log, dt_bias, head_k_dim, head_v_dim):
    if projected.dim() != 3:
        raise ValueError(f"projected must be [seq, batch, channels], got shape {tuple(projected.shape)}")
    seq_len, batch, channels = projected.shape
    if conv_weight.dim() != 2:
        raise ValueError(f"conv_weight must be [channels, taps], got shape {tuple(conv_weight.shape)}")
    if decay.shape[:2] != (seq_len, batch) or decay.dim() != 3:
        raise ValueError(f"decay must be [seq, batch, key_dim] matching projected {tuple(projected.shape)}, "
                         f"got {tuple(decay.shape)}")
    key_dim, value_dim = split_widths(conv_weight, decay)
    if value_dim <= 0 or channels != 3 * key_dim + 2 * value_dim:
        raise ValueError(f"projected has {channels} channels; conv_weight ({conv_weight.shape[0]} rows) and "
                         f"decay (key_dim {key_dim}) imply q | k | v | erase | write = "
                         f"{3 * key_dim + 2 * value_dim}")
    if key_dim % head_k_dim or value_dim % head_v_dim:
        raise ValueError(f"head_k_dim {head_k_dim} / head_v_dim {head_v_dim} must divide key_dim {key_dim} / "
                         f"value_dim {value_dim}")
    if A_log.shape != (key_dim // head_k_dim,):
        raise ValueError(f"A_log must be [{key_dim // head_k_dim}] (one per head), got {tuple(A_log.shape)}")
    if dt_bias.shape != (key_dim,):
        raise ValueError(f"dt_bias must be [{key_dim}], got {tuple(dt_bias.shape)}")
    if positions.dim() != 2 or positions.shape[0] != seq_len or positions.shape[1] not in (1, batch):
        raise ValueError(f"positions must be [seq, batch or 1] = [{seq_len}, {batch}], got "
                         f"{tuple(positions.shape)}")


def mixer_inputs(projected: torch.Tensor, conv_weight: torch.Tensor, positions: torch.Tensor,
                 decay: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, erase_scale: float,
                 head_k_dim: int, head_v_dim: int, backend: str | None = None):
    """projected [s, b, q | k | v | erase | write] and decay [s, b, key_dim] -> (q, k, v, g, erase,
    write) in the chunk kernel's layout [b, s, heads, dim] (see naive.mixer_inputs_torch for the
    math). positions [s, b or 1] is each token's offset from its sequence's start: conv taps never
    reach across a packed boundary. backend: "triton" (CUDA; keeps only the inputs for the
    backward), "torch", or None for triton on CUDA tensors and torch elsewhere."""
    _check(projected, conv_weight, positions, decay, A_log, dt_bias, head_k_dim, head_v_dim)
    if backend is None:
        backend = "triton" if projected.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and max(projected.numel(), decay.numel()) >= 2 ** 31:
        raise ValueError(f"projected {tuple(projected.shape)} has 2^31 elements or more, past the Triton "
                         f"kernels' 32-bit offsets: use fewer tokens per micro-batch or backend='torch'")
    if backend == "torch":
        return mixer_inputs_torch(projected, conv_weight, positions, decay, A_log, dt_bias, erase_scale,
                                  head_k_dim, head_v_dim)
    from .fused import mixer_inputs_triton

    return mixer_inputs_triton(projected, conv_weight, positions, decay, A_log, dt_bias, erase_scale,
                               head_k_dim, head_v_dim)
