"""torch.compile for the pointwise stages of our layers: compiled for CUDA tensors, eager (the same
math) elsewhere, so the CPU tests and the GPU runs share one definition."""
from __future__ import annotations

import functools

import torch


def compiled_on_gpu(fn):
    """fn compiled for CUDA tensors (its first argument decides), eager otherwise.

    dynamic=False: a training run repeats one shape, so fn compiles once per shape (and grad mode)
    and is reused; packed-sequence boundaries are tensor values and never recompile. Every new
    sequence length is a new graph (past torch's recompile limit, 8, that shape runs eagerly)."""
    compiled = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return (compiled if args[0].is_cuda else fn)(*args, **kwargs)

    return call
