"""Per-chunk forward kernels: everything about a chunk that does not depend on the entering state.

Four launches, each small enough to run without register spills (one program per chunk for the
first three was 1.5x slower on the H200: benchmarks/NOTES_kernels.md):
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
    load_block,
    load_row,
    load_tile,
    mm,
    mm_inverse,
    mm_solve,
    store_tile,
    unit_lower_inverse,
)


@triton.jit(do_not_specialize=["N", "T"])
def chunk_cumsum_kernel(
    g, G_out, gc_out,
    cu_seqlens, chunk_offsets, seq_of_chunk, T,
    N,
    VARLEN: tl.constexpr, H: tl.constexpr, K: tl.constexpr, BK: tl.constexpr, BKC: tl.constexpr,
):
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk, T, VARLEN)
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


@triton.jit
def _diag_block(a, t, qi, ki, ei, Gi, Gm, DT: tl.constexpr):
    """Adds one key slice of a diagonal block of Aqk (unscaled) and T, upper triangles unmasked:
    through the middle row Gm on tensor cores when the block's decay span allows it, else exactly,
    column by column with the upper triangle masked before the exponential."""
    if diag_factors_safe(Gi, Gm):
        rf = tl.exp(Gi - Gm[None, :])
        kf = tl.trans(ki * tl.exp(Gm[None, :] - Gi))
        a += mm(qi * rf, kf, DT)
        t += mm(ei * rf, kf, DT)
    else:
        r = tl.arange(0, 16)
        for s in range(0, 16):
            row = r[:, None] == s
            ks = tl.sum(tl.where(row, ki, 0.0), 0)
            Gs = tl.sum(tl.where(row, Gi, 0.0), 0)
            kf = ks[None, :] * tl.exp(tl.where(r[:, None] >= s, Gi - Gs[None, :], float("-inf")))
            col = r[None, :] == s
            a += tl.where(col, tl.sum(qi * kf, 1)[:, None], 0.0)
            t += tl.where(col, tl.sum(ei * kf, 1)[:, None], 0.0)
    return a, t


@triton.jit
def _lower(x, strict: tl.constexpr):
    r = tl.arange(0, 16)
    if strict:
        return tl.where(r[:, None] > r[None, :], x, 0.0)
    else:
        return tl.where(r[:, None] >= r[None, :], x, 0.0)


@triton.jit(do_not_specialize=["N", "T"])
def chunk_scores_kernel(
    q, k, b, G, aqk_out, t_out,
    cu_seqlens, chunk_offsets, seq_of_chunk, T,
    N, scale,
    VARLEN: tl.constexpr, H: tl.constexpr, K: tl.constexpr, BKC: tl.constexpr,
):
    """Blocks (i, j <= i) of Aqk[r, s] = scale sum_c q_rc k_sc exp(G_rc - G_sc) (r >= s) and
    T[r, s] = sum_c b_rc k_rc k_sc exp(G_rc - G_sc) (r > s); zeros in Aqk's blocks (i, j > i).
    Grid axis 2: the row block i (all its blocks, 4 programs per chunk). Measured slower on the
    H200 (RESULTS_kernels.md runs 12-13): one program per block, and the row block's operands
    loaded once per key slice with the earlier blocks accumulated side by side."""
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk, T, VARLEN)
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
    for j in range(0, i_i):
        a = tl.zeros([16, 16], dtype=tl.float32)
        t = tl.zeros([16, 16], dtype=tl.float32)
        for kc in range(0, K, BKC):
            c = load_row(G, K, li - 1, 64, kc, K, BKC)
            rf = tl.exp(load_tile(G, K, li, 64, kc, K, 16, BKC) - c[None, :])
            ki = load_tile(k, SK, ri, L, kc, K, 16, BKC).to(tl.float32)
            qr = load_tile(q, SK, ri, L, kc, K, 16, BKC).to(tl.float32) * rf
            er = load_tile(b, SK, ri, L, kc, K, 16, BKC).to(tl.float32) * ki * rf
            kf = (load_tile(k, SK, row0 + j * 16, L, kc, K, 16, BKC).to(tl.float32)
                  * tl.exp(c[None, :] - load_tile(G, K, j * 16, 64, kc, K, 16, BKC)))
            a += mm(qr, tl.trans(kf), DT)
            t += mm(er, tl.trans(kf), DT)
        store_tile(aqk_out, 64, li, 64, j * 16, 64, a * scale)
        store_tile(t_out, 64, li, 64, j * 16, 64, t)

    # the diagonal sub-block, and zeros in the blocks after it
    a = tl.zeros([16, 16], dtype=tl.float32)
    t = tl.zeros([16, 16], dtype=tl.float32)
    for kc in range(0, K, BKC):
        ki = load_tile(k, SK, ri, L, kc, K, 16, BKC).to(tl.float32)
        Gi = load_tile(G, K, li, 64, kc, K, 16, BKC)
        a, t = _diag_block(a, t, load_tile(q, SK, ri, L, kc, K, 16, BKC).to(tl.float32), ki,
                           load_tile(b, SK, ri, L, kc, K, 16, BKC).to(tl.float32) * ki,
                           Gi, load_row(G, K, li + 7, 64, kc, K, BKC), DT)
    store_tile(aqk_out, 64, li, 64, li, 64, _lower(a * scale, False))
    store_tile(t_out, 64, li, 64, li, 64, _lower(t, True))
    zero = tl.zeros([16, 16], dtype=tl.float32)
    for j in range(i_i + 1, 4):
        store_tile(aqk_out, 64, li, 64, j * 16, 64, zero)


@triton.jit
def _store_block_row(ptr, i, b0, b1, b2, b3):
    """Row i of 16x16 blocks of a chunk's 64x64 matrix."""
    store_tile(ptr, 64, i * 16, 64, 0, 64, b0)
    store_tile(ptr, 64, i * 16, 64, 16, 64, b1)
    store_tile(ptr, 64, i * 16, 64, 32, 64, b2)
    store_tile(ptr, 64, i * 16, 64, 48, 64, b3)


