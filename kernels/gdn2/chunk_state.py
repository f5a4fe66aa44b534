"""The two sequential kernels: the state pass over chunks (forward, fused with the output) and the
state-gradient pass backwards over chunks. One program per (value block, sequence, head).

Forward, per chunk with entering state S (fp32 [K, BV]):
    R = U - Y S;   O = Qg S + Aqk R;   S <- exp(G_C) * S + Ktail^T R
Backward, per chunk (in reverse) with dS the gradient of the chunk's leaving state:
    dR = Aqk^T dO + Ktail dS;   dS <- exp(G_C) * dS + Qg^T dO - Y^T dR
"""
import triton
import triton.language as tl

from .chunk_common import mm, seq_chunks


@triton.jit(do_not_specialize=["NT"])
def chunk_state_fwd_kernel(
    qg, kt, y, u, aqk, gc, h0, o, states, ht,
    cu_seqlens, chunk_offsets,
    NT,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, SAVE_STATES: tl.constexpr, STORE_HT: tl.constexpr,
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
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
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
