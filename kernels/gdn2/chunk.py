"""Chunkwise GDN-2 with Triton kernels: the autograd function and its launches.

Forward: chunk_intra_fwd_kernel (per chunk: cumsum, Aqk, T, (I + T)^-1, Y, U, Qg, Ktail) then
chunk_state_fwd_kernel (sequential over chunks, fused with the output).
Backward: the forward's intra tensors (or the intra kernel again, see KernelConfig.recompute_intra),
chunk_state_bwd_kernel (state gradient, reverse over chunks), chunk_bwd_wy_kernel (dv, dw, dAqk, dT)
and chunk_bwd_qkg_kernel (dq, dk, db, dg). Only the sequential state kernels use tensor descriptors:
the per-chunk kernels read dozens of small 16-row tiles, and each descriptor load is a TMA round trip
that Triton waits on at once (benchmarks/NOTES_kernels.md).

Packed sequences are addressed through device tensors built from cu_seqlens (no host sync); every
length is a runtime argument, so new lengths never recompile.
"""
from dataclasses import dataclass

import torch
import triton

from .chunk_bwd import chunk_bwd_qkg_kernel, chunk_bwd_wy_kernel
from .chunk_common import CHUNK, next_pow2
from .chunk_intra import chunk_intra_fwd_kernel
from .chunk_state import chunk_state_bwd_kernel, chunk_state_fwd_kernel


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters (chosen per architecture; there is no autotuning)."""

    intra_warps: int = 4
    intra_bk: int = 32
    intra_bv: int = 64
    state_bv: int = 64
    state_warps: int = 4
    state_stages: int = 2
    wy_bv: int = 64
    wy_warps: int = 4
    qkg_bk: int = 64
    qkg_bv: int = 64
    qkg_warps: int = 4
    # keep the intra-chunk tensors of the forward for the backward (about 90 KB per chunk and head
    # for K = V = 128) instead of recomputing them: the intra kernel is the costliest forward step
    recompute_intra: bool = False


# keyed by CUDA compute capability major; anything else (and the CPU interpreter) uses the default
CONFIGS = {
    9: KernelConfig(),
}


def kernel_config(device: torch.device) -> KernelConfig:
    if device.type != "cuda":
        return KernelConfig()
    return CONFIGS.get(torch.cuda.get_device_capability(device)[0], KernelConfig())


@dataclass
class ChunkIndex:
    """How chunks map to sequences (device tensors, built without a host sync): token offsets
    cu_seqlens [N+1], first chunk of each sequence chunk_offsets [N+1] and the sequence of every
    chunk seq_of_chunk [n_chunks] (N for the padding entries of the packed grid bound)."""

    cu_seqlens: torch.Tensor
    chunk_offsets: torch.Tensor
    seq_of_chunk: torch.Tensor
    N: int
    n_chunks: int
    BK: int
    BV: int
    cfg: KernelConfig

    @classmethod
    def build(cls, q, v, cu_seqlens):
        batch, length = q.shape[:2]
        dev = q.device
        if cu_seqlens is None:
            # batch row i is sequence i of the flattened [B * T] tokens
            nts = triton.cdiv(length, CHUNK)
            n_seq, n_chunks = batch, batch * nts
            cu = torch.arange(0, (batch + 1) * length, length, device=dev, dtype=torch.int32)
            chunk_offsets = torch.arange(0, (batch + 1) * nts, nts, device=dev, dtype=torch.int32)
            seq_of_chunk = torch.arange(n_chunks, device=dev, dtype=torch.int32) // nts
        else:
            n_seq = cu_seqlens.numel() - 1
            cu = cu_seqlens.to(torch.int32)
            per_seq = (cu[1:] - cu[:-1] + CHUNK - 1) // CHUNK
            chunk_offsets = torch.nn.functional.pad(per_seq.cumsum(0), (1, 0)).to(torch.int32)
            # every sequence adds at most one partial chunk: a grid bound that needs no host sync
            n_chunks = length // CHUNK + n_seq
            grid_ids = torch.arange(n_chunks, device=dev, dtype=torch.int32)
            seq_of_chunk = (torch.searchsorted(chunk_offsets, grid_ids, right=True) - 1).to(torch.int32)
        return cls(cu, chunk_offsets, seq_of_chunk, n_seq, n_chunks,
                   next_pow2(q.shape[-1]), next_pow2(v.shape[-1]), kernel_config(dev))


def _scratch(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_descriptor_allocator(x):
    """In-kernel tensor descriptors need global scratch memory on the GPU. Triton keeps the allocator
    in a context variable, so it is set again in the autograd engine's thread for the backward."""
    if x.is_cuda:
        triton.set_allocator(_scratch)


