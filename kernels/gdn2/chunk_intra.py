"""Per-chunk forward kernels: everything about a chunk that does not depend on the entering state.

Four launches, each small enough to run without register spills:
  chunk_cumsum_kernel   (chunk, head):       G = cumsum(g) in fp32 (chunk-major) and G_C
  chunk_scores_kernel   (chunk, head, i):    row sub-block i of Aqk (times scale) and T
  chunk_solve_kernel    (chunk, head):       A = (I + T)^-1 (fp32, 16x16 blocks then combination)
  chunk_wy_fwd_kernel   (chunk, head):       Y = A Ebar, U = A Z, Qg = scale q e^G, Ktail = k e^(G_C - G)
Inputs are token-major ([tokens, H, D], rows past a sequence's end read as zeros, so G stays
constant there and G at row 63 is G_C); the per-chunk outputs are chunk-major, 64 rows per chunk
and head.
"""
import triton
import triton.language as tl

from .chunk_common import (
    chunk_program,
    diag_factors_safe,
    load_row,
    load_tile,
    mm,
    mm_exact,
    mm_solve,
    store_tile,
    unit_lower_inverse,
)


@triton.jit(do_not_specialize=["N"])
def chunk_cumsum_kernel(
    g, G_out, gc_out,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BKC: tl.constexpr,
):
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk)
    if i_n >= N:
        return
    g += (bos * H + i_h) * K
    G_out += (i_c * H + i_h) * 64 * K
    gc_out += (i_c * H + i_h) * BK
    for kc in range(0, BK, BKC):
        x = load_tile(g, H * K, row0, eos - bos, kc, K, 64, BKC).to(tl.float32)
        store_tile(G_out, K, 0, 64, kc, K, tl.cumsum(x, 0))
        # padding channels (K < BK) get G_C = 0: the state kernels read all BK entries
        tl.store(gc_out + kc + tl.arange(0, BKC), tl.sum(x, 0))


