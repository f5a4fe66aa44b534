"""The two sequential kernels: the state pass over chunks (forward) and the state-gradient pass
backwards over chunks, one program per (value block, sequence, head); and the two per-chunk kernels
that take the products outside the chain out of them when there are few such programs.

Forward, per chunk with entering state S (fp32 [K, BV]):
    R = U - Y S;   O = Qg S + Aqk R;   S <- exp(G_C) * S + Ktail^T R
Backward, per chunk (in reverse) with dS the gradient of the chunk's leaving state:
    dR = Aqk^T dO + Ktail dS;   dS <- exp(G_C) * dS + Qg^T dO - Y^T dR
With few long sequences a pass is a chain of hundreds of dependent steps on a few programs, and
its time is the latency of each step. There O (from the saved entering states) and Aqk^T dO (before
the backward chain) run in parallel over chunks, leaving the chains two and three products a step.
"""
import triton
import triton.language as tl

from .chunk_common import chunk_program, load_tile, mm, seq_chunks, store_tile


@triton.jit(do_not_specialize=["NT"])
def chunk_state_fwd_kernel(
    qg, kt, y, u, aqk, gc, h0, o, states, ht,
    cu_seqlens, chunk_offsets,
    NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, STORE_HT: tl.constexpr, WITH_OUTPUT: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_n = tl.program_id(1)
    i_h = tl.program_id(2)
    DT: tl.constexpr = qg.dtype.element_ty
    bos, eos, c0, c1 = seq_chunks(i_n, cu_seqlens, chunk_offsets)
    R = NT * H * 64
    qg_d = tl.make_tensor_descriptor(qg, [R, K], [K, 1], [64, BK])
    kt_d = tl.make_tensor_descriptor(kt, [R, K], [K, 1], [64, BK])
    y_d = tl.make_tensor_descriptor(y, [R, K], [K, 1], [64, BK])
    u_d = tl.make_tensor_descriptor(u, [R, V], [V, 1], [64, BV])
    aqk_d = tl.make_tensor_descriptor(aqk, [R, 64], [64, 1], [64, 64])
    o_d = tl.make_tensor_descriptor(o + (bos * H + i_h) * V, [eos - bos, V], [H * V, 1], [64, BV])
    if SAVE_STATES:
        s_d = tl.make_tensor_descriptor(states, [NT * H * BK, V], [V, 1], [BK, BV])
    r = tl.arange(0, 64)
    causal = r[:, None] >= r[None, :]

    if HAS_H0:
        h0_d = tl.make_tensor_descriptor(h0 + (i_n * H + i_h) * K * V, [K, V], [V, 1], [BK, BV])
        S = h0_d.load([0, i_v * BV]).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(c0, c1):
        base = (c * H + i_h) * 64
        Sb = S.to(DT)
        if SAVE_STATES:
            s_d.store([(c * H + i_h) * BK, i_v * BV], Sb)
        Rc = u_d.load([base, i_v * BV]).to(tl.float32) - mm(y_d.load([base, 0]), Sb, DT)
        Rb = Rc.to(DT)
        if WITH_OUTPUT:
            a = tl.where(causal, aqk_d.load([base, 0]), 0.0)
            out = mm(qg_d.load([base, 0]), Sb, DT) + mm(a, Rb, DT)
            o_d.store([(c - c0) * 64, i_v * BV], out.to(o_d.dtype))
        decay = tl.exp(tl.load(gc + (c * H + i_h) * BK + tl.arange(0, BK)))
        S = S * decay[:, None] + mm(tl.trans(kt_d.load([base, 0])), Rb, DT)
    if STORE_HT:
        ht_d = tl.make_tensor_descriptor(ht + (i_n * H + i_h) * K * V, [K, V], [V, 1], [BK, BV])
        ht_d.store([0, i_v * BV], S)


@triton.jit(do_not_specialize=["NT"])
def chunk_state_bwd_kernel(
    qg, kt, y, aqk, gc, do, dht, dh0, dstates, dr,
    cu_seqlens, chunk_offsets,
    NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, DR_HAS_ATDO: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_n = tl.program_id(1)
    i_h = tl.program_id(2)
    DT: tl.constexpr = qg.dtype.element_ty
    bos, eos, c0, c1 = seq_chunks(i_n, cu_seqlens, chunk_offsets)
    R = NT * H * 64
    qg_d = tl.make_tensor_descriptor(qg, [R, K], [K, 1], [64, BK])
    kt_d = tl.make_tensor_descriptor(kt, [R, K], [K, 1], [64, BK])
    y_d = tl.make_tensor_descriptor(y, [R, K], [K, 1], [64, BK])
    aqk_d = tl.make_tensor_descriptor(aqk, [R, 64], [64, 1], [64, 64])
    dr_d = tl.make_tensor_descriptor(dr, [R, V], [V, 1], [64, BV])
    ds_d = tl.make_tensor_descriptor(dstates, [NT * H * BK, V], [V, 1], [BK, BV])
    do_d = tl.make_tensor_descriptor(do + (bos * H + i_h) * V, [eos - bos, V], [H * V, 1], [64, BV])
    r = tl.arange(0, 64)
    causal = r[:, None] >= r[None, :]

    if HAS_DHT:
        dht_d = tl.make_tensor_descriptor(dht + (i_n * H + i_h) * K * V, [K, V], [V, 1], [BK, BV])
        dS = dht_d.load([0, i_v * BV]).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(0, c1 - c0):
        c = c1 - 1 - i
        base = (c * H + i_h) * 64
        dSb = dS.to(DT)
        ds_d.store([(c * H + i_h) * BK, i_v * BV], dSb)
        dOc = do_d.load([(c - c0) * 64, i_v * BV])
        if DR_HAS_ATDO:
            dRc = dr_d.load([base, i_v * BV]).to(tl.float32) + mm(kt_d.load([base, 0]), dSb, DT)
        else:
            a = tl.where(causal, aqk_d.load([base, 0]), 0.0)
            dRc = mm(tl.trans(a), dOc, DT) + mm(kt_d.load([base, 0]), dSb, DT)
        dRb = dRc.to(DT)
        dr_d.store([base, i_v * BV], dRb)
        decay = tl.exp(tl.load(gc + (c * H + i_h) * BK + tl.arange(0, BK)))
        dS = (dS * decay[:, None] + mm(tl.trans(qg_d.load([base, 0])), dOc, DT)
              - mm(tl.trans(y_d.load([base, 0])), dRb, DT))
    if STORE_DH0:
        dh0_d = tl.make_tensor_descriptor(dh0 + (i_n * H + i_h) * K * V, [K, V], [V, 1], [BK, BV])
        dh0_d.store([0, i_v * BV], dS)


@triton.jit(do_not_specialize=["N"])
def chunk_output_kernel(
    qg, y, u, aqk, states, o,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):
    """O = Qg S + Aqk R with R = U - Y S from the chunk's saved entering state S (the state pass's
    own rounding of it, so O equals the fused pass's). Grid (chunk, head, value block)."""
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk)
    vc = tl.program_id(2) * BV
    if i_n >= N:
        return
    DT: tl.constexpr = qg.dtype.element_ty
    base = (i_c * H + i_h) * 64
    S = load_tile(states + (i_c * H + i_h) * BK * V, V, 0, BK, vc, V, BK, BV)
    R = load_tile(u + base * V, V, 0, 64, vc, V, 64, BV).to(tl.float32) - mm(
        load_tile(y + base * K, K, 0, 64, 0, K, 64, BK), S, DT)
    r = tl.arange(0, 64)
    a = tl.where(r[:, None] >= r[None, :], load_tile(aqk + base * 64, 64, 0, 64, 0, 64, 64, 64), 0.0)
    out = mm(load_tile(qg + base * K, K, 0, 64, 0, K, 64, BK), S, DT) + mm(a, R.to(DT), DT)
    store_tile(o + (bos * H + i_h) * V, H * V, row0, eos - bos, vc, V, out)


@triton.jit(do_not_specialize=["N"])
def chunk_aqk_do_kernel(
    aqk, do, dr,
    cu_seqlens, chunk_offsets, seq_of_chunk,
    N,
    H: tl.constexpr, V: tl.constexpr, BV: tl.constexpr,
):
    """Aqk^T dO of each chunk into dr, where the state-gradient pass adds Ktail dS. Grid (chunk,
    head, value block)."""
    i_c, i_h, i_n, bos, eos, row0 = chunk_program(cu_seqlens, chunk_offsets, seq_of_chunk)
    vc = tl.program_id(2) * BV
    if i_n >= N:
        return
    DT: tl.constexpr = aqk.dtype.element_ty
    base = (i_c * H + i_h) * 64
    r = tl.arange(0, 64)
    a = tl.where(r[:, None] >= r[None, :], load_tile(aqk + base * 64, 64, 0, 64, 0, 64, 64, 64), 0.0)
    dO = load_tile(do + (bos * H + i_h) * V, H * V, row0, eos - bos, vc, V, 64, BV)
    store_tile(dr + base * V, V, 0, 64, vc, V, mm(tl.trans(a), dO, DT))
