"""Triton building blocks shared by the chunkwise GDN-2 kernels.

A chunk has 64 rows, handled as four 16-row sub-blocks (tensor-core tiles; Triton cannot slice a
register tile, so every per-chunk quantity lives as four [16, D] tiles). G is the chunk-local
inclusive cumulative sum of the log-decay g; c_i is G at the row before sub-block i (c_0 = 0).

Decay ratios exp(G_r - G_s), r >= s, are only ever formed as a product of two factors that are each
<= 1: a reference row m with s <= m <= r splits exp(G_r - G_s) = exp(G_r - G_m) * exp(G_m - G_s).
- Sub-block i against an earlier sub-block j uses m = row before sub-block i (G_m = c_i).
- Inside a 16-row sub-block the pairs are split by a binary tree: at level L (8, 4, 2, 1) every
  2L-row segment pairs its upper L rows with its lower L rows through the segment's middle row.
So no exponent is ever positive and any finite decay (g = -20 per token gives G = -1280 inside one
chunk) stays finite and exact up to rounding.
"""
import triton
import triton.language as tl

CHUNK = 64


@triton.jit
def chunk_coords(i_c, cu_seqlens, chunk_offsets, seq_of_chunk):
    """Sequence index, first token, one-past-last token and chunk-local first row of chunk i_c."""
    i_n = tl.load(seq_of_chunk + i_c)
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    row0 = (i_c - tl.load(chunk_offsets + i_n)) * 64
    return i_n, bos, eos, row0


@triton.jit
def seq_chunks(i_n, cu_seqlens, chunk_offsets):
    """First token, one-past-last token, first and one-past-last chunk index of sequence i_n."""
    bos = tl.load(cu_seqlens + i_n)
    eos = tl.load(cu_seqlens + i_n + 1)
    c0 = tl.load(chunk_offsets + i_n)
    c1 = tl.load(chunk_offsets + i_n + 1)
    return bos, eos, c0, c1