@triton.jit(do_not_specialize=["N"])
def chunk_scores_kernel(
    q, k, b, G, aqk_out, t_out,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N, scale,
    H: tl.constexpr, K: tl.constexpr, BKC: tl.constexpr, OFFDIAG: tl.constexpr,
):
    """Blocks (i, j <= i) of Aqk[r, s] = scale sum_c q_rc k_sc exp(G_rc - G_sc) (r >= s) and
    T[r, s] = sum_c b_rc k_rc k_sc exp(G_rc - G_sc) (r > s) (only the diagonal block (i, i) without
    OFFDIAG: chunk_offdiag_solve_kernel computes the others); zeros in Aqk's blocks (i, j > i)."""
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk)
    i_i = tl.program_id(2)
    if i_n >= N:
        return
    DT: tl.constexpr = q.dtype.element_ty
    L = eos - bos
    SK = H * K
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    b += (bos * H + i_h) * K
    G += (i_c * H + i_h) * 64 * K
    aqk_out += (i_c * H + i_h) * 64 * 64
    t_out += (i_c * H + i_h) * 64 * 64
    li = i_i * 16
    ri = row0 + li

    # earlier sub-blocks j through the row before sub-block i
    if OFFDIAG:
        for j in range(0, i_i):
            a = tl.zeros([16, 16], dtype=tl.float32)
            t = tl.zeros([16, 16], dtype=tl.float32)
            for kc in range(0, K, BKC):
                c = load_row(G, K, li - 1, 64, kc, K, BKC)
                rf = tl.exp(load_tile(G, K, li, 64, kc, K, 16, BKC) - c[None, :])
                ki = load_tile(k, SK, ri, L, kc, K, 16, BKC).to(tl.float32)
                qr = load_tile(q, SK, ri, L, kc, K, 16, BKC).to(tl.float32) * rf
                er = load_tile(b, SK, ri, L, kc, K, 16, BKC).to(tl.float32) * ki * rf
                kj = load_tile(k, SK, row0 + j * 16, L, kc, K, 16, BKC).to(tl.float32)
                kf = tl.trans(kj * tl.exp(c[None, :] - load_tile(G, K, j * 16, 64, kc, K, 16, BKC)))
                a += mm(qr, kf, DT)
                t += mm(er, kf, DT)
            store_tile(aqk_out, 64, li, 64, j * 16, 64, a * scale)
            store_tile(t_out, 64, li, 64, j * 16, 64, t)

    # the diagonal sub-block
    r = tl.arange(0, 16)
    a = tl.zeros([16, 16], dtype=tl.float32)
    t = tl.zeros([16, 16], dtype=tl.float32)
    for kc in range(0, K, BKC):
        Gi = load_tile(G, K, li, 64, kc, K, 16, BKC)
        ki = load_tile(k, SK, ri, L, kc, K, 16, BKC).to(tl.float32)
        qi = load_tile(q, SK, ri, L, kc, K, 16, BKC).to(tl.float32)
        ei = load_tile(b, SK, ri, L, kc, K, 16, BKC).to(tl.float32) * ki
        Gm = load_row(G, K, li + 7, 64, kc, K, BKC)
        if diag_factors_safe(Gi, Gm):
            rf = tl.exp(Gi - Gm[None, :])
            kf = tl.trans(ki * tl.exp(Gm[None, :] - Gi))
            a += mm(qi * rf, kf, DT)
            t += mm(ei * rf, kf, DT)
        else:
            for s in range(0, 16):
                ks = load_row(k, SK, ri + s, L, kc, K, BKC).to(tl.float32)
                Gs = load_row(G, K, li + s, 64, kc, K, BKC)
                kf = ks[None, :] * tl.exp(tl.where(r[:, None] >= s, Gi - Gs[None, :], float("-inf")))
                col = r[None, :] == s
                a += tl.where(col, tl.sum(qi * kf, 1)[:, None], 0.0)
                t += tl.where(col, tl.sum(ei * kf, 1)[:, None], 0.0)
    store_tile(aqk_out, 64, li, 64, li, 64, tl.where(r[:, None] >= r[None, :], a * scale, 0.0))
    store_tile(t_out, 64, li, 64, li, 64, tl.where(r[:, None] > r[None, :], t, 0.0))
    zero = tl.zeros([16, 16], dtype=tl.float32)
    for j in range(i_i + 1, 4):
        store_tile(aqk_out, 64, li, 64, j * 16, 64, zero)


@triton.jit
def _tblk(t, i, j):
    return load_tile(t, 64, i * 16, 64, j * 16, 64, 16, 16)


@triton.jit
def _store_block_row(ptr, i, b0, b1, b2, b3):
    """Row i of 16x16 blocks of a chunk's 64x64 matrix."""
    store_tile(ptr, 64, i * 16, 64, 0, 64, b0)
    store_tile(ptr, 64, i * 16, 64, 16, 64, b1)
    store_tile(ptr, 64, i * 16, 64, 32, 64, b2)
    store_tile(ptr, 64, i * 16, 64, 48, 64, b3)


@triton.jit
def _invert_and_store(T00, T11, T22, T33, T10, T20, T30, T21, T31, T32, a_out, DT: tl.constexpr):
    """A = (I + T)^-1 by blocks: A_ii by unit_lower_inverse, A_ij = -A_ii sum_{j <= l < i} T_il A_lj.
    All 16 blocks are written (zeros above the diagonal) so later kernels load A as one tile."""
    I00 = unit_lower_inverse(T00, DT)
    I11 = unit_lower_inverse(T11, DT)
    I22 = unit_lower_inverse(T22, DT)
    I33 = unit_lower_inverse(T33, DT)
    I10 = -mm_exact(I11, mm_exact(T10, I00, DT), DT)
    I21 = -mm_exact(I22, mm_exact(T21, I11, DT), DT)
    I32 = -mm_exact(I33, mm_exact(T32, I22, DT), DT)
    I20 = -mm_exact(I22, mm_exact(T20, I00, DT) + mm_exact(T21, I10, DT), DT)
    I31 = -mm_exact(I33, mm_exact(T31, I11, DT) + mm_exact(T32, I21, DT), DT)
    I30 = -mm_exact(I33, mm_exact(T30, I00, DT) + mm_exact(T31, I10, DT) + mm_exact(T32, I20, DT), DT)
    r = tl.arange(0, 16)
    lower = r[:, None] >= r[None, :]
    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_block_row(a_out, 0, tl.where(lower, I00, 0.0), zero, zero, zero)
    _store_block_row(a_out, 1, I10, tl.where(lower, I11, 0.0), zero, zero)
    _store_block_row(a_out, 2, I20, I21, tl.where(lower, I22, 0.0), zero)
    _store_block_row(a_out, 3, I30, I31, I32, tl.where(lower, I33, 0.0))


