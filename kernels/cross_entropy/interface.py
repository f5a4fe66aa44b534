"""Public entry: checks the arguments; the vocabulary-parallel reduction around either backend."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .naive import logits_grad_torch, row_stats_torch

BACKENDS = ("triton", "torch")


def _passes(backend: str):
    if backend == "torch":
        return row_stats_torch, logits_grad_torch
    from .fused import logits_grad_triton, row_stats_triton

    return row_stats_triton, logits_grad_triton


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, group, backend):
        vocab = logits.shape[-1]
        x = logits.reshape(-1, vocab)
        flat_labels = labels.reshape(-1)
        rank = dist.get_rank(group) if group is not None else 0
        start = rank * vocab
        row_stats, logits_grad = _passes(backend)
        m, s, t = row_stats(x, flat_labels, start)
        if group is not None and dist.get_world_size(group) > 1:
            # each rank's sum of exponentials is rescaled to the global maximum before the sum
            global_m = m.clone()
            dist.all_reduce(global_m, op=dist.ReduceOp.MAX, group=group)
            s = s * torch.exp(m - global_m)
            dist.all_reduce(s, group=group)
            dist.all_reduce(t, group=group)
            m = global_m
        lse = m + torch.log(s)
        ctx.save_for_backward(x, flat_labels, lse)
        ctx.start, ctx.logits_grad, ctx.shape = start, logits_grad, logits.shape
        return (lse - t).view(labels.shape)

    @staticmethod
    def backward(ctx, dloss):
        x, labels, lse = ctx.saved_tensors
        dx = ctx.logits_grad(x, labels, ctx.start, lse, dloss.reshape(-1).float().contiguous())
        return dx.view(ctx.shape), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group=None,
                                 backend: str | None = None) -> torch.Tensor:
    """Per-token cross entropy (fp32, labels' shape) of logits [..., V] whose last dimension is this
    rank's slice of the vocabulary (rank r of `group` holds ids [r V, (r + 1) V); group None: the
    whole vocabulary). backend: "triton" (CUDA, or Triton's interpreter), "torch", or None for
    triton on CUDA tensors and torch elsewhere. The backward returns the logits' gradient in their
    dtype and keeps only the logits and one fp32 value per token."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be labels' shape {tuple(labels.shape)} plus "
                         "the vocabulary")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if labels.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"labels must be int32 or int64, got {labels.dtype}")
    if backend is None:
        backend = "triton" if logits.is_cuda else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return _VocabParallelCrossEntropy.apply(logits.contiguous(), labels.contiguous(), group, backend)
