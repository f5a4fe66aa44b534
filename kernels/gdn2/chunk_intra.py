"""Intra-chunk forward kernel: everything about one chunk that does not depend on the state.

One program per (chunk, head) computes, from q, k, v, g, b, w of its 64 rows:
  G (cumsum of g, fp32), Aqk and T (16-row sub-blocks, safe decay factoring), A = (I + T)^-1
  (16x16 forward substitution in fp32, then block combination), Y = A Ebar, U = A Z,
  Qg = scale q exp(G) and Ktail = k exp(G_C - G),
and writes Qg, Ktail, Y, U, Aqk, G_C for the state pass and A for the backward.
"""
import triton
import triton.language as tl

from .chunk_common import (
    chunk_coords,
    cumsum_blocks,
    diag_scores,
    load_tile,
    mm,
    mm_exact,
    mm_solve,
    offdiag_factors,
    store_lower_blocks,
    store_tile,
    unit_lower_inverse,
)


@triton.jit
def _load_tiles(q, k, g, b, stride, row, L, kc, K: tl.constexpr, BKC: tl.constexpr, rq, rk):
    """q, k (times their reciprocal row norms), g and e = b k of one 16-row sub-block, fp32."""
    qt = load_tile(q, stride, row, L, kc, K, 16, BKC).to(tl.float32) * rq[:, None]
    kt = load_tile(k, stride, row, L, kc, K, 16, BKC).to(tl.float32) * rk[:, None]
    gt = load_tile(g, stride, row, L, kc, K, 16, BKC).to(tl.float32)
    et = load_tile(b, stride, row, L, kc, K, 16, BKC).to(tl.float32) * kt
    return qt, kt, gt, et


@triton.jit
def _row_norms(q, k, stride, row, L, K: tl.constexpr, BKC: tl.constexpr, USE_L2NORM: tl.constexpr):
    """Reciprocal L2 norms of the q and k rows of one sub-block (ones without the l2norm)."""
    if USE_L2NORM:
        sq = tl.zeros([16], dtype=tl.float32)
        sk = tl.zeros([16], dtype=tl.float32)
        for kc in range(0, K, BKC):
            x = load_tile(q, stride, row, L, kc, K, 16, BKC).to(tl.float32)
            sq += tl.sum(x * x, 1)
            x = load_tile(k, stride, row, L, kc, K, 16, BKC).to(tl.float32)
            sk += tl.sum(x * x, 1)
        return tl.rsqrt(sq + 1e-6), tl.rsqrt(sk + 1e-6)
    else:
        one = tl.full([16], 1.0, dtype=tl.float32)
        return one, one


@triton.jit
def _load_z(v, w, stride, row, L, vc, V: tl.constexpr, BVC: tl.constexpr):
    """Z = w v of one 16-row sub-block, fp32."""
    return (load_tile(w, stride, row, L, vc, V, 16, BVC).to(tl.float32)
            * load_tile(v, stride, row, L, vc, V, 16, BVC).to(tl.float32))


@triton.jit
def _store_qg_kt(qg, kt, row, kc, K: tl.constexpr, q, k, G, gC, scale):
    store_tile(qg, K, row, 64, kc, K, q * tl.exp(G) * scale)
    store_tile(kt, K, row, 64, kc, K, k * tl.exp(gC[None, :] - G))