@triton.jit
def _store_inverse(a_out, T00, T10, T11, T20, T21, T22, T30, T31, T32, T33, PREC: tl.constexpr):
    """Stores A = (I + T)^-1 from the ten lower 16x16 blocks of T (diagonal blocks strictly lower),
    by blocks: A_ii by unit_lower_inverse, A_ij = -A_ii sum_{j <= l < i} T_il A_lj. All 16 blocks
    are written (zeros above the diagonal) so later kernels load A as one tile."""
    I00 = unit_lower_inverse(T00, PREC)
    I11 = unit_lower_inverse(T11, PREC)
    I22 = unit_lower_inverse(T22, PREC)
    I33 = unit_lower_inverse(T33, PREC)
    I10 = -mm_inverse(I11, mm_inverse(T10, I00, PREC), PREC)
    I21 = -mm_inverse(I22, mm_inverse(T21, I11, PREC), PREC)
    I32 = -mm_inverse(I33, mm_inverse(T32, I22, PREC), PREC)
    I20 = -mm_inverse(I22, mm_inverse(T20, I00, PREC) + mm_inverse(T21, I10, PREC), PREC)
    I31 = -mm_inverse(I33, mm_inverse(T31, I11, PREC) + mm_inverse(T32, I21, PREC), PREC)
    I30 = -mm_inverse(I33, mm_inverse(T30, I00, PREC) + mm_inverse(T31, I10, PREC)
                      + mm_inverse(T32, I20, PREC), PREC)
    zero = tl.zeros([16, 16], dtype=tl.float32)
    _store_block_row(a_out, 0, _lower(I00, False), zero, zero, zero)
    _store_block_row(a_out, 1, I10, _lower(I11, False), zero, zero)
    _store_block_row(a_out, 2, I20, I21, _lower(I22, False), zero)
    _store_block_row(a_out, 3, I30, I31, I32, _lower(I33, False))


@triton.jit(do_not_specialize=["N", "T"])
def chunk_solve_kernel(
    t_in, a_out,
    cu_seqlens, chunk_offsets, seq_of_chunk, T,
    N,
    VARLEN: tl.constexpr, PREC: tl.constexpr,
):
    """A = (I + T)^-1 from the lower blocks of T written by chunk_scores_kernel."""
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk, T, VARLEN)
    if i_n >= N:
        return
    H = tl.num_programs(1)
    t_in += (i_c * H + i_h) * 64 * 64
    a_out += (i_c * H + i_h) * 64 * 64
    _store_inverse(a_out, load_block(t_in, 0, 0), load_block(t_in, 1, 0), load_block(t_in, 1, 1),
                   load_block(t_in, 2, 0), load_block(t_in, 2, 1), load_block(t_in, 2, 2),
                   load_block(t_in, 3, 0), load_block(t_in, 3, 1), load_block(t_in, 3, 2),
                   load_block(t_in, 3, 3), PREC)


@triton.jit(do_not_specialize=["N", "T"])
def chunk_wy_fwd_kernel(
    q, k, v, b, w, G, gc, a_in,
    qg_out, kt_out, y_out, u_out,
    cu_seqlens, chunk_offsets, seq_of_chunk, T,
    N, scale,
    VARLEN: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
    BKC: tl.constexpr, BVC: tl.constexpr,
):
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk, T, VARLEN)
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

