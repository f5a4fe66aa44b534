"""Token-by-token Gated DeltaNet-2 for decoding (forward only, fp32 state).

The Triton kernel runs one program per (sequence, head, block of value columns); the state block
stays in registers for the whole sequence. On CPU the token-wise recurrence is used in fp32.
"""
import torch
import triton
import triton.language as tl

from .naive import L2NORM_EPS, recurrent_gdn2


def fused_recurrent_gdn2_torch(
    q, k, v, g, b, w, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
):
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return recurrent_gdn2(q, k, v, g, b, w, scale, initial_state, output_final_state,
                          use_qk_l2norm_in_kernel, cu_seqlens, compute_dtype=compute_dtype)


# T changes with every decoding batch: specialising on it would recompile.
@triton.jit(do_not_specialize=["T"])
def _fused_recurrent_gdn2_kernel(
    q, k, v, g, b, w, o, h0, ht, cu_seqlens, scale, T,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr, USE_L2NORM: tl.constexpr,
    IS_VARLEN: tl.constexpr, L2_EPS: tl.constexpr,
):
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = (tl.load(cu_seqlens + i_n + 1) - bos).to(tl.int32)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < K
    mask_v = o_v < V
    mask_h = mask_k[:, None] & mask_v[None, :]
    off_k = (bos * H + i_h) * K + o_k
    off_v = (bos * H + i_h) * V + o_v
    off_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]

    h = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_INITIAL_STATE:
        h += tl.load(h0 + off_h, mask=mask_h, other=0.0).to(tl.float32)
    for _ in range(0, seq_len):
        b_q = tl.load(q + off_k, mask=mask_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + off_k, mask=mask_k, other=0.0).to(tl.float32)
        b_g = tl.load(g + off_k, mask=mask_k, other=0.0).to(tl.float32)
        b_b = tl.load(b + off_k, mask=mask_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + off_v, mask=mask_v, other=0.0).to(tl.float32)
        b_w = tl.load(w + off_v, mask=mask_v, other=0.0).to(tl.float32)
        if USE_L2NORM:
            b_q = b_q * tl.rsqrt(tl.sum(b_q * b_q) + L2_EPS)
            b_k = b_k * tl.rsqrt(tl.sum(b_k * b_k) + L2_EPS)
        h = h * tl.exp(b_g)[:, None]
        read = tl.sum(h * (b_b * b_k)[:, None], 0)
        h += b_k[:, None] * (b_w * b_v - read)[None, :]
        b_o = tl.sum(h * (b_q * scale)[:, None], 0)
        tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=mask_v)
        off_k += H * K
        off_v += H * V
    if STORE_FINAL_STATE:
        tl.store(ht + off_h, h.to(ht.dtype.element_ty), mask=mask_h)


def fused_recurrent_gdn2_triton(
    q, k, v, g, b, w, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
):
    """Inputs already validated, contiguous and `scale` a float."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    n_seq = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    block_k = triton.next_power_of_2(key_dim)
    # Keeps the register-resident state block at <= 8K fp32 values per program.
    block_v = min(triton.next_power_of_2(value_dim), max(16, 8192 // block_k))
    o = torch.empty_like(v, dtype=q.dtype)
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    final_state = (q.new_empty(n_seq, heads, key_dim, value_dim, dtype=state_dtype)
                   if output_final_state else None)
    grid = (triton.cdiv(value_dim, block_v), n_seq * heads)
    _fused_recurrent_gdn2_kernel[grid](
        q, k, v, g, b, w, o, initial_state, final_state, cu_seqlens, scale, length,
        H=heads, K=key_dim, V=value_dim, BK=block_k, BV=block_v,
        USE_INITIAL_STATE=initial_state is not None, STORE_FINAL_STATE=output_final_state,
        USE_L2NORM=use_qk_l2norm_in_kernel, IS_VARLEN=cu_seqlens is not None, L2_EPS=L2NORM_EPS,
    )
    return o, final_state