@triton.jit(do_not_specialize=["N"])
def chunk_solve_kernel(
    t_in, a_out,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N,
    DT: tl.constexpr,
):
    """A = (I + T)^-1 from the ten lower 16x16 blocks of T written by chunk_scores_kernel."""
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk)
    if i_n >= N:
        return
    H = tl.num_programs(1)
    t_in += (i_c * H + i_h) * 64 * 64
    _invert_and_store(_tblk(t_in, 0, 0), _tblk(t_in, 1, 1), _tblk(t_in, 2, 2), _tblk(t_in, 3, 3),
                      _tblk(t_in, 1, 0), _tblk(t_in, 2, 0), _tblk(t_in, 3, 0), _tblk(t_in, 2, 1),
                      _tblk(t_in, 3, 1), _tblk(t_in, 3, 2), a_out + (i_c * H + i_h) * 64 * 64, DT)


@triton.jit(do_not_specialize=["N"])
def chunk_offdiag_solve_kernel(
    q, k, b, G, t_in, aqk_out, a_out,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N, scale,
    H: tl.constexpr, K: tl.constexpr, BKC: tl.constexpr,
):
    """The six off-diagonal blocks of Aqk and T of a chunk (each sub-block i against the earlier ones
    through the row before i, as chunk_scores_kernel does with OFFDIAG) held in registers, then
    A = (I + T)^-1 with the diagonal blocks chunk_scores_kernel wrote: T's off-diagonal blocks never
    reach memory and every sub-block's tiles are loaded once."""
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk)
    if i_n >= N:
        return
    DT: tl.constexpr = q.dtype.element_ty
    L = eos - bos
    SK = H * K
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    b += (bos * H + i_h) * K
    G += (i_c * H + i_h) * 64 * K
    base = (i_c * H + i_h) * 64 * 64
    A10 = tl.zeros([16, 16], dtype=tl.float32)
    A20 = tl.zeros([16, 16], dtype=tl.float32)
    A30 = tl.zeros([16, 16], dtype=tl.float32)
    A21 = tl.zeros([16, 16], dtype=tl.float32)
    A31 = tl.zeros([16, 16], dtype=tl.float32)
    A32 = tl.zeros([16, 16], dtype=tl.float32)
    T10 = tl.zeros([16, 16], dtype=tl.float32)
    T20 = tl.zeros([16, 16], dtype=tl.float32)
    T30 = tl.zeros([16, 16], dtype=tl.float32)
    T21 = tl.zeros([16, 16], dtype=tl.float32)
    T31 = tl.zeros([16, 16], dtype=tl.float32)
    T32 = tl.zeros([16, 16], dtype=tl.float32)
    for kc in range(0, K, BKC):
        G0 = load_tile(G, K, 0, 64, kc, K, 16, BKC)
        G1 = load_tile(G, K, 16, 64, kc, K, 16, BKC)
        G2 = load_tile(G, K, 32, 64, kc, K, 16, BKC)
        c1 = load_row(G, K, 15, 64, kc, K, BKC)[None, :]
        c2 = load_row(G, K, 31, 64, kc, K, BKC)[None, :]
        c3 = load_row(G, K, 47, 64, kc, K, BKC)[None, :]
        k0 = load_tile(k, SK, row0, L, kc, K, 16, BKC).to(tl.float32)
        k1 = load_tile(k, SK, row0 + 16, L, kc, K, 16, BKC).to(tl.float32)
        k2 = load_tile(k, SK, row0 + 32, L, kc, K, 16, BKC).to(tl.float32)
        # column operands k_j exp(c_i - G_j) (<= 1: row 16 i - 1 is at or after every row of j)
        kf10 = tl.trans(k0 * tl.exp(c1 - G0))
        kf20 = tl.trans(k0 * tl.exp(c2 - G0))
        kf30 = tl.trans(k0 * tl.exp(c3 - G0))
        kf21 = tl.trans(k1 * tl.exp(c2 - G1))
        kf31 = tl.trans(k1 * tl.exp(c3 - G1))
        kf32 = tl.trans(k2 * tl.exp(c3 - G2))
        # row operands q_i exp(G_i - c_i) and e_i exp(G_i - c_i) (<= 1)
        rf = tl.exp(G1 - c1)
        q1 = load_tile(q, SK, row0 + 16, L, kc, K, 16, BKC).to(tl.float32) * rf
        e1 = load_tile(b, SK, row0 + 16, L, kc, K, 16, BKC).to(tl.float32) * k1 * rf
        A10 += mm(q1, kf10, DT)
        T10 += mm(e1, kf10, DT)
        rf = tl.exp(G2 - c2)
        q2 = load_tile(q, SK, row0 + 32, L, kc, K, 16, BKC).to(tl.float32) * rf
        e2 = load_tile(b, SK, row0 + 32, L, kc, K, 16, BKC).to(tl.float32) * k2 * rf
        A20 += mm(q2, kf20, DT)
        T20 += mm(e2, kf20, DT)
        A21 += mm(q2, kf21, DT)
        T21 += mm(e2, kf21, DT)
        rf = tl.exp(load_tile(G, K, 48, 64, kc, K, 16, BKC) - c3)
        k3 = load_tile(k, SK, row0 + 48, L, kc, K, 16, BKC).to(tl.float32)
        q3 = load_tile(q, SK, row0 + 48, L, kc, K, 16, BKC).to(tl.float32) * rf
        e3 = load_tile(b, SK, row0 + 48, L, kc, K, 16, BKC).to(tl.float32) * k3 * rf
        A30 += mm(q3, kf30, DT)
        T30 += mm(e3, kf30, DT)
        A31 += mm(q3, kf31, DT)
        T31 += mm(e3, kf31, DT)
        A32 += mm(q3, kf32, DT)
        T32 += mm(e3, kf32, DT)
    store_tile(aqk_out + base, 64, 16, 64, 0, 64, A10 * scale)
    store_tile(aqk_out + base, 64, 32, 64, 0, 64, A20 * scale)
    store_tile(aqk_out + base, 64, 32, 64, 16, 64, A21 * scale)
    store_tile(aqk_out + base, 64, 48, 64, 0, 64, A30 * scale)
    store_tile(aqk_out + base, 64, 48, 64, 16, 64, A31 * scale)
    store_tile(aqk_out + base, 64, 48, 64, 32, 64, A32 * scale)
    t_in += base
    _invert_and_store(_tblk(t_in, 0, 0), _tblk(t_in, 1, 1), _tblk(t_in, 2, 2), _tblk(t_in, 3, 3),
                      T10, T20, T30, T21, T31, T32, a_out + base, DT)