def _check_layout(tensors):
    """The state kernels' tensor descriptors need 16-byte aligned rows on the GPU."""
    for name, x in tensors.items():
        if x.dtype == torch.float64:
            raise ValueError(f"{name}: the Triton backend has no float64 kernels; use backend='torch'")
        if x.is_cuda and (x.shape[-1] * x.element_size()) % 16:
            raise ValueError(
                f"{name}: the Triton backend needs the head dimension times the element size to be a "
                f"multiple of 16 bytes, got {x.shape[-1]} x {x.element_size()}"
            )


def _intra(q, k, v, g, b, w, scale, idx, use_l2norm):
    """Intra-chunk pass; returns the per-chunk tensors (chunk-major rows, 64 per chunk and head)."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    rows = idx.n_chunks * H * CHUNK
    out = {
        "qg": q.new_empty(rows, K),
        "kt": q.new_empty(rows, K),
        "y": q.new_empty(rows, K),
        "u": q.new_empty(rows, V),
        "aqk": q.new_empty(rows, CHUNK),
        "gc": q.new_empty(idx.n_chunks * H, idx.BK, dtype=torch.float32),
        "a": q.new_empty(rows, CHUNK, dtype=torch.float32),
    }
    chunk_intra_fwd_kernel[(idx.n_chunks, H)](
        q, k, v, g, b, w,
        out["qg"], out["kt"], out["y"], out["u"], out["aqk"], out["a"], out["gc"],
        idx.cu_seqlens, idx.chunk_offsets, idx.seq_of_chunk,
        idx.N, idx.n_chunks, scale,
        H=H, K=K, V=V, BK=idx.BK, BKC=min(idx.BK, idx.cfg.intra_bk), BVC=min(idx.BV, idx.cfg.intra_bv),
        USE_L2NORM=use_l2norm,
        num_warps=idx.cfg.intra_warps, num_stages=1,
    )
    return out


def _state_bv(idx):
    return min(idx.BV, idx.cfg.state_bv)


def chunk_gdn2_fwd(q, k, v, g, b, w, scale, initial_state, output_final_state, use_l2norm, idx, save_states):
    """Returns o, the final state (or None), the per-chunk entering states (or None) and the intra
    tensors."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    intra = _intra(q, k, v, g, b, w, scale, idx, use_l2norm)
    o = torch.empty_like(v)
    states = q.new_empty(idx.n_chunks * H * idx.BK, V) if save_states else None
    ht = q.new_empty(idx.N, H, K, V, dtype=torch.float32) if output_final_state else None
    BV = _state_bv(idx)
    chunk_state_fwd_kernel[(triton.cdiv(V, BV), idx.N, H)](
        intra["qg"], intra["kt"], intra["y"], intra["u"], intra["aqk"], intra["gc"],
        initial_state, o, states, ht,
        idx.cu_seqlens, idx.chunk_offsets, idx.n_chunks,
        H=H, K=K, V=V, BK=idx.BK, BV=BV,
        HAS_H0=initial_state is not None, SAVE_STATES=save_states,
        STORE_HT=output_final_state,
        num_warps=idx.cfg.state_warps, num_stages=idx.cfg.state_stages,
    )
    return o, ht, states, intra


