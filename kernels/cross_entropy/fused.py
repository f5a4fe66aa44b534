"""Triton kernels of the two passes: one program per row, looping over the vocabulary in blocks
(online max and sum of exponentials forward; the gradient written in the logits' dtype backward)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


def _block(vocab: int) -> int:
    return min(BLOCK, triton.next_power_of_2(vocab))


@triton.jit
def _row_stats_kernel(x, labels, m_out, s_out, t_out, V, start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x += row * V
    m = float("-inf")
    s = 0.0
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        xb = tl.load(x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(xb, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(xb - m_new), 0)
        m = m_new
    label = tl.load(labels + row) - start
    inside = (label >= 0) & (label < V)
    t = tl.load(x + tl.where(inside, label, 0)).to(tl.float32)
    tl.store(m_out + row, m)
    tl.store(s_out + row, s)
    tl.store(t_out + row, tl.where(inside, t, 0.0))


@triton.jit
def _logits_grad_kernel(x, labels, lse, dloss, dx, V, start, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x += row * V
    dx += row * V
    label = tl.load(labels + row) - start
    row_lse = tl.load(lse + row)
    g = tl.load(dloss + row)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        p = tl.exp(tl.load(x + cols, mask=mask, other=0.0).to(tl.float32) - row_lse)
        p = tl.where(cols == label, p - 1.0, p)
        tl.store(dx + cols, (p * g).to(dx.dtype.element_ty), mask=mask)


def row_stats_triton(x: torch.Tensor, labels: torch.Tensor, start: int):
    rows, vocab = x.shape
    m, s, t = (torch.empty(rows, device=x.device, dtype=torch.float32) for _ in range(3))
    _row_stats_kernel[(rows,)](x, labels, m, s, t, vocab, start, BLOCK=_block(vocab))
    return m, s, t


def logits_grad_triton(x: torch.Tensor, labels: torch.Tensor, start: int, lse: torch.Tensor,
                       dloss: torch.Tensor) -> torch.Tensor:
    rows, vocab = x.shape
    dx = torch.empty_like(x)
    _logits_grad_kernel[(rows,)](x, labels, lse, dloss, dx, vocab, start, BLOCK=_block(vocab))
    return dx