@triton.jit(do_not_specialize=["N"])
def chunk_wy_fwd_kernel(
    q, k, v, b, w, G, gc, a_in,
    qg_out, kt_out, y_out, u_out,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N, scale,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BKC: tl.constexpr,
    BVC: tl.constexpr,
):
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk)
    if i_n >= N:
        return
    DT: tl.constexpr = q.dtype.element_ty
    L = eos - bos
    SK = H * K
    SV = H * V
    base = (i_c * H + i_h) * 64
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    b += (bos * H + i_h) * K
    v += (bos * H + i_h) * V
    w += (bos * H + i_h) * V
    G += base * K
    gc += (i_c * H + i_h) * BK
    A = load_tile(a_in + base * 64, 64, 0, 64, 0, 64, 64, 64)
    for kc in range(0, K, BKC):
        Gt = load_tile(G, K, 0, 64, kc, K, 64, BKC)
        eg = tl.exp(Gt)
        kt = load_tile(k, SK, row0, L, kc, K, 64, BKC).to(tl.float32)
        et = load_tile(b, SK, row0, L, kc, K, 64, BKC).to(tl.float32) * kt
        store_tile(y_out + base * K, K, 0, 64, kc, K, mm_solve(A, et * eg, DT))
        store_tile(qg_out + base * K, K, 0, 64, kc, K,
                   load_tile(q, SK, row0, L, kc, K, 64, BKC).to(tl.float32) * eg * scale)
        c = load_row(gc, 0, 0, 1, kc, K, BKC)
        store_tile(kt_out + base * K, K, 0, 64, kc, K, kt * tl.exp(c[None, :] - Gt))
    for vc in range(0, V, BVC):
        z = (load_tile(w, SV, row0, L, vc, V, 64, BVC).to(tl.float32)
             * load_tile(v, SV, row0, L, vc, V, 64, BVC).to(tl.float32))
        store_tile(u_out + base * V, V, 0, 64, vc, V, mm_solve(A, z, DT))


