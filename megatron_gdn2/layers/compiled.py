"""torch.compile for the pointwise stages of our layers: compiled for CUDA tensors, eager (the same
math) elsewhere, so the CPU tests and the GPU runs share one definition."""
from __future__ import annotations

import functools

import torch


def compiled_on_gpu(fn):
    """fn compiled for CUDA tensors (one graph per shape: a run repeats one shape; packed-sequence
    boundaries are tensor values, so they never recompile), eager otherwise."""
    compiled = torch.compile(fn, dynamic=False)

    @functools.wraps(fn)
    def call(*args):
        return compiled(*args) if args[0].is_cuda else fn(*args)

    return call
