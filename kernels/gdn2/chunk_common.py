"""Triton building blocks shared by the chunkwise GDN-2 kernels.

A chunk has 64 rows. G is the chunk-local inclusive cumulative sum of the log-decay g (fp32,
stored chunk-major by the cumsum kernel). Products that carry no decay ratio (the WY products, the
state products, dAqk and dT) use whole 64-row tiles; the decay-weighted scores Aqk and T and their
gradients are built from 16-row sub-blocks, because a ratio exp(G_r - G_s), r >= s, may only be
formed as a product of two factors that are each <= 1 (g = -20 per token gives G = -1280 inside
one chunk, and exp(+G) alone overflows):
- sub-block i against an earlier sub-block j goes through a row m between them:
  exp(G_r - G_m) * exp(G_m - G_s), two tensor-core operands scaled by factors <= 1;
- inside a 16-row sub-block through its middle row when the block's decay span allows it
  (`diag_factors_safe`), else column by column with the upper triangle masked before the
  exponential.
"""
import triton
import triton.language as tl

CHUNK = 64


@triton.jit
def chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk, T, VARLEN: tl.constexpr):
    """This program's chunk and head (grid axes 0 and 1), the chunk's sequence, that sequence's first
    and one-past-last token, and the chunk's first row within the sequence. The sequence index is
    N for the padding programs of a packed grid (callers return early). Without VARLEN every
    sequence has T tokens and the coordinates follow from the program id, with no dependent loads
    ahead of the first tile."""
    i_c = tl.program_id(0)
    if VARLEN:
        i_n = tl.load(seq_of_chunk + i_c)
        bos = tl.load(cu_seqlens + i_n)
        eos = tl.load(cu_seqlens + i_n + 1)
        row0 = (i_c - tl.load(chunk_offsets + i_n)) * 64
    else:
        nt = (T + 63) // 64
        i_n = i_c // nt
        bos = i_n * T
        eos = bos + T
        row0 = (i_c - i_n * nt) * 64
    return i_c, tl.program_id(1), i_n, bos, eos, row0


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
def load_block(x, i, j):
    """16x16 block (i, j) of a chunk's row-major 64x64 matrix."""
    return load_tile(x, 64, i * 16, 64, j * 16, 64, 16, 16)


@triton.jit
def load_row(ptr, stride, row, nrows, col, ncols, BC: tl.constexpr):
    """Row `row` of a row-major matrix as a [BC] vector (zeros past nrows or ncols)."""
    c = col + tl.arange(0, BC)
    return tl.load(ptr + row * stride + c, mask=(c < ncols) & (row < nrows), other=0.0)


@triton.jit
def diag_factors_safe(G, Gm):
    """Whether the diagonal sub-block may use the tensor-core path: ratios through its middle row m,
    exp(G_r - G_m) * exp(G_m - G_s). For r >= s both factors are exact and their product <= 1, but
    a factor alone reaches exp(max |G - G_m|) and the masked pairs r < s reach its square, so the
    block's decay span around m must stay small: 30 keeps every factor and product finite in fp32
    and bf16 (e^60 < 3e38) and every factor above fp32's normal range (e^-30). Typical layers
    decay by far less over 16 tokens; stronger decay takes the exact column-by-column path."""
    return tl.max(tl.abs(G - Gm[None, :])) <= 30.0


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
def mm_inverse(a, b, PREC: tl.constexpr):
    """fp32 products that build the inverse, at input precision PREC (KernelConfig's
    inverse_precision)."""
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def unit_lower_inverse(T, PREC: tl.constexpr):
    """(I + T)^-1 = (I - T)(I + T^2)(I + T^4)(I + T^8) for a strictly lower (nilpotent) 16x16 T."""
    r = tl.arange(0, 16)
    eye = (r[:, None] == r[None, :]).to(tl.float32)
    T2 = mm_inverse(T, T, PREC)
    T4 = mm_inverse(T2, T2, PREC)
    T8 = mm_inverse(T4, T4, PREC)
    A = eye - T
    A += mm_inverse(A, T2, PREC)
    A += mm_inverse(A, T4, PREC)
    A += mm_inverse(A, T8, PREC)
    return A


def next_pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))