@triton.jit
def _row(x, i):
    """Row i of a [16, BKC] register tile as a [BKC] vector."""
    return tl.sum(tl.where(tl.arange(0, 16)[:, None] == i, x, 0.0), 0)


@triton.jit
def _diag_block(qi, ei, ki, Gi, DT: tl.constexpr):
    """One key slice's share of a diagonal sub-block of Aqk and T (upper triangle not masked), from
    register tiles: through the middle row on tensor cores when diag_factors_safe, else exact
    column by column."""
    Gm = _row(Gi, 7)
    if diag_factors_safe(Gi, Gm):
        rf = tl.exp(Gi - Gm[None, :])
        kf = tl.trans(ki * tl.exp(Gm[None, :] - Gi))
        a = mm(qi * rf, kf, DT)
        t = mm(ei * rf, kf, DT)
    else:
        r = tl.arange(0, 16)
        a = tl.zeros([16, 16], dtype=tl.float32)
        t = tl.zeros([16, 16], dtype=tl.float32)
        for s in range(0, 16):
            kf = _row(ki, s)[None, :] * tl.exp(tl.where(r[:, None] >= s, Gi - _row(Gi, s)[None, :],
                                                        float("-inf")))
            col = r[None, :] == s
            a += tl.where(col, tl.sum(qi * kf, 1)[:, None], 0.0)
            t += tl.where(col, tl.sum(ei * kf, 1)[:, None], 0.0)
    return a, t


@triton.jit
def _sub_block(q, k, b, g, G_out, row0, L, li, kc, carry,
               SK: tl.constexpr, K: tl.constexpr, BKC: tl.constexpr):
    """Sub-block tiles starting at chunk row li: G (cumsum of g continuing from `carry`, the G of
    the row before; also stored), q, k and e = b k, all fp32 [16, BKC]."""
    G = tl.cumsum(load_tile(g, SK, row0 + li, L, kc, K, 16, BKC).to(tl.float32), 0) + carry[None, :]
    store_tile(G_out, K, li, 64, kc, K, G)
    k_ = load_tile(k, SK, row0 + li, L, kc, K, 16, BKC).to(tl.float32)
    q_ = load_tile(q, SK, row0 + li, L, kc, K, 16, BKC).to(tl.float32)
    e_ = load_tile(b, SK, row0 + li, L, kc, K, 16, BKC).to(tl.float32) * k_
    return G, q_, k_, e_