def chunk_gdn2_bwd(q, k, v, g, b, w, scale, initial_state, use_l2norm, idx, states, intra, do, dht, h0_grad):
    """Gradients for q, k, v, g, b, w (w.r.t. the normalised q, k when use_l2norm) and the initial
    state; `intra` is the forward's intra tensors or None (then they are recomputed)."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    cfg = idx.cfg
    if use_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    if intra is None:
        intra = _intra(q, k, v, g, b, w, scale, idx, False)
    rows = idx.n_chunks * H * CHUNK
    dstates = q.new_empty(idx.n_chunks * H * idx.BK, V)
    dr = q.new_empty(rows, V)
    dh0 = torch.empty_like(initial_state) if h0_grad else None
    BV = _state_bv(idx)
    chunk_state_bwd_kernel[(triton.cdiv(V, BV), idx.N, H)](
        intra["qg"], intra["kt"], intra["y"], intra["aqk"], intra["gc"], do, dht, dh0, dstates, dr,
        idx.cu_seqlens, idx.chunk_offsets, idx.n_chunks,
        H=H, K=K, V=V, BK=idx.BK, BV=BV,
        HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        num_warps=cfg.state_warps, num_stages=cfg.state_stages,
    )
    r = q.new_empty(rows, V)
    dvp = q.new_empty(rows, V)
    daqk = q.new_empty(rows, CHUNK, dtype=torch.float32)
    dtm = q.new_empty(rows, CHUNK, dtype=torch.float32)
    dv, dw = torch.empty_like(v), torch.empty_like(w)
    chunk_bwd_wy_kernel[(idx.n_chunks, H)](
        v, w, do, intra["y"], intra["u"], intra["a"], states, dr,
        r, dvp, daqk, dtm, dv, dw,
        idx.cu_seqlens, idx.chunk_offsets, idx.seq_of_chunk,
        idx.N, idx.n_chunks,
        H=H, K=K, V=V, BK=idx.BK, BV=min(idx.BV, cfg.wy_bv),
        num_warps=cfg.wy_warps, num_stages=1,
    )
    dq, dk, dg, db = (torch.empty_like(x) for x in (q, k, g, b))
    BKq = min(idx.BK, cfg.qkg_bk)
    chunk_bwd_qkg_kernel[(idx.n_chunks, H, triton.cdiv(K, BKq))](
        q, k, g, b, do, states, dstates, r, dvp, daqk, dtm,
        dq, dk, dg, db,
        idx.cu_seqlens, idx.chunk_offsets, idx.seq_of_chunk,
        idx.N, idx.n_chunks, scale,
        H=H, K=K, V=V, BKS=idx.BK, BK=BKq, BV=min(idx.BV, cfg.qkg_bv),
        num_warps=cfg.qkg_warps, num_stages=1,
    )
    return dq, dk, dv, dg, db, dw, dh0


L2NORM_EPS = 1e-6


def _l2norm(x):
    """The same row normalisation the intra kernel applies in the forward."""
    xf = x.float()
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + L2NORM_EPS)).to(x.dtype)


def _l2norm_bwd(x, dxn):
    """Gradient w.r.t. x of x / sqrt(|x|^2 + eps) given the gradient dxn w.r.t. the result."""
    xf, dxn = x.float(), dxn.float()
    r = torch.rsqrt((xf * xf).sum(-1, keepdim=True) + L2NORM_EPS)
    xn = xf * r
    return (r * (dxn - xn * (xn * dxn).sum(-1, keepdim=True))).to(x.dtype)


class ChunkGDN2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, b, w, scale, initial_state, output_final_state, use_l2norm, cu_seqlens):
        idx = ChunkIndex.build(q, v, cu_seqlens)
        save = any(ctx.needs_input_grad)
        o, ht, states, intra = chunk_gdn2_fwd(q, k, v, g, b, w, scale, initial_state, output_final_state,
                                              use_l2norm, idx, save_states=save)
        if save:
            ctx.intra = None if idx.cfg.recompute_intra else intra
            ctx.save_for_backward(q, k, v, g, b, w, initial_state, states)
            ctx.idx, ctx.scale, ctx.use_l2norm = idx, scale, use_l2norm
            ctx.h0_grad = initial_state is not None and ctx.needs_input_grad[7]
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, b, w, initial_state, states = ctx.saved_tensors
        _ensure_descriptor_allocator(q)
        dq, dk, dv, dg, db, dw, dh0 = chunk_gdn2_bwd(
            q, k, v, g, b, w, ctx.scale, initial_state, ctx.use_l2norm, ctx.idx, states, ctx.intra,
            do.contiguous(), None if dht is None else dht.contiguous(), ctx.h0_grad,
        )
        ctx.intra = None
        if ctx.use_l2norm:
            dq, dk = _l2norm_bwd(q, dq), _l2norm_bwd(k, dk)
        return dq, dk, dv, dg, db, dw, None, dh0, None, None, None


def chunk_gdn2_triton(q, k, v, g, b, w, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                      cu_seqlens):
    """Chunkwise GDN-2 forward with autograd (inputs already validated, contiguous; scale a float).

    Returns (o in q's dtype [B, T, H, V], final state fp32 [N, H, K, V] or None).
    """
    _check_layout({"q": q, "k": k, "v": v, "g": g, "b": b, "w": w})
    _ensure_descriptor_allocator(q)
    if initial_state is not None:
        initial_state = initial_state.float().contiguous()
    return ChunkGDN2Function.apply(q, k, v, g, b, w, float(scale), initial_state, output_final_state,
                                   use_qk_l2norm_in_kernel, cu_seqlens)
