"""The GDN-2 mixer's input stage as Triton kernels (the conv part, the decay and the sigmoid gates,
forward and backward), with an autograd Function that keeps only the stage's inputs.

The stage is pure data movement with a little arithmetic: per token the forward reads the
projections once and writes the chunk kernel's inputs once. The backward recomputes the conv and
the row's L2 norm from the inputs, writes the conv's pre-activation gradient once (training dtype)
and gathers each input row's gradient from the rows its taps reach; recomputing that gradient per
tap in one kernel instead reloaded every tile ~24 times and took 2.0 ms per 1.3B layer at 16K tokens
(benchmarks/RESULTS.md). Parameter gradients (conv taps, dt_bias, A_log) are per-program partial
sums reduced by torch: deterministic, no atomics.

Layouts: projected [s, b, q | k | v | erase | write] and decay [s, b, key_dim] sequence-major as
Megatron's linears produce them; outputs [b, s, heads, dim] as the chunk kernel takes them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gdn2.naive import L2NORM_EPS
from .naive import split_widths

ROWS = 32  # sequence positions per program


@triton.jit
def _conv_tile(p, w, here, s, b, S, B, C, ch, D, WIDTH: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr):
    """Pre-activation c [BS, BD] of the causal depthwise conv at rows s (int vector) of batch b,
    channels ch..ch+D of `p` ([S, B, C] row-major); taps reaching before a sequence start (here:
    the rows' positions in their sequences) read zero."""
    d = tl.arange(0, BD)
    valid_s = s < S
    c = tl.zeros([BS, BD], dtype=tl.float32)
    for shift in tl.static_range(WIDTH):
        tap = tl.load(w + (ch + d) * WIDTH + (WIDTH - 1 - shift), mask=d < D, other=0.0).to(tl.float32)
        rows = valid_s & (here >= shift)
        x = tl.load(p + ((s - shift) * B + b)[:, None] * C + ch + d[None, :],
                    mask=rows[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
        c += x * tap[None, :]
    return c


@triton.jit
def _activate(c, NORM: tl.constexpr, eps):
    """silu(c), then the row's L2 normalisation when NORM; also returns 1 / norm per row."""
    y = c * tl.sigmoid(c)
    if NORM:
        r = 1.0 / tl.sqrt(tl.sum(y * y, 1) + eps)
        return y * r[:, None], r
    return y, tl.full([c.shape[0]], 1.0, tl.float32)


@triton.jit(do_not_specialize=["S"])
def conv_fwd_kernel(
    p, w, pos, out0, out1,
    S, B: tl.constexpr, C: tl.constexpr, CH0: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr,
    eps, NORM: tl.constexpr, WIDTH: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
):
    """Grid (row blocks, b, heads of out0 then of out1): out[b, s, head, :] = act(conv(p))."""
    i_s, b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = i_s * BS + tl.arange(0, BS)
    d = tl.arange(0, BD)
    here = tl.load(pos + s * B + b, mask=s < S, other=0)
    y, _ = _activate(_conv_tile(p, w, here, s, b, S, B, C, CH0 + i_h * D, D, WIDTH, BS, BD), NORM, eps)
    if i_h < HEADS:
        out, h = out0, i_h
    else:
        out, h = out1, i_h - HEADS
    o = out + ((b * S + s) * HEADS + h)[:, None] * D + d[None, :]
    tl.store(o, y.to(out.dtype.element_ty), mask=(s < S)[:, None] & (d < D)[None, :])


@triton.jit(do_not_specialize=["S"])
def conv_act_bwd_kernel(
    p, w, pos, dout0, dout1, dc_out, dw_part,
    S, B: tl.constexpr, C: tl.constexpr, CH0: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr,
    CW: tl.constexpr, eps, NORM: tl.constexpr, WIDTH: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
):
    """On conv_fwd_kernel's grid: dc, the gradient of the conv's pre-activation (through the L2
    norm and SiLU, recomputed from p), into dc_out [S, B, CW]; and this block's sum of dc[s]
    x[s - shift] for every tap into dw_part[row block, b, channel, tap]."""
    i_s, b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if i_h < HEADS:
        dout, h = dout0, i_h
    else:
        dout, h = dout1, i_h - HEADS
    ch = CH0 + i_h * D
    s = i_s * BS + tl.arange(0, BS)
    d = tl.arange(0, BD)
    dmask = d < D
    valid = (s < S)[:, None] & dmask[None, :]
    here = tl.load(pos + s * B + b, mask=s < S, other=0)
    c = _conv_tile(p, w, here, s, b, S, B, C, ch, D, WIDTH, BS, BD)
    n, r = _activate(c, NORM, eps)
    g = tl.load(dout + ((b * S + s) * HEADS + h)[:, None] * D + d[None, :], mask=valid, other=0.0)
    g = g.to(tl.float32)
    if NORM:
        g = r[:, None] * (g - n * tl.sum(g * n, 1)[:, None])
    sig = tl.sigmoid(c)
    dc = g * sig * (1.0 + c * (1.0 - sig))
    tl.store(dc_out + (s * B + b)[:, None] * CW + ch + d[None, :], dc.to(dc_out.dtype.element_ty),
             mask=valid)
    part = dw_part + ((i_s * B + b) * CW + ch + d) * WIDTH
    for t in tl.static_range(WIDTH):
        rows = (s < S) & (here >= t)
        x = tl.load(p + ((s - t) * B + b)[:, None] * C + ch + d[None, :],
                    mask=rows[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        tl.store(part + (WIDTH - 1 - t), tl.sum(dc * x, 0), mask=dmask)


@triton.jit(do_not_specialize=["S"])
def conv_dx_kernel(
    dc, w, pos, dp,
    S, B: tl.constexpr, C: tl.constexpr, CW: tl.constexpr, WIDTH: tl.constexpr, BS: tl.constexpr,
    BC: tl.constexpr,
):
    """Grid (row blocks, b, channel blocks of the conv's CW channels): dp[s, b, ch] = sum over
    taps of dc[s + shift] w[ch, WIDTH - 1 - shift], for the later rows whose tap reaches back to s
    (within their sequence)."""
    i_s, b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s0 = i_s * BS + tl.arange(0, BS)
    ch = i_c * BC + tl.arange(0, BC)
    cmask = ch < CW
    dx = tl.zeros([BS, BC], dtype=tl.float32)
    for shift in tl.static_range(WIDTH):
        s = s0 + shift
        reach = (s < S) & (tl.load(pos + s * B + b, mask=s < S, other=0) >= shift)
        g = tl.load(dc + (s * B + b)[:, None] * CW + ch[None, :], mask=reach[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        tap = tl.load(w + ch * WIDTH + (WIDTH - 1 - shift), mask=cmask, other=0.0).to(tl.float32)
        dx += g * tap[None, :]
    tl.store(dp + (s0 * B + b)[:, None] * C + ch[None, :], dx.to(dp.dtype.element_ty),
             mask=(s0 < S)[:, None] & cmask[None, :])


@triton.jit
def _softplus(z):
    # torch's threshold (20); below -15, log(1 + e^z) = e^z to fp32 precision
    return tl.where(z > 20.0, z, tl.where(z < -15.0, tl.exp(z), tl.log(1.0 + tl.exp(z))))


@triton.jit
def _decay_tile(decay, a_log, dt_bias, S, B, KD: tl.constexpr, DK: tl.constexpr, BS: tl.constexpr,
                BC: tl.constexpr):
    """This program's rows s, batch b, channels col and mask; z = decay + dt_bias (fp32) there, and
    each channel's exp(A_log[head])."""
    s = tl.program_id(0) * BS + tl.arange(0, BS)
    b = tl.program_id(1)
    col = tl.program_id(2) * BC + tl.arange(0, BC)
    m = (s < S)[:, None] & (col < KD)[None, :]
    z = tl.load(decay + (s * B + b)[:, None] * KD + col[None, :], mask=m, other=0.0).to(tl.float32)
    z += tl.load(dt_bias + col, mask=col < KD, other=0.0).to(tl.float32)[None, :]
    rate = tl.exp(tl.load(a_log + col // DK, mask=col < KD, other=0.0).to(tl.float32))
    return s, b, col, m, z, rate


@triton.jit(do_not_specialize=["S"])
def decay_fwd_kernel(
    decay, a_log, dt_bias, g_out,
    S, B: tl.constexpr, KD: tl.constexpr, DK: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
):
    """g[b, s, :] = -exp(A_log[head]) softplus(decay[s, b, :] + dt_bias), fp32."""
    s, b, col, m, z, rate = _decay_tile(decay, a_log, dt_bias, S, B, KD, DK, BS, BC)
    tl.store(g_out + (b * S + s)[:, None] * KD + col[None, :], -rate[None, :] * _softplus(z), mask=m)


@triton.jit(do_not_specialize=["S"])
def decay_bwd_kernel(
    decay, a_log, dt_bias, dg, ddecay, dbias_part, dalog_part,
    S, B: tl.constexpr, KD: tl.constexpr, DK: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
):
    """decay_fwd_kernel's backward; dt_bias's and A_log's gradients as this block's per-channel
    partial sums (A_log's summed over each head's channels by the caller: d g / d A_log = g)."""
    s, b, col, m, z, rate = _decay_tile(decay, a_log, dt_bias, S, B, KD, DK, BS, BC)
    grad = tl.load(dg + (b * S + s)[:, None] * KD + col[None, :], mask=m, other=0.0).to(tl.float32)
    dz = -rate[None, :] * tl.sigmoid(z) * grad
    tl.store(ddecay + (s * B + b)[:, None] * KD + col[None, :], dz.to(ddecay.dtype.element_ty), mask=m)
    part = (tl.program_id(0) * B + b) * KD + col
    tl.store(dbias_part + part, tl.sum(dz, 0), mask=col < KD)
    tl.store(dalog_part + part, tl.sum(grad * -rate[None, :] * _softplus(z), 0), mask=col < KD)


@triton.jit(do_not_specialize=["S"])
def sigmoid_gate_kernel(
    p, grad_out, out,
    S, B: tl.constexpr, C: tl.constexpr, SRC: tl.constexpr, WIDTH: tl.constexpr, scale,
    BACKWARD: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
):
    """Forward: out[b, s, :] = scale sigmoid(p[s, b, SRC:SRC + WIDTH]). Backward: the logits'
    gradient from grad_out [b, s, WIDTH], written into p's columns of out ([s, b, C])."""
    i_s, b, i_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    s = i_s * BS + tl.arange(0, BS)
    col = i_c * BC + tl.arange(0, BC)
    m = (s < S)[:, None] & (col < WIDTH)[None, :]
    seq_major = (s * B + b)[:, None] * C + SRC + col[None, :]
    batch_major = (b * S + s)[:, None] * WIDTH + col[None, :]
    sig = tl.sigmoid(tl.load(p + seq_major, mask=m, other=0.0).to(tl.float32))
    if BACKWARD:
        grad = tl.load(grad_out + batch_major, mask=m, other=0.0).to(tl.float32)
        tl.store(out + seq_major, (grad * scale * sig * (1.0 - sig)).to(out.dtype.element_ty), mask=m)
    else:
        tl.store(out + batch_major, (sig * scale).to(out.dtype.element_ty), mask=m)


GATE_COLS = 128


def _column_grid(seq_len, batch, width):
    """Row blocks x batch x blocks of GATE_COLS channels."""
    return (triton.cdiv(seq_len, ROWS), batch, triton.cdiv(width, GATE_COLS))


def _sigmoid_gates(projected, grads, outs, key_dim, value_dim, erase_scale, backward):
    """erase (scaled) and write: forward into outs, or backward from grads into outs (= dp)."""
    seq_len, batch, C = projected.shape
    for i, (src, width, scale) in enumerate(((2 * key_dim + value_dim, key_dim, erase_scale),
                                             (3 * key_dim + value_dim, value_dim, 1.0))):
        out = outs if backward else outs[i]
        grad = grads[i] if backward else out
        sigmoid_gate_kernel[_column_grid(seq_len, batch, width)](
            projected, grad, out, seq_len, batch, C, src, width, float(scale),
            BACKWARD=backward, BS=ROWS, BC=GATE_COLS)


class MixerInputsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, projected, conv_weight, positions, decay, A_log, dt_bias, erase_scale,
                head_k_dim, head_v_dim):
        seq_len, batch, C = projected.shape
        key_dim, value_dim = split_widths(conv_weight, decay)
        heads, v_heads = key_dim // head_k_dim, value_dim // head_v_dim
        width = conv_weight.shape[1]
        projected, decay = projected.contiguous(), decay.contiguous()
        positions = positions.expand(seq_len, batch).contiguous()
        new = projected.new_empty
        q, k = new(batch, seq_len, heads, head_k_dim), new(batch, seq_len, heads, head_k_dim)
        v = new(batch, seq_len, v_heads, head_v_dim)
        g = torch.empty(batch, seq_len, heads, head_k_dim, device=projected.device, dtype=torch.float32)
        erase, write = new(batch, seq_len, heads, head_k_dim), new(batch, seq_len, v_heads, head_v_dim)
        rows = triton.cdiv(seq_len, ROWS)
        common = dict(eps=L2NORM_EPS, WIDTH=width, BS=ROWS)
        conv_fwd_kernel[(rows, batch, 2 * heads)](
            projected, conv_weight, positions, q, k, seq_len, batch, C, 0, heads, head_k_dim,
            NORM=True, BD=triton.next_power_of_2(head_k_dim), **common)
        conv_fwd_kernel[(rows, batch, v_heads)](
            projected, conv_weight, positions, v, v, seq_len, batch, C, 2 * key_dim, v_heads, head_v_dim,
            NORM=False, BD=triton.next_power_of_2(head_v_dim), **common)
        decay_fwd_kernel[_column_grid(seq_len, batch, key_dim)](
            decay, A_log, dt_bias, g, seq_len, batch, key_dim, head_k_dim, BS=ROWS, BC=GATE_COLS)
        _sigmoid_gates(projected, None, (erase, write), key_dim, value_dim, erase_scale, backward=False)
        ctx.save_for_backward(projected, conv_weight, positions, decay, A_log, dt_bias)
        ctx.dims = (erase_scale, head_k_dim, head_v_dim)
        return q, k, v, g, erase, write

    @staticmethod
    def backward(ctx, dq, dk, dv, dg, de, dwr):
        projected, conv_weight, positions, decay, A_log, dt_bias = ctx.saved_tensors
        erase_scale, head_k_dim, head_v_dim = ctx.dims
        seq_len, batch, C = projected.shape
        key_dim, value_dim = split_widths(conv_weight, decay)
        heads, v_heads = key_dim // head_k_dim, value_dim // head_v_dim
        width, conv_channels = conv_weight.shape[1], conv_weight.shape[0]
        # autograd materialises missing output gradients as zeros
        dq, dk, dv, dg, de, dwr = (x.contiguous() for x in (dq, dk, dv, dg, de, dwr))
        rows = triton.cdiv(seq_len, ROWS)
        dp = torch.empty_like(projected)
        # the pre-activation gradient of the conv channels, in the training dtype: each input row
        # then gathers it from the WIDTH rows whose taps reach it
        dc = projected.new_empty(seq_len, batch, conv_channels)
        dw_part = torch.empty(rows, batch, conv_channels, width, device=projected.device, dtype=torch.float32)
        common = dict(eps=L2NORM_EPS, WIDTH=width, BS=ROWS)
        conv_act_bwd_kernel[(rows, batch, 2 * heads)](
            projected, conv_weight, positions, dq, dk, dc, dw_part, seq_len, batch, C, 0, heads,
            head_k_dim, conv_channels, NORM=True, BD=triton.next_power_of_2(head_k_dim), **common)
        conv_act_bwd_kernel[(rows, batch, v_heads)](
            projected, conv_weight, positions, dv, dv, dc, dw_part, seq_len, batch, C, 2 * key_dim,
            v_heads, head_v_dim, conv_channels, NORM=False, BD=triton.next_power_of_2(head_v_dim), **common)
        conv_dx_kernel[_column_grid(seq_len, batch, conv_channels)](
            dc, conv_weight, positions, dp, seq_len, batch, C, conv_channels, WIDTH=width, BS=ROWS,
            BC=GATE_COLS)
        ddecay = torch.empty_like(decay)
        dbias_part = torch.empty(rows, batch, key_dim, device=projected.device, dtype=torch.float32)
        dalog_part = torch.empty_like(dbias_part)
        decay_bwd_kernel[_column_grid(seq_len, batch, key_dim)](
            decay, A_log, dt_bias, dg, ddecay, dbias_part, dalog_part, seq_len, batch, key_dim,
            head_k_dim, BS=ROWS, BC=GATE_COLS)
        _sigmoid_gates(projected, (de, dwr), dp, key_dim, value_dim, erase_scale, backward=True)
        d_conv = dw_part.sum((0, 1)).to(conv_weight.dtype)
        d_bias = dbias_part.sum((0, 1)).to(dt_bias.dtype)
        d_alog = dalog_part.sum((0, 1)).view(heads, head_k_dim).sum(1).to(A_log.dtype)
        return dp, d_conv, None, ddecay, d_alog, d_bias, None, None, None


def mixer_inputs_triton(projected, conv_weight, positions, decay, A_log, dt_bias, erase_scale,
                        head_k_dim, head_v_dim):
    return MixerInputsFunction.apply(projected, conv_weight, positions, decay, A_log, dt_bias,
                                     erase_scale, head_k_dim, head_v_dim)
