"""Per-chunk backward kernels (after the state-gradient pass), in launch order.

chunk_wy_bwd_kernel (chunk, head), 64-row tiles, loop over value blocks:
    R = U - Y S0 (recomputed), dV' = A^T dR (V' = Z - Ebar S0 is the right-hand side of R = A V'),
    dv = dV' w, dw = dV' v, dAqk = causal(dO R^T), dT = -strict(dV' R^T).
chunk_state_grads_kernel (chunk, head, key block), 64-row tiles, loop over value blocks:
    the state products' parts of the gradients, already times their decay factors:
    dq = scale e^G (dO S0^T), de = e^G (-dV' S0^T), dk = e^(G_C - G) (R dS^T), and the chunk-end
    term dG_C = e^(G_C) sum(S0 dS) + sum_r k_r dk_r; fp32 partials for the next kernel.
chunk_intra_bwd_kernel (chunk, head, key block), sub-blocks i = 3..0:
    the intra-chunk products through dAqk and dT with the forward's safe factoring, added to the
    partials; dg = reverse cumsum over the chunk of (q dq + e de - k dk_col) plus dG_C on every
    row; e = b k gives db = de k and dk = dk_col + de b.
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
    mm_solve,
    store_tile,
)


@triton.jit(do_not_specialize=["N", "T"])
def chunk_wy_bwd_kernel(
    v, w, do, y, u, a, states, dr,
    r_out, dvp_out, daqk_out, dt_out, dv, dw,
    cu_seqlens, chunk_offsets, seq_of_chunk, T,
    N,
    VARLEN: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr,
):
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk, T, VARLEN)
    if i_n >= N:
        return
    DT: tl.constexpr = y.dtype.element_ty
    L = eos - bos
    base = (i_c * H + i_h) * 64
    SV = H * V
    tok = (bos * H + i_h) * V
    states += (i_c * H + i_h) * BK * V

    At = tl.trans(load_tile(a + base * 64, 64, 0, 64, 0, 64, 64, 64))
    Y = load_tile(y + base * K, K, 0, 64, 0, K, 64, BK)
    dA = tl.zeros([64, 64], dtype=tl.float32)
    dT = tl.zeros([64, 64], dtype=tl.float32)
    for vc in range(0, V, BV):
        s0 = load_tile(states, V, 0, BK, vc, V, BK, BV)
        R = (load_tile(u + base * V, V, 0, 64, vc, V, 64, BV).to(tl.float32) - mm(Y, s0, DT)).to(DT)
        store_tile(r_out + base * V, V, 0, 64, vc, V, R)
        dp = mm_solve(At, load_tile(dr + base * V, V, 0, 64, vc, V, 64, BV), DT)
        store_tile(dvp_out + base * V, V, 0, 64, vc, V, dp)
        wt = load_tile(w + tok, SV, row0, L, vc, V, 64, BV).to(tl.float32)
        store_tile(dv + tok, SV, row0, L, vc, V, dp * wt)
        vt = load_tile(v + tok, SV, row0, L, vc, V, 64, BV).to(tl.float32)
        store_tile(dw + tok, SV, row0, L, vc, V, dp * vt)
        Rt = tl.trans(R)
        dA += mm(load_tile(do + tok, SV, row0, L, vc, V, 64, BV), Rt, DT)
        dT -= mm(dp, Rt, DT)
    r = tl.arange(0, 64)
    store_tile(daqk_out + base * 64, 64, 0, 64, 0, 64, tl.where(r[:, None] >= r[None, :], dA, 0.0))
    store_tile(dt_out + base * 64, 64, 0, 64, 0, 64, tl.where(r[:, None] > r[None, :], dT, 0.0))


@triton.jit(do_not_specialize=["N", "T"])
def chunk_state_grads_kernel(
    k, do, G, gc, states, dstates, r_in, dvp_in,
    dq_out, de_out, dk_out, dgc_out,
    cu_seqlens, chunk_offsets, seq_of_chunk, T,
    N, scale,
    VARLEN: tl.constexpr, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BKS: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk, T, VARLEN)
    ck = tl.program_id(2) * BK
    if i_n >= N:
        return
    DT: tl.constexpr = do.dtype.element_ty
    L = eos - bos
    base = (i_c * H + i_h) * 64
    states += (i_c * H + i_h) * BKS * V
    dstates += (i_c * H + i_h) * BKS * V
    do += (bos * H + i_h) * V

    dq = tl.zeros([64, BK], dtype=tl.float32)
    de = tl.zeros([64, BK], dtype=tl.float32)
    dk = tl.zeros([64, BK], dtype=tl.float32)
    dgc = tl.zeros([BK], dtype=tl.float32)
    for vc in range(0, V, BV):
        s0 = load_tile(states, V, ck, BKS, vc, V, BK, BV)
        ds = load_tile(dstates, V, ck, BKS, vc, V, BK, BV)
        dgc += tl.sum(s0.to(tl.float32) * ds.to(tl.float32), 1)
        s0t = tl.trans(s0)
        dq += mm(load_tile(do, H * V, row0, L, vc, V, 64, BV), s0t, DT)
        de -= mm(load_tile(dvp_in + base * V, V, 0, 64, vc, V, 64, BV), s0t, DT)
        dk += mm(load_tile(r_in + base * V, V, 0, 64, vc, V, 64, BV), tl.trans(ds), DT)
    Gt = load_tile(G + base * K, K, 0, 64, ck, K, 64, BK)
    c = load_row(gc + (i_c * H + i_h) * BKS, 0, 0, 1, ck, K, BK)
    eg = tl.exp(Gt)
    dk = dk * tl.exp(c[None, :] - Gt)
    kt = load_tile(k + (bos * H + i_h) * K, H * K, row0, L, ck, K, 64, BK).to(tl.float32)
    dgc = dgc * tl.exp(c) + tl.sum(kt * dk, 0)
    store_tile(dq_out + base * K, K, 0, 64, ck, K, dq * eg * scale)
    store_tile(de_out + base * K, K, 0, 64, ck, K, de * eg)
    store_tile(dk_out + base * K, K, 0, 64, ck, K, dk)
    tl.store(dgc_out + (i_c * H + i_h) * BKS + ck + tl.arange(0, BK), dgc, mask=ck + tl.arange(0, BK) < K)


@triton.jit(do_not_specialize=["N", "T"])
def chunk_intra_bwd_kernel(
    q, k, b, G, daqk, dtm, dq_in, de_in, dk_in, dgc_in,
    dq, dk, dg, db,
    cu_seqlens, chunk_offsets, seq_of_chunk, T,
    N, scale,
    VARLEN: tl.constexpr, H: tl.constexpr, K: tl.constexpr, BKS: tl.constexpr, BK: tl.constexpr,
):
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk, T, VARLEN)
    ck = tl.program_id(2) * BK
    if i_n >= N:
        return
    DT: tl.constexpr = q.dtype.element_ty
    L = eos - bos
    SK = H * K
    base = (i_c * H + i_h) * 64
    tok = (bos * H + i_h) * K
    q += tok
    k += tok
    b += tok
    G += base * K
    daqk += base * 64
    dtm += base * 64

    tail = tl.load(dgc_in + (i_c * H + i_h) * BKS + ck + tl.arange(0, BK),
                   mask=ck + tl.arange(0, BK) < K, other=0.0)
    for ii in range(0, 4):
        # last sub-block first: the reverse cumulative sum of dG carries into the earlier ones
        i = 3 - ii
        li = i * 16
        Gi = load_tile(G, K, li, 64, ck, K, 16, BK)
        qi = load_tile(q, SK, row0 + li, L, ck, K, 16, BK).to(tl.float32)
        ki = load_tile(k, SK, row0 + li, L, ck, K, 16, BK).to(tl.float32)
        bi = load_tile(b, SK, row0 + li, L, ck, K, 16, BK).to(tl.float32)
        ei = bi * ki
        dqi = load_tile(dq_in + base * K, K, li, 64, ck, K, 16, BK)
        dei = load_tile(de_in + base * K, K, li, 64, ck, K, 16, BK)
        dki = load_tile(dk_in + base * K, K, li, 64, ck, K, 16, BK)

        # row side, against earlier sub-blocks j through the row before sub-block i
        if i > 0:
            c = load_row(G, K, li - 1, 64, ck, K, BK)
            xq = tl.zeros([16, BK], dtype=tl.float32)
            xe = tl.zeros([16, BK], dtype=tl.float32)
            for j in range(0, i):
                kj = load_tile(k, SK, row0 + j * 16, L, ck, K, 16, BK).to(tl.float32)
                kf = kj * tl.exp(c[None, :] - load_tile(G, K, j * 16, 64, ck, K, 16, BK))
                xq += mm(load_block(daqk, i, j), kf, DT)
                xe += mm(load_block(dtm, i, j), kf, DT)
            rf = tl.exp(Gi - c[None, :])
            dqi += xq * rf * scale
            dei += xe * rf

        # column side, against later sub-blocks m through sub-block i's last row
        if i < 3:
            n = load_row(G, K, li + 15, 64, ck, K, BK)
            x = tl.zeros([16, BK], dtype=tl.float32)
            for m in range(i + 1, 4):
                f = tl.exp(load_tile(G, K, m * 16, 64, ck, K, 16, BK) - n[None, :])
                km = load_tile(k, SK, row0 + m * 16, L, ck, K, 16, BK).to(tl.float32)
                qm = load_tile(q, SK, row0 + m * 16, L, ck, K, 16, BK).to(tl.float32)
                em = load_tile(b, SK, row0 + m * 16, L, ck, K, 16, BK).to(tl.float32) * km
                x += (mm(tl.trans(load_block(daqk, m, i)) * scale, qm * f, DT)
                      + mm(tl.trans(load_block(dtm, m, i)), em * f, DT))
            dki += x * tl.exp(n[None, :] - Gi)

        # the diagonal sub-block
        dAd = load_block(daqk, i, i) * scale
        dTd = load_block(dtm, i, i)
        Gm = load_row(G, K, li + 7, 64, ck, K, BK)
        if diag_factors_safe(Gi, Gm):
            rf = tl.exp(Gi - Gm[None, :])
            cf = tl.exp(Gm[None, :] - Gi)
            kf = ki * cf
            dqi += rf * mm(dAd, kf, DT)
            dei += rf * mm(dTd, kf, DT)
            dki += cf * (mm(tl.trans(dAd), qi * rf, DT) + mm(tl.trans(dTd), ei * rf, DT))
        else:
            r = tl.arange(0, 16)
            for s in range(0, 16):
                ks = load_row(k, SK, row0 + li + s, L, ck, K, BK).to(tl.float32)
                Gs = load_row(G, K, li + s, 64, ck, K, BK)
                f = tl.exp(tl.where(r[:, None] >= s, Gi - Gs[None, :], float("-inf")))
                dac = tl.load(daqk + (li + r) * 64 + li + s) * scale
                dtc = tl.load(dtm + (li + r) * 64 + li + s)
                dqi += dac[:, None] * ks[None, :] * f
                dei += dtc[:, None] * ks[None, :] * f
                dks = tl.sum((dac[:, None] * qi + dtc[:, None] * ei) * f, 0)
                dki += tl.where(r[:, None] == s, dks[None, :], 0.0)

        dG = qi * dqi + ei * dei - ki * dki
        store_tile(dg + tok, SK, row0 + li, L, ck, K, tl.cumsum(dG, 0, reverse=True) + tail[None, :])
        tail += tl.sum(dG, 0)
        store_tile(db + tok, SK, row0 + li, L, ck, K, dei * ki)
        store_tile(dk + tok, SK, row0 + li, L, ck, K, dki + dei * bi)
        store_tile(dq + tok, SK, row0 + li, L, ck, K, dqi)
