"""The split with the rotary embedding as one Triton kernel, forward and backward.

Pure data movement: per token and key/value group the forward reads the projection's row once
and writes each query, key and value head's row once, in the heads-first layout; the backward
does the reverse. Torch's compiled version of the same function ran its backward at about a
quarter of the copy rate (0.56 ms per 4K x 4 layer of swa_gdn2_1.3B, benchmarks/RESULTS.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS = 32  # sequence positions per program


@triton.jit
def _angles(cos, sin, angle, mask, HALF: tl.constexpr):
    """cos and sin of both halves' angles, [BS, BH] tiles each."""
    return (tl.load(cos + angle, mask=mask, other=0.0), tl.load(sin + angle, mask=mask, other=0.0),
            tl.load(cos + angle + HALF, mask=mask, other=0.0),
            tl.load(sin + angle + HALF, mask=mask, other=0.0))


@triton.jit
def _rotate(x1, x2, c1, s1, c2, s2, BACKWARD: tl.constexpr):
    """(y1, y2) = (x1 cos f1 - x2 sin f1, x2 cos f2 + x1 sin f2) for the two halves of a head; its
    transpose when BACKWARD (the gradient of x from that of y)."""
    if BACKWARD:
        return x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def split_rotary_kernel(
    mixed, q_cos, q_sin, k_cos, k_sin, q, k, v, S, B,
    G: tl.constexpr, HPG: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, BH: tl.constexpr,
    BS: tl.constexpr, BACKWARD: tl.constexpr,
):
    """Program (row block, batch), looping over the groups. Forward: mixed [S, B, G, (HPG + 2) D]
    -> q [B, G HPG, S, D], k and v [B, G, S, D]. BACKWARD: the same addresses, read from q/k/v
    (their gradients) and written to mixed (its gradient)."""
    b = tl.program_id(1)
    s = tl.program_id(0) * BS + tl.arange(0, BS)
    c = tl.arange(0, BH)
    mask = (s < S)[:, None] & (c < HALF)[None, :]
    angle = s[:, None] * D + c[None, :]
    qc1, qs1, qc2, qs2 = _angles(q_cos, q_sin, angle, mask, HALF)
    kc1, ks1, kc2, ks2 = _angles(k_cos, k_sin, angle, mask, HALF)
    for grp in range(G):
        row = (((s * B + b) * G + grp) * (HPG + 2) * D)[:, None] + c[None, :]
        for j in tl.static_range(HPG + 2):
            if j < HPG:
                head = q + ((b * G * HPG + grp * HPG + j) * S + s)[:, None] * D + c[None, :]
            elif j == HPG:
                head = k + ((b * G + grp) * S + s)[:, None] * D + c[None, :]
            else:
                head = v + ((b * G + grp) * S + s)[:, None] * D + c[None, :]
            part = mixed + row + j * D
            if BACKWARD:
                src, dst = head, part
            else:
                src, dst = part, head
            x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
            if j < HPG:
                x1, x2 = _rotate(x1, x2, qc1, qs1, qc2, qs2, BACKWARD)
            elif j == HPG:
                x1, x2 = _rotate(x1, x2, kc1, ks1, kc2, ks2, BACKWARD)
            tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, x2.to(dst.dtype.element_ty), mask=mask)


def _launch(mixed, q_freqs, k_freqs, q, k, v, heads_per_group, backward):
    S, B, G, width = mixed.shape
    D = width // (heads_per_group + 2)
    # cos and sin as [S, D] tables: computed in the kernel for every (token, group), they made it
    # run at a fifth of the copy rate (run 44). Self-attention gives queries and keys one tensor.
    tables = [torch.cos(q_freqs), torch.sin(q_freqs)]
    tables += tables if k_freqs is q_freqs else [torch.cos(k_freqs), torch.sin(k_freqs)]
    split_rotary_kernel[(triton.cdiv(S, ROWS), B)](
        mixed, *tables, q, k, v, S, B,
        G=G, HPG=heads_per_group, D=D, HALF=D // 2, BH=triton.next_power_of_2(D // 2), BS=ROWS,
        BACKWARD=backward, num_warps=4,
    )


class SplitRotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixed, q_freqs, k_freqs, heads_per_group):
        S, B, G, width = mixed.shape
        D = width // (heads_per_group + 2)
        mixed = mixed.contiguous()
        ctx.shared_freqs = k_freqs is q_freqs
        q_freqs = q_freqs.reshape(S, D).float().contiguous()
        k_freqs = q_freqs if ctx.shared_freqs else k_freqs.reshape(S, D).float().contiguous()
        q = mixed.new_empty(B, G * heads_per_group, S, D)
        k, v = (mixed.new_empty(B, G, S, D) for _ in range(2))
        _launch(mixed, q_freqs, k_freqs, q, k, v, heads_per_group, backward=False)
        ctx.save_for_backward(*((q_freqs,) if ctx.shared_freqs else (q_freqs, k_freqs)))
        ctx.heads_per_group, ctx.shape, ctx.dtype = heads_per_group, mixed.shape, mixed.dtype
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        q_freqs, k_freqs = ctx.saved_tensors * 2 if ctx.shared_freqs else ctx.saved_tensors
        S, B, G, width = ctx.shape
        D = width // (ctx.heads_per_group + 2)
        shapes = ((B, G * ctx.heads_per_group, S, D), (B, G, S, D), (B, G, S, D))
        # an output the loss does not use has no gradient
        grads = [q_freqs.new_zeros(shape, dtype=ctx.dtype) if g is None else g.contiguous()
                 for g, shape in zip((dq, dk, dv), shapes)]
        dmixed = grads[0].new_empty(ctx.shape, dtype=ctx.dtype)
        _launch(dmixed, q_freqs, k_freqs, *grads, ctx.heads_per_group, backward=True)
        return dmixed, None, None, None


def split_rotary_triton(mixed, q_freqs, k_freqs, heads_per_group):
    return SplitRotaryFunction.apply(mixed, q_freqs, k_freqs, heads_per_group)
