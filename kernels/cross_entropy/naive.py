"""PyTorch form of the two passes (the reference for the Triton kernels, and the CPU path).

x: [rows, V] logits of this rank's vocabulary slice [start, start + V); labels: [rows] global ids.
"""
from __future__ import annotations

import torch


def _local(labels: torch.Tensor, start: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    local = labels - start
    inside = (local >= 0) & (local < vocab)
    return local.clamp(0, vocab - 1), inside


def row_stats_torch(x: torch.Tensor, labels: torch.Tensor, start: int):
    """Per row: max m, sum of exp(x - m), and the label's logit (0 where the label is elsewhere)."""
    xf = x.float()
    m = xf.amax(-1)
    s = torch.exp(xf - m[:, None]).sum(-1)
    local, inside = _local(labels, start, x.shape[-1])
    t = torch.where(inside, xf.gather(-1, local[:, None]).squeeze(-1), 0.0)
    return m, s, t


def logits_grad_torch(x: torch.Tensor, labels: torch.Tensor, start: int, lse: torch.Tensor,
                      dloss: torch.Tensor) -> torch.Tensor:
    """(softmax(x) - onehot(label)) * dloss per row, in x's dtype."""
    p = torch.exp(x.float() - lse[:, None])
    local, inside = _local(labels, start, x.shape[-1])
    p.scatter_add_(-1, local[:, None], -inside.float()[:, None])
    return (p * dloss[:, None]).to(x.dtype)
