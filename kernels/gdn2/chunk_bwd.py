"""Per-chunk backward kernels (after the state-gradient pass).

chunk_bwd_wy_kernel, one program per (chunk, head), loops over value blocks:
    R = U - Y S0 (recomputed), dV' = A^T dR (V' = Z - Ebar S0 is the right-hand side of R = A V'),
    dv = dV' w, dw = dV' v, dAqk = causal(dO R^T), dT = -strict(dV' R^T);
    writes R and dV' for the next kernel and dAqk, dT as fp32 16x16 blocks.
chunk_bwd_qkg_kernel, one program per (chunk, head, key block), loops over value blocks:
    dQg = dO S0^T, dEbar = -dV' S0^T, dKtail = R dS^T, then the intra-chunk products through dAqk and
    dT (same safe factoring as the forward), and dg: every place exp(G_r)
    appears contributes x * dx (+ for q and the erase key e = b k, - for the key columns), plus the
    chunk-end terms, then a reverse cumulative sum over the chunk.
"""
import triton
import triton.language as tl

from .chunk_common import (
    chunk_coords,
    cumsum_blocks,
    diag_grads,
    load_tile,
    mm,
    mm_solve,
    offdiag_factors,
    store_lower_blocks,
    store_tile,
)


@triton.jit
def _blk(ptr, row, col):
    """16x16 block (row, col) of a chunk's 64x64 matrix."""
    return load_tile(ptr, 64, row, 64, col, 64, 16, 16)


@triton.jit
def _store_scaled(out, x, stride, row, L, col, V: tl.constexpr, BV: tl.constexpr, d):
    """out = d * x on one 16-row sub-block (dv = dZ w, dw = dZ v)."""
    store_tile(out, stride, row, L, col, V, d * load_tile(x, stride, row, L, col, V, 16, BV).to(tl.float32))