@triton.jit(do_not_specialize=["N"])
def chunk_intra_fwd_kernel(
    q, k, b, g, G_out, gc_out, aqk_out, a_out,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N, scale,
    H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BKC: tl.constexpr,
):
    """One program per chunk and head: G = cumsum(g) and G_C, all ten blocks of Aqk and T in
    registers (off-diagonal ones through the row before the later block, as chunk_scores_kernel),
    then A = (I + T)^-1. Replaces the cumsum, scores and solve launches; T never reaches memory."""
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk)
    if i_n >= N:
        return
    DT: tl.constexpr = q.dtype.element_ty
    L = eos - bos
    SK = H * K
    q += (bos * H + i_h) * K
    k += (bos * H + i_h) * K
    b += (bos * H + i_h) * K
    g += (bos * H + i_h) * K
    base = (i_c * H + i_h) * 64
    G_out += base * K
    A00 = tl.zeros([16, 16], dtype=tl.float32)
    A10, A11, A20, A21, A22, A30, A31, A32, A33 = A00, A00, A00, A00, A00, A00, A00, A00, A00
    T00, T10, T11, T20, T21, T22, T30, T31, T32, T33 = A00, A00, A00, A00, A00, A00, A00, A00, A00, A00
    for kc in range(0, BK, BKC):
        G0, q0, k0, e0 = _sub_block(q, k, b, g, G_out, row0, L, 0, kc, tl.zeros([BKC], dtype=tl.float32),
                                    SK, K, BKC)
        a, t = _diag_block(q0, e0, k0, G0, DT)
        A00 += a
        T00 += t

        c = _row(G0, 15)[None, :]
        G1, q1, k1, e1 = _sub_block(q, k, b, g, G_out, row0, L, 16, kc, _row(G0, 15), SK, K, BKC)
        a, t = _diag_block(q1, e1, k1, G1, DT)
        A11 += a
        T11 += t
        rf = tl.exp(G1 - c)
        kf = tl.trans(k0 * tl.exp(c - G0))
        A10 += mm(q1 * rf, kf, DT)
        T10 += mm(e1 * rf, kf, DT)

        c = _row(G1, 15)[None, :]
        G2, q2, k2, e2 = _sub_block(q, k, b, g, G_out, row0, L, 32, kc, _row(G1, 15), SK, K, BKC)
        a, t = _diag_block(q2, e2, k2, G2, DT)
        A22 += a
        T22 += t
        rf = tl.exp(G2 - c)
        qr, er = q2 * rf, e2 * rf
        kf = tl.trans(k0 * tl.exp(c - G0))
        A20 += mm(qr, kf, DT)
        T20 += mm(er, kf, DT)
        kf = tl.trans(k1 * tl.exp(c - G1))
        A21 += mm(qr, kf, DT)
        T21 += mm(er, kf, DT)

        c = _row(G2, 15)[None, :]
        G3, q3, k3, e3 = _sub_block(q, k, b, g, G_out, row0, L, 48, kc, _row(G2, 15), SK, K, BKC)
        a, t = _diag_block(q3, e3, k3, G3, DT)
        A33 += a
        T33 += t
        rf = tl.exp(G3 - c)
        qr, er = q3 * rf, e3 * rf
        kf = tl.trans(k0 * tl.exp(c - G0))
        A30 += mm(qr, kf, DT)
        T30 += mm(er, kf, DT)
        kf = tl.trans(k1 * tl.exp(c - G1))
        A31 += mm(qr, kf, DT)
        T31 += mm(er, kf, DT)
        kf = tl.trans(k2 * tl.exp(c - G2))
        A32 += mm(qr, kf, DT)
        T32 += mm(er, kf, DT)
        # padding channels (K < BK) get G_C = 0: the state kernels read all BK entries
        tl.store(gc_out + (i_c * H + i_h) * BK + kc + tl.arange(0, BKC), _row(G3, 15))

    r = tl.arange(0, 16)
    lower = r[:, None] >= r[None, :]
    strict = r[:, None] > r[None, :]
    zero = tl.zeros([16, 16], dtype=tl.float32)
    aqk_out += base * 64
    _store_block_row(aqk_out, 0, tl.where(lower, A00, 0.0) * scale, zero, zero, zero)
    _store_block_row(aqk_out, 1, A10 * scale, tl.where(lower, A11, 0.0) * scale, zero, zero)
    _store_block_row(aqk_out, 2, A20 * scale, A21 * scale, tl.where(lower, A22, 0.0) * scale, zero)
    _store_block_row(aqk_out, 3, A30 * scale, A31 * scale, A32 * scale, tl.where(lower, A33, 0.0) * scale)
    _invert_and_store(tl.where(strict, T00, 0.0), tl.where(strict, T11, 0.0), tl.where(strict, T22, 0.0),
                      tl.where(strict, T33, 0.0), T10, T20, T30, T21, T31, T32, a_out + base * 64, DT)
