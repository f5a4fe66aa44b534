"""Public entry: checks the arguments, then runs the Triton kernels on CUDA tensors or the PyTorch
reference elsewhere."""
from __future__ import annotations

import torch

from .naive import split_rotary_torch

BACKENDS = ("triton", "torch")


def _check(mixed, q_freqs, k_freqs, heads_per_group):
    if mixed.dim() != 4:
        raise ValueError(f"mixed must be [seq, batch, groups, (heads_per_group + 2) * head_dim], got shape "
                         f"{tuple(mixed.shape)}")
    if heads_per_group < 1 or mixed.shape[3] % (heads_per_group + 2):
        raise ValueError(f"mixed's last dimension {mixed.shape[3]} is not (heads_per_group + 2) * head_dim "
                         f"with heads_per_group={heads_per_group}")
    head_dim = mixed.shape[3] // (heads_per_group + 2)
    if head_dim % 2:
        raise ValueError(f"the rotary embedding needs an even head_dim, got {head_dim}")
    for name, freqs in (("q_freqs", q_freqs), ("k_freqs", k_freqs)):
        if tuple(freqs.shape) != (mixed.shape[0], 1, 1, head_dim):
            raise ValueError(f"{name} must be [seq, 1, 1, head_dim] = [{mixed.shape[0]}, 1, 1, {head_dim}], "
                             f"got {tuple(freqs.shape)}")


def split_rotary(mixed: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor, heads_per_group: int,
                 backend: str | None = None):
    """mixed [s, b, groups, (heads_per_group + 2) * d] (per group: its query heads, then key, then
    value) and the RoPE angles q_freqs / k_freqs [s, 1, 1, d] -> query with RoPE [b, heads, s, d],
    key with RoPE [b, groups, s, d] and value [b, groups, s, d], contiguous, in mixed's dtype (see
    naive.py for the math). backend: "triton" (CUDA), "torch", or None for triton on CUDA tensors
    and torch elsewhere."""
    _check(mixed, q_freqs, k_freqs, heads_per_group)
    if backend is None:
        backend = "triton" if mixed.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "torch":
        return split_rotary_torch(mixed, q_freqs, k_freqs, heads_per_group)
    if mixed.numel() >= 2 ** 31:
        raise ValueError(f"mixed {tuple(mixed.shape)} has 2^31 elements or more, past the Triton kernels' "
                         f"32-bit offsets: use fewer tokens per micro-batch or backend='torch'")
    from .fused import split_rotary_triton

    return split_rotary_triton(mixed, q_freqs, k_freqs, heads_per_group)