@triton.jit(do_not_specialize=["N", "NT"])
def chunk_intra_fwd_kernel(
    q, k, v, g, b, w,
    qg_out, kt_out, y_out, u_out, aqk_out, a_out, gc_out,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N, NT, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BKC: tl.constexpr,
    BVC: tl.constexpr, USE_L2NORM: tl.constexpr,
):
    i_c = tl.program_id(0)
    i_h = tl.program_id(1)
    i_n, bos, eos, row0 = chunk_coords(i_c, cu_seqlens, chunk_offsets, seq_of_chunk)
    if i_n >= N:
        return
    DT: tl.constexpr = q.dtype.element_ty
    L = eos - bos
    # per-sequence inputs (rows past the sequence end read as zeros), chunk-major outputs
    S = H * K
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    g += (bos * H + i_h) * K
    b += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    w += (bos * H + i_h) * V
    base = (i_c * H + i_h) * 64
    qg_out += base * K
    kt_out += base * K
    y_out += base * K
    u_out += base * V
    aqk_out += base * 64
    a_out += base * 64
    gc_ptr = gc_out + (i_c * H + i_h) * BK + tl.arange(0, BKC)

    rq0, rk0 = _row_norms(q, k, S, row0, L, K, BKC, USE_L2NORM)
    rq1, rk1 = _row_norms(q, k, S, row0 + 16, L, K, BKC, USE_L2NORM)
    rq2, rk2 = _row_norms(q, k, S, row0 + 32, L, K, BKC, USE_L2NORM)
    rq3, rk3 = _row_norms(q, k, S, row0 + 48, L, K, BKC, USE_L2NORM)

    A00 = tl.zeros([16, 16], dtype=tl.float32)
    A11 = tl.zeros([16, 16], dtype=tl.float32)
    A22 = tl.zeros([16, 16], dtype=tl.float32)
    A33 = tl.zeros([16, 16], dtype=tl.float32)
    A10 = tl.zeros([16, 16], dtype=tl.float32)
    A20 = tl.zeros([16, 16], dtype=tl.float32)
    A30 = tl.zeros([16, 16], dtype=tl.float32)
    A21 = tl.zeros([16, 16], dtype=tl.float32)
    A31 = tl.zeros([16, 16], dtype=tl.float32)
    A32 = tl.zeros([16, 16], dtype=tl.float32)
    T00 = tl.zeros([16, 16], dtype=tl.float32)
    T11 = tl.zeros([16, 16], dtype=tl.float32)
    T22 = tl.zeros([16, 16], dtype=tl.float32)
    T33 = tl.zeros([16, 16], dtype=tl.float32)
    T10 = tl.zeros([16, 16], dtype=tl.float32)
    T20 = tl.zeros([16, 16], dtype=tl.float32)
    T30 = tl.zeros([16, 16], dtype=tl.float32)
    T21 = tl.zeros([16, 16], dtype=tl.float32)
    T31 = tl.zeros([16, 16], dtype=tl.float32)
    T32 = tl.zeros([16, 16], dtype=tl.float32)
    for kc in range(0, K, BKC):
        q0, k0, g0, e0 = _load_tiles(q, k, g, b, S, row0, L, kc, K, BKC, rq0, rk0)
        q1, k1, g1, e1 = _load_tiles(q, k, g, b, S, row0 + 16, L, kc, K, BKC, rq1, rk1)
        q2, k2, g2, e2 = _load_tiles(q, k, g, b, S, row0 + 32, L, kc, K, BKC, rq2, rk2)
        q3, k3, g3, e3 = _load_tiles(q, k, g, b, S, row0 + 48, L, kc, K, BKC, rq3, rk3)
        G0, G1, G2, G3, c1, c2, c3, gC = cumsum_blocks(g0, g1, g2, g3)
        tl.store(gc_ptr + kc, gC, mask=kc + tl.arange(0, BKC) < BK)
        _store_qg_kt(qg_out, kt_out, 0, kc, K, q0, k0, G0, gC, scale)
        _store_qg_kt(qg_out, kt_out, 16, kc, K, q1, k1, G1, gC, scale)
        _store_qg_kt(qg_out, kt_out, 32, kc, K, q2, k2, G2, gC, scale)
        _store_qg_kt(qg_out, kt_out, 48, kc, K, q3, k3, G3, gC, scale)

        # diagonal sub-blocks
        a, t = diag_scores(q0, e0, k0, g0, DT)
        A00 += a
        T00 += t
        a, t = diag_scores(q1, e1, k1, g1, DT)
        A11 += a
        T11 += t
        a, t = diag_scores(q2, e2, k2, g2, DT)
        A22 += a
        T22 += t
        a, t = diag_scores(q3, e3, k3, g3, DT)
        A33 += a
        T33 += t

        # off-diagonal sub-blocks through the row before the later sub-block
        Rf1, Rf2, Rf3, Cf10, Cf20, Cf30, Cf21, Cf31, Cf32 = offdiag_factors(G0, G1, G2, G3, c1, c2, c3)
        qr1 = q1 * Rf1
        qr2 = q2 * Rf2
        qr3 = q3 * Rf3
        er1 = e1 * Rf1
        er2 = e2 * Rf2
        er3 = e3 * Rf3
        kc10 = tl.trans(k0 * Cf10)
        kc20 = tl.trans(k0 * Cf20)
        kc30 = tl.trans(k0 * Cf30)
        kc21 = tl.trans(k1 * Cf21)
        kc31 = tl.trans(k1 * Cf31)
        kc32 = tl.trans(k2 * Cf32)
        A10 += mm(qr1, kc10, DT)
        A20 += mm(qr2, kc20, DT)
        A30 += mm(qr3, kc30, DT)
        A21 += mm(qr2, kc21, DT)
        A31 += mm(qr3, kc31, DT)
        A32 += mm(qr3, kc32, DT)
        T10 += mm(er1, kc10, DT)
        T20 += mm(er2, kc20, DT)
        T30 += mm(er3, kc30, DT)
        T21 += mm(er2, kc21, DT)
        T31 += mm(er3, kc31, DT)
        T32 += mm(er3, kc32, DT)

    r16 = tl.arange(0, 16)
    causal = r16[:, None] >= r16[None, :]
    store_lower_blocks(aqk_out, A00 * scale, A10 * scale, A11 * scale, A20 * scale, A21 * scale, A22 * scale,
                       A30 * scale, A31 * scale, A32 * scale, A33 * scale, causal)

    # A = (I + T)^-1 by blocks: A_ij = -A_ii sum_{j <= l < i} T_il A_lj
    I00 = unit_lower_inverse(T00, DT)
    I11 = unit_lower_inverse(T11, DT)
    I22 = unit_lower_inverse(T22, DT)
    I33 = unit_lower_inverse(T33, DT)
    I10 = -mm_exact(I11, mm_exact(T10, I00, DT), DT)
    I21 = -mm_exact(I22, mm_exact(T21, I11, DT), DT)
    I20 = -mm_exact(I22, mm_exact(T20, I00, DT) + mm_exact(T21, I10, DT), DT)
    I32 = -mm_exact(I33, mm_exact(T32, I22, DT), DT)
    I31 = -mm_exact(I33, mm_exact(T31, I11, DT) + mm_exact(T32, I21, DT), DT)
    I30 = -mm_exact(I33, mm_exact(T30, I00, DT) + mm_exact(T31, I10, DT) + mm_exact(T32, I20, DT), DT)
    store_lower_blocks(a_out, I00, I10, I11, I20, I21, I22, I30, I31, I32, I33, causal)

    # Y = A Ebar with Ebar = e exp(G)
    for kc in range(0, K, BKC):
        _, k0, g0, e0 = _load_tiles(q, k, g, b, S, row0, L, kc, K, BKC, rq0, rk0)
        _, k1, g1, e1 = _load_tiles(q, k, g, b, S, row0 + 16, L, kc, K, BKC, rq1, rk1)
        _, k2, g2, e2 = _load_tiles(q, k, g, b, S, row0 + 32, L, kc, K, BKC, rq2, rk2)
        _, k3, g3, e3 = _load_tiles(q, k, g, b, S, row0 + 48, L, kc, K, BKC, rq3, rk3)
        G0, G1, G2, G3, c1, c2, c3, gC = cumsum_blocks(g0, g1, g2, g3)
        eb0 = e0 * tl.exp(G0)
        eb1 = e1 * tl.exp(G1)
        eb2 = e2 * tl.exp(G2)
        eb3 = e3 * tl.exp(G3)
        store_tile(y_out, K, 0, 64, kc, K, mm_solve(I00, eb0, DT))
        store_tile(y_out, K, 16, 64, kc, K, mm_solve(I10, eb0, DT) + mm_solve(I11, eb1, DT))
        store_tile(y_out, K, 32, 64, kc, K, (mm_solve(I20, eb0, DT) + mm_solve(I21, eb1, DT)
                   + mm_solve(I22, eb2, DT)))
        store_tile(y_out, K, 48, 64, kc, K, (mm_solve(I30, eb0, DT) + mm_solve(I31, eb1, DT)
                   + mm_solve(I32, eb2, DT) + mm_solve(I33, eb3, DT)))
    # U = A Z with Z = w v
    for vc in range(0, V, BVC):
        z0 = _load_z(v, w, H * V, row0, L, vc, V, BVC)
        z1 = _load_z(v, w, H * V, row0 + 16, L, vc, V, BVC)
        z2 = _load_z(v, w, H * V, row0 + 32, L, vc, V, BVC)
        z3 = _load_z(v, w, H * V, row0 + 48, L, vc, V, BVC)
        store_tile(u_out, V, 0, 64, vc, V, mm_solve(I00, z0, DT))
        store_tile(u_out, V, 16, 64, vc, V, mm_solve(I10, z0, DT) + mm_solve(I11, z1, DT))
        store_tile(u_out, V, 32, 64, vc, V, (mm_solve(I20, z0, DT) + mm_solve(I21, z1, DT)
                   + mm_solve(I22, z2, DT)))
        store_tile(u_out, V, 48, 64, vc, V, (mm_solve(I30, z0, DT) + mm_solve(I31, z1, DT)
                   + mm_solve(I32, z2, DT) + mm_solve(I33, z3, DT)))