@triton.jit(do_not_specialize=["N", "NT"])
def chunk_bwd_wy_kernel(
    v, w, do, y, u, a, states, dr,
    r_out, dvp_out, daqk_out, dt_out, dv, dw,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N, NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n, bos, eos, row0 = chunk_coords(i_c, cu_seqlens, chunk_offsets, seq_of_chunk)
    if i_n >= N:
        return
    DT: tl.constexpr = y.dtype.element_ty
    L = eos - bos
    base = (i_c * H + i_h) * 64
    SV = H * V
    v += (bos * H + i_h) * V
    w += (bos * H + i_h) * V
    do += (bos * H + i_h) * V
    dv += (bos * H + i_h) * V
    dw += (bos * H + i_h) * V
    y += base * K
    u += base * V
    dr += base * V
    r_out += base * V
    dvp_out += base * V
    a += base * 64
    daqk_out += base * 64
    dt_out += base * 64
    states += (i_c * H + i_h) * BK * V

    y0 = load_tile(y, K, 0, 64, 0, K, 16, BK)
    y1 = load_tile(y, K, 16, 64, 0, K, 16, BK)
    y2 = load_tile(y, K, 32, 64, 0, K, 16, BK)
    y3 = load_tile(y, K, 48, 64, 0, K, 16, BK)
    # transposed blocks of the inverse, A_ji^T for j >= i
    a00 = tl.trans(_blk(a, 0, 0))
    a10 = tl.trans(_blk(a, 16, 0))
    a11 = tl.trans(_blk(a, 16, 16))
    a20 = tl.trans(_blk(a, 32, 0))
    a21 = tl.trans(_blk(a, 32, 16))
    a22 = tl.trans(_blk(a, 32, 32))
    a30 = tl.trans(_blk(a, 48, 0))
    a31 = tl.trans(_blk(a, 48, 16))
    a32 = tl.trans(_blk(a, 48, 32))
    a33 = tl.trans(_blk(a, 48, 48))

    dA00 = tl.zeros([16, 16], dtype=tl.float32)
    dA10 = tl.zeros([16, 16], dtype=tl.float32)
    dA11 = tl.zeros([16, 16], dtype=tl.float32)
    dA20 = tl.zeros([16, 16], dtype=tl.float32)
    dA21 = tl.zeros([16, 16], dtype=tl.float32)
    dA22 = tl.zeros([16, 16], dtype=tl.float32)
    dA30 = tl.zeros([16, 16], dtype=tl.float32)
    dA31 = tl.zeros([16, 16], dtype=tl.float32)
    dA32 = tl.zeros([16, 16], dtype=tl.float32)
    dA33 = tl.zeros([16, 16], dtype=tl.float32)
    dT00 = tl.zeros([16, 16], dtype=tl.float32)
    dT10 = tl.zeros([16, 16], dtype=tl.float32)
    dT11 = tl.zeros([16, 16], dtype=tl.float32)
    dT20 = tl.zeros([16, 16], dtype=tl.float32)
    dT21 = tl.zeros([16, 16], dtype=tl.float32)
    dT22 = tl.zeros([16, 16], dtype=tl.float32)
    dT30 = tl.zeros([16, 16], dtype=tl.float32)
    dT31 = tl.zeros([16, 16], dtype=tl.float32)
    dT32 = tl.zeros([16, 16], dtype=tl.float32)
    dT33 = tl.zeros([16, 16], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        cv = i_v * BV
        s0 = load_tile(states, V, 0, BK, cv, V, BK, BV)
        r0 = (load_tile(u, V, 0, 64, cv, V, 16, BV).to(tl.float32) - mm(y0, s0, DT)).to(DT)
        r1 = (load_tile(u, V, 16, 64, cv, V, 16, BV).to(tl.float32) - mm(y1, s0, DT)).to(DT)
        r2 = (load_tile(u, V, 32, 64, cv, V, 16, BV).to(tl.float32) - mm(y2, s0, DT)).to(DT)
        r3 = (load_tile(u, V, 48, 64, cv, V, 16, BV).to(tl.float32) - mm(y3, s0, DT)).to(DT)
        store_tile(r_out, V, 0, 64, cv, V, r0)
        store_tile(r_out, V, 16, 64, cv, V, r1)
        store_tile(r_out, V, 32, 64, cv, V, r2)
        store_tile(r_out, V, 48, 64, cv, V, r3)
        dr0 = load_tile(dr, V, 0, 64, cv, V, 16, BV)
        dr1 = load_tile(dr, V, 16, 64, cv, V, 16, BV)
        dr2 = load_tile(dr, V, 32, 64, cv, V, 16, BV)
        dr3 = load_tile(dr, V, 48, 64, cv, V, 16, BV)
        dp3 = mm_solve(a33, dr3, DT)
        dp2 = mm_solve(a22, dr2, DT) + mm_solve(a32, dr3, DT)
        dp1 = mm_solve(a11, dr1, DT) + mm_solve(a21, dr2, DT) + mm_solve(a31, dr3, DT)
        dp0 = (mm_solve(a00, dr0, DT) + mm_solve(a10, dr1, DT) + mm_solve(a20, dr2, DT)
               + mm_solve(a30, dr3, DT))
        store_tile(dvp_out, V, 0, 64, cv, V, dp0)
        store_tile(dvp_out, V, 16, 64, cv, V, dp1)
        store_tile(dvp_out, V, 32, 64, cv, V, dp2)
        store_tile(dvp_out, V, 48, 64, cv, V, dp3)
        _store_scaled(dv, w, SV, row0, L, cv, V, BV, dp0)
        _store_scaled(dv, w, SV, row0 + 16, L, cv, V, BV, dp1)
        _store_scaled(dv, w, SV, row0 + 32, L, cv, V, BV, dp2)
        _store_scaled(dv, w, SV, row0 + 48, L, cv, V, BV, dp3)
        _store_scaled(dw, v, SV, row0, L, cv, V, BV, dp0)
        _store_scaled(dw, v, SV, row0 + 16, L, cv, V, BV, dp1)
        _store_scaled(dw, v, SV, row0 + 32, L, cv, V, BV, dp2)
        _store_scaled(dw, v, SV, row0 + 48, L, cv, V, BV, dp3)
        do0 = load_tile(do, SV, row0, L, cv, V, 16, BV)
        do1 = load_tile(do, SV, row0 + 16, L, cv, V, 16, BV)
        do2 = load_tile(do, SV, row0 + 32, L, cv, V, 16, BV)
        do3 = load_tile(do, SV, row0 + 48, L, cv, V, 16, BV)
        rt0 = tl.trans(r0)
        rt1 = tl.trans(r1)
        rt2 = tl.trans(r2)
        rt3 = tl.trans(r3)
        dA00 += mm(do0, rt0, DT)
        dA10 += mm(do1, rt0, DT)
        dA11 += mm(do1, rt1, DT)
        dA20 += mm(do2, rt0, DT)
        dA21 += mm(do2, rt1, DT)
        dA22 += mm(do2, rt2, DT)
        dA30 += mm(do3, rt0, DT)
        dA31 += mm(do3, rt1, DT)
        dA32 += mm(do3, rt2, DT)
        dA33 += mm(do3, rt3, DT)
        dT00 -= mm(dp0, rt0, DT)
        dT10 -= mm(dp1, rt0, DT)
        dT11 -= mm(dp1, rt1, DT)
        dT20 -= mm(dp2, rt0, DT)
        dT21 -= mm(dp2, rt1, DT)
        dT22 -= mm(dp2, rt2, DT)
        dT30 -= mm(dp3, rt0, DT)
        dT31 -= mm(dp3, rt1, DT)
        dT32 -= mm(dp3, rt2, DT)
        dT33 -= mm(dp3, rt3, DT)

    rr = tl.arange(0, 16)
    causal = rr[:, None] >= rr[None, :]
    strict = rr[:, None] > rr[None, :]
    store_lower_blocks(daqk_out, dA00, dA10, dA11, dA20, dA21, dA22, dA30, dA31, dA32, dA33, causal)
    store_lower_blocks(dt_out, dT00, dT10, dT11, dT20, dT21, dT22, dT30, dT31, dT32, dT33, strict)


@triton.jit
def _state_grads(do, r, dvp, SV, L, row0, row, cv, V: tl.constexpr, BV: tl.constexpr, s0t, dst, dq, de, dkt,
                 DT: tl.constexpr):
    """Accumulates dO S0^T, -dV' S0^T and R dS^T of one 16-row sub-block and one value block."""
    dq += mm(load_tile(do, SV, row0 + row, L, cv, V, 16, BV), s0t, DT)
    de -= mm(load_tile(dvp, V, row, 64, cv, V, 16, BV), s0t, DT)
    dkt += mm(load_tile(r, V, row, 64, cv, V, 16, BV), dst, DT)
    return dq, de, dkt


@triton.jit
def _offdiag_grads(dA, dT, kc, qr, er, DT: tl.constexpr):
    """Sub-block i against earlier sub-block j through the factored operands kc = k_j Cf_ij,
    qr = q_i Rf_i, er = e_i Rf_i: the row-side (before * Rf_i) and column-side (before * Cf_ij) parts."""
    dq = mm(dA, kc, DT)
    de = mm(dT, kc, DT)
    dk = mm(tl.trans(dA), qr, DT) + mm(tl.trans(dT), er, DT)
    return dq, de, dk


@triton.jit
def _rev_cumsum(dG, tail):
    """Reverse cumulative sum of a [16, BK] tile plus the sum of all later rows (tail)."""
    return tl.cumsum(dG, 0, reverse=True) + tail[None, :]


@triton.jit(do_not_specialize=["N", "NT"])
def chunk_bwd_qkg_kernel(
    q, k, g, b, do, states, dstates, r_in, dvp_in, daqk, dtm,
    dq, dk, dg, db,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_k = tl.program_id(2)
    i_n, bos, eos, row0 = chunk_coords(i_c, cu_seqlens, chunk_offsets, seq_of_chunk)
    if i_n >= N:
        return
    DT: tl.constexpr = do.dtype.element_ty
    L = eos - bos
    base = (i_c * H + i_h) * 64
    ck = i_k * BK
    SK = H * K
    SV = H * V
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    g += (bos * H + i_h) * K
    b += (bos * H + i_h) * K
    dq += (bos * H + i_h) * K
    dk += (bos * H + i_h) * K
    dg += (bos * H + i_h) * K
    db += (bos * H + i_h) * K
    do += (bos * H + i_h) * V
    r_in += base * V
    dvp_in += base * V
    daqk += base * 64
    dtm += base * 64
    states += (i_c * H + i_h) * BKS * V
    dstates += (i_c * H + i_h) * BKS * V

    # dQg (into dq*), dEbar (into de*) and dKtail (into dk*) from the state products
    dq0 = tl.zeros([16, BK], dtype=tl.float32)
    dq1 = tl.zeros([16, BK], dtype=tl.float32)
    dq2 = tl.zeros([16, BK], dtype=tl.float32)
    dq3 = tl.zeros([16, BK], dtype=tl.float32)
    de0 = tl.zeros([16, BK], dtype=tl.float32)
    de1 = tl.zeros([16, BK], dtype=tl.float32)
    de2 = tl.zeros([16, BK], dtype=tl.float32)
    de3 = tl.zeros([16, BK], dtype=tl.float32)
    dk0 = tl.zeros([16, BK], dtype=tl.float32)
    dk1 = tl.zeros([16, BK], dtype=tl.float32)
    dk2 = tl.zeros([16, BK], dtype=tl.float32)
    dk3 = tl.zeros([16, BK], dtype=tl.float32)
    dgc = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        cv = i_v * BV
        s0 = load_tile(states, V, ck, BKS, cv, V, BK, BV)
        ds = load_tile(dstates, V, ck, BKS, cv, V, BK, BV)
        dgc += tl.sum(s0.to(tl.float32) * ds.to(tl.float32), 1)
        s0t = tl.trans(s0)
        dst = tl.trans(ds)
        dq0, de0, dk0 = _state_grads(do, r_in, dvp_in, SV, L, row0,
                                     0, cv, V, BV, s0t, dst, dq0, de0, dk0, DT)
        dq1, de1, dk1 = _state_grads(do, r_in, dvp_in, SV, L, row0,
                                     16, cv, V, BV, s0t, dst, dq1, de1, dk1, DT)
        dq2, de2, dk2 = _state_grads(do, r_in, dvp_in, SV, L, row0,
                                     32, cv, V, BV, s0t, dst, dq2, de2, dk2, DT)
        dq3, de3, dk3 = _state_grads(do, r_in, dvp_in, SV, L, row0,
                                     48, cv, V, BV, s0t, dst, dq3, de3, dk3, DT)

    q0 = load_tile(q, SK, row0, L, ck, K, 16, BK).to(tl.float32)
    q1 = load_tile(q, SK, row0 + 16, L, ck, K, 16, BK).to(tl.float32)
    q2 = load_tile(q, SK, row0 + 32, L, ck, K, 16, BK).to(tl.float32)
    q3 = load_tile(q, SK, row0 + 48, L, ck, K, 16, BK).to(tl.float32)
    k0 = load_tile(k, SK, row0, L, ck, K, 16, BK).to(tl.float32)
    k1 = load_tile(k, SK, row0 + 16, L, ck, K, 16, BK).to(tl.float32)
    k2 = load_tile(k, SK, row0 + 32, L, ck, K, 16, BK).to(tl.float32)
    k3 = load_tile(k, SK, row0 + 48, L, ck, K, 16, BK).to(tl.float32)
    g0 = load_tile(g, SK, row0, L, ck, K, 16, BK).to(tl.float32)
    g1 = load_tile(g, SK, row0 + 16, L, ck, K, 16, BK).to(tl.float32)
    g2 = load_tile(g, SK, row0 + 32, L, ck, K, 16, BK).to(tl.float32)
    g3 = load_tile(g, SK, row0 + 48, L, ck, K, 16, BK).to(tl.float32)
    b0 = load_tile(b, SK, row0, L, ck, K, 16, BK).to(tl.float32)
    b1 = load_tile(b, SK, row0 + 16, L, ck, K, 16, BK).to(tl.float32)
    b2 = load_tile(b, SK, row0 + 32, L, ck, K, 16, BK).to(tl.float32)
    b3 = load_tile(b, SK, row0 + 48, L, ck, K, 16, BK).to(tl.float32)
    e0 = b0 * k0
    e1 = b1 * k1
    e2 = b2 * k2
    e3 = b3 * k3
    G0, G1, G2, G3, c1, c2, c3, gC = cumsum_blocks(g0, g1, g2, g3)

    # raw gradients of the state products: Qg = scale q e^G, Ebar = e e^G, Ktail = k e^(G_C - G)
    x = tl.exp(G0)
    dq0 = dq0 * x * scale
    de0 = de0 * x
    x = tl.exp(G1)
    dq1 = dq1 * x * scale
    de1 = de1 * x
    x = tl.exp(G2)
    dq2 = dq2 * x * scale
    de2 = de2 * x
    x = tl.exp(G3)
    dq3 = dq3 * x * scale
    de3 = de3 * x
    dk0 = dk0 * tl.exp(gC[None, :] - G0)
    dk1 = dk1 * tl.exp(gC[None, :] - G1)
    dk2 = dk2 * tl.exp(gC[None, :] - G2)
    dk3 = dk3 * tl.exp(gC[None, :] - G3)
    # d/dG_C of exp(G_C) S0 and of the G_C inside Ktail
    dgc = dgc * tl.exp(gC) + tl.sum(k0 * dk0 + k1 * dk1 + k2 * dk2 + k3 * dk3, 0)

    # intra-chunk products through dAqk (times scale) and dT
    x0, y0, z0 = diag_grads(q0, e0, k0, g0, _blk(daqk, 0, 0) * scale, _blk(dtm, 0, 0), DT)
    dq0 += x0
    de0 += y0
    dk0 += z0
    x0, y0, z0 = diag_grads(q1, e1, k1, g1, _blk(daqk, 16, 16) * scale,
                            _blk(dtm, 16, 16), DT)
    dq1 += x0
    de1 += y0
    dk1 += z0
    x0, y0, z0 = diag_grads(q2, e2, k2, g2, _blk(daqk, 32, 32) * scale,
                            _blk(dtm, 32, 32), DT)
    dq2 += x0
    de2 += y0
    dk2 += z0
    x0, y0, z0 = diag_grads(q3, e3, k3, g3, _blk(daqk, 48, 48) * scale,
                            _blk(dtm, 48, 48), DT)
    dq3 += x0
    de3 += y0
    dk3 += z0

    Rf1, Rf2, Rf3, Cf10, Cf20, Cf30, Cf21, Cf31, Cf32 = offdiag_factors(G0, G1, G2, G3, c1, c2, c3)
    qr1 = q1 * Rf1
    qr2 = q2 * Rf2
    qr3 = q3 * Rf3
    er1 = e1 * Rf1
    er2 = e2 * Rf2
    er3 = e3 * Rf3
    # row block 1 against 0
    xq, xe, xk = _offdiag_grads(_blk(daqk, 16, 0) * scale, _blk(dtm, 16, 0),
                                k0 * Cf10, qr1, er1, DT)
    dq1 += xq * Rf1
    de1 += xe * Rf1
    dk0 += xk * Cf10
    # row block 2 against 0 and 1
    xq, xe, xk = _offdiag_grads(_blk(daqk, 32, 0) * scale, _blk(dtm, 32, 0),
                                k0 * Cf20, qr2, er2, DT)
    yq, ye, yk = _offdiag_grads(_blk(daqk, 32, 16) * scale, _blk(dtm, 32, 16),
                                k1 * Cf21, qr2, er2, DT)
    dq2 += (xq + yq) * Rf2
    de2 += (xe + ye) * Rf2
    dk0 += xk * Cf20
    dk1 += yk * Cf21
    # row block 3 against 0, 1 and 2
    xq, xe, xk = _offdiag_grads(_blk(daqk, 48, 0) * scale, _blk(dtm, 48, 0),
                                k0 * Cf30, qr3, er3, DT)
    yq, ye, yk = _offdiag_grads(_blk(daqk, 48, 16) * scale, _blk(dtm, 48, 16),
                                k1 * Cf31, qr3, er3, DT)
    zq, ze, zk = _offdiag_grads(_blk(daqk, 48, 32) * scale, _blk(dtm, 48, 32),
                                k2 * Cf32, qr3, er3, DT)
    dq3 += (xq + yq + zq) * Rf3
    de3 += (xe + ye + ze) * Rf3
    dk0 += xk * Cf30
    dk1 += yk * Cf31
    dk2 += zk * Cf32

    # dG per row: + q dq + e de - k dk (column side), then reverse cumsum; chunk-end terms on every row
    dG0 = q0 * dq0 + e0 * de0 - k0 * dk0
    dG1 = q1 * dq1 + e1 * de1 - k1 * dk1
    dG2 = q2 * dq2 + e2 * de2 - k2 * dk2
    dG3 = q3 * dq3 + e3 * de3 - k3 * dk3
    t3 = dgc
    t2 = t3 + tl.sum(dG3, 0)
    t1 = t2 + tl.sum(dG2, 0)
    t0 = t1 + tl.sum(dG1, 0)
    store_tile(dg, SK, row0, L, ck, K, _rev_cumsum(dG0, t0))
    store_tile(dg, SK, row0 + 16, L, ck, K, _rev_cumsum(dG1, t1))
    store_tile(dg, SK, row0 + 32, L, ck, K, _rev_cumsum(dG2, t2))
    store_tile(dg, SK, row0 + 48, L, ck, K, _rev_cumsum(dG3, t3))

    # e = b k: db = de k, dk += de b
    store_tile(db, SK, row0, L, ck, K, de0 * k0)
    store_tile(db, SK, row0 + 16, L, ck, K, de1 * k1)
    store_tile(db, SK, row0 + 32, L, ck, K, de2 * k2)
    store_tile(db, SK, row0 + 48, L, ck, K, de3 * k3)
    dk0 += de0 * b0
    dk1 += de1 * b1
    dk2 += de2 * b2
    dk3 += de3 * b3
    store_tile(dq, SK, row0, L, ck, K, dq0)
    store_tile(dq, SK, row0 + 16, L, ck, K, dq1)
    store_tile(dq, SK, row0 + 32, L, ck, K, dq2)
    store_tile(dq, SK, row0 + 48, L, ck, K, dq3)
    store_tile(dk, SK, row0, L, ck, K, dk0)
    store_tile(dk, SK, row0 + 16, L, ck, K, dk1)
    store_tile(dk, SK, row0 + 32, L, ck, K, dk2)
    store_tile(dk, SK, row0 + 48, L, ck, K, dk3)