@triton.jit
def load_tile(ptr, stride, row, nrows, col, ncols, BR: tl.constexpr, BC: tl.constexpr):
    """[BR, BC] tile at (row, col) of a row-major matrix with nrows x ncols valid entries; the rest
    reads as zeros. Plain loads rather than tensor descriptors: a descriptor load is a TMA round trip
    that Triton waits on at once, and the per-chunk kernels issue dozens of small independent tiles."""
    r = row + tl.arange(0, BR)
    c = col + tl.arange(0, BC)
    mask = (r < nrows)[:, None] & (c < ncols)[None, :]
    return tl.load(ptr + r[:, None] * stride + c[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, stride, row, nrows, col, ncols, x):
    """Stores the tile x at (row, col), dropping rows >= nrows and columns >= ncols."""
    r = row + tl.arange(0, x.shape[0])
    c = col + tl.arange(0, x.shape[1])
    mask = (r < nrows)[:, None] & (c < ncols)[None, :]
    tl.store(ptr + r[:, None] * stride + c[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_lower_blocks(ptr, b00, b10, b11, b20, b21, b22, b30, b31, b32, b33, diag_mask):
    """Stores the ten lower 16x16 blocks of a chunk's row-major 64x64 matrix at ptr; the diagonal
    blocks through diag_mask (the upper blocks are never read)."""
    store_tile(ptr, 64, 0, 64, 0, 64, tl.where(diag_mask, b00, 0.0))
    store_tile(ptr, 64, 16, 64, 0, 64, b10)
    store_tile(ptr, 64, 16, 64, 16, 64, tl.where(diag_mask, b11, 0.0))
    store_tile(ptr, 64, 32, 64, 0, 64, b20)
    store_tile(ptr, 64, 32, 64, 16, 64, b21)
    store_tile(ptr, 64, 32, 64, 32, 64, tl.where(diag_mask, b22, 0.0))
    store_tile(ptr, 64, 48, 64, 0, 64, b30)
    store_tile(ptr, 64, 48, 64, 16, 64, b31)
    store_tile(ptr, 64, 48, 64, 32, 64, b32)
    store_tile(ptr, 64, 48, 64, 48, 64, tl.where(diag_mask, b33, 0.0))


@triton.jit
def mm(a, b, DT: tl.constexpr):
    """Matrix product with fp32 accumulation: exact fp32 for fp32 inputs (with 3-pass tf32 the fp32
    GPU tests missed their 1e-3 bound), else tensor cores in DT."""
    if DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def mm_solve(a, b, DT: tl.constexpr):
    """Products with the fp32 inverse (I + T)^-1 applied to data: ieee for fp32 inputs, else tf32."""
    if DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")


@triton.jit
def mm_exact(a, b, DT: tl.constexpr):
    """Products for building the inverse: ieee for fp32 inputs, 3-pass tf32 otherwise."""
    if DT == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def cumsum_blocks(g0, g1, g2, g3):
    """Chunk-local inclusive cumsum of the four [16, BK] log-decay tiles, and the carries
    c1..c4 (G at the last row of sub-blocks 0..3; c4 = G at the chunk's last row)."""
    c1 = tl.sum(g0, 0)
    c2 = c1 + tl.sum(g1, 0)
    c3 = c2 + tl.sum(g2, 0)
    c4 = c3 + tl.sum(g3, 0)
    G0 = tl.cumsum(g0, 0)
    G1 = tl.cumsum(g1, 0) + c1[None, :]
    G2 = tl.cumsum(g2, 0) + c2[None, :]
    G3 = tl.cumsum(g3, 0) + c3[None, :]
    return G0, G1, G2, G3, c1, c2, c3, c4


@triton.jit
def offdiag_factors(G0, G1, G2, G3, c1, c2, c3):
    """Row factors Rf_i = exp(G_i - c_i) and column factors Cf_ij = exp(c_i - G_j), j < i, all <= 1.
    Only the adjacent column factors need a tile of exponentials; the others rescale them by a vector."""
    Rf1 = tl.exp(G1 - c1[None, :])
    Rf2 = tl.exp(G2 - c2[None, :])
    Rf3 = tl.exp(G3 - c3[None, :])
    Cf10 = tl.exp(c1[None, :] - G0)
    Cf21 = tl.exp(c2[None, :] - G1)
    Cf32 = tl.exp(c3[None, :] - G2)
    Cf20 = Cf10 * tl.exp(c2 - c1)[None, :]
    Cf30 = Cf10 * tl.exp(c3 - c1)[None, :]
    Cf31 = Cf21 * tl.exp(c3 - c2)[None, :]
    return Rf1, Rf2, Rf3, Cf10, Cf20, Cf30, Cf21, Cf31, Cf32


@triton.jit
def tree_level(g, L: tl.constexpr):
    """Factors of tree level L inside one sub-block, from the raw log-decays g [16, BK]. Each 2L-row
    segment pairs its upper L rows r with its lower L rows s through the segment's middle row m (the
    last lower row): X = exp(G_r - G_m) on upper rows (a cumsum within the upper group) and
    X = exp(G_m - G_s) on lower rows (a reverse cumsum within the lower group, excluding s).
    Returns X, up [16] and the pair mask [16, 16]."""
    BK: tl.constexpr = g.shape[1]
    r = tl.arange(0, 16)
    up = (r % (2 * L)) >= L
    if L == 1:
        X = tl.where(up[:, None], tl.exp(g), 1.0)
    else:
        grp = tl.reshape(g, [16 // L, L, BK])
        fwd = tl.reshape(tl.cumsum(grp, 1), [16, BK])
        rev = tl.reshape(tl.cumsum(grp, 1, reverse=True), [16, BK])
        X = tl.exp(tl.where(up[:, None], fwd, rev - g))
    same = (r[:, None] // (2 * L)) == (r[None, :] // (2 * L))
    M = same & up[:, None] & (~up)[None, :]
    return X, up, M


@triton.jit
def diag_scores(q, e, k, g, DT: tl.constexpr):
    """Diagonal 16x16 blocks of Aqk / scale (causal, incl. r = s) and T (strictly lower) of one
    sub-block: sum_c q_rc k_sc exp(G_rc - G_sc) and sum_c e_rc k_sc exp(G_rc - G_sc)."""
    r = tl.arange(0, 16)
    diag = r[:, None] == r[None, :]
    a = tl.where(diag, tl.sum(q * k, 1)[:, None], 0.0)
    t = tl.zeros([16, 16], dtype=tl.float32)
    for lvl in tl.static_range(4):
        X, up, M = tree_level(g, 8 >> lvl)
        kb = tl.where(up[:, None], 0.0, k * X)
        qa = tl.where(up[:, None], q * X, 0.0)
        ea = tl.where(up[:, None], e * X, 0.0)
        a += tl.where(M, mm(qa, tl.trans(kb), DT), 0.0)
        t += tl.where(M, mm(ea, tl.trans(kb), DT), 0.0)
    return a, t


@triton.jit
def diag_grads(q, e, k, g, dA, dT, DT: tl.constexpr):
    """Backward of diag_scores for given upstream blocks dA (already times scale) and dT (both
    masked): returns the contributions to dq, de (the erase-key e = b * k) and dk (column side)."""
    r = tl.arange(0, 16)
    d = tl.sum(tl.where(r[:, None] == r[None, :], dA, 0.0), 1)
    dq = d[:, None] * k
    dk = d[:, None] * q
    de = tl.zeros_like(e)
    for lvl in tl.static_range(4):
        X, up, M = tree_level(g, 8 >> lvl)
        kb = tl.where(up[:, None], 0.0, k * X)
        qa = tl.where(up[:, None], q * X, 0.0)
        ea = tl.where(up[:, None], e * X, 0.0)
        dAm = tl.where(M, dA, 0.0)
        dTm = tl.where(M, dT, 0.0)
        # rows of the products below are zero outside the half where X is their factor
        dq += X * mm(dAm, kb, DT)
        de += X * mm(dTm, kb, DT)
        dk += X * (mm(tl.trans(dAm), qa, DT) + mm(tl.trans(dTm), ea, DT))
    return dq, de, dk


@triton.jit
def unit_lower_inverse(T, DT: tl.constexpr):
    """(I + T)^-1 = (I - T)(I + T^2)(I + T^4)(I + T^8) for a strictly lower (nilpotent) 16x16 T."""
    r = tl.arange(0, 16)
    eye = (r[:, None] == r[None, :]).to(tl.float32)
    T2 = mm_exact(T, T, DT)
    T4 = mm_exact(T2, T2, DT)
    T8 = mm_exact(T4, T4, DT)
    A = eye - T
    A += mm_exact(A, T2, DT)
    A += mm_exact(A, T4, DT)
    A += mm_exact(A, T8, DT)
    return A


def next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))
