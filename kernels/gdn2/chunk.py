"""Chunkwise GDN-2 with Triton kernels: the autograd function and its launches.

Forward (chunk_intra.py, then chunk_state.py): cumsum of g, the scores Aqk and T, the inverse
A = (I + T)^-1, the WY tensors Y, U (with Qg, Ktail), then the sequential state pass fused with
the output. Backward: the forward's per-chunk tensors (or the same kernels again, see
KernelConfig.recompute_intra), the state-gradient pass (reverse over chunks), then chunk_bwd.py:
WY gradients (dv, dw, dAqk, dT), the state products' parts of dq, dk, db, dg, and the intra-chunk
parts with the reverse cumsum of dg. Only the sequential state kernels use tensor descriptors;
the per-chunk kernels read small tiles whose descriptor loads Triton would wait on one by one
(benchmarks/NOTES_kernels.md).

Packed sequences are addressed through device tensors built from cu_seqlens (no host sync); every
length is a runtime argument, so new lengths never recompile.
"""
import contextvars
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch
import triton

from .chunk_bwd import chunk_intra_bwd_kernel, chunk_state_grads_kernel, chunk_wy_bwd_kernel
from .chunk_common import CHUNK, next_pow2
from .chunk_intra import (
    chunk_cumsum_kernel,
    chunk_scores_kernel,
    chunk_solve_kernel,
    chunk_wy_fwd_kernel,
)
from .chunk_state import chunk_state_bwd_kernel, chunk_state_fwd_kernel


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters (chosen per architecture; there is no autotuning). *_bk / *_bv are the
    key / value widths of the tiles a kernel loops over."""

    scores_bk: int = 64
    scores_warps: int = 4
    # software-pipeline stages of the per-chunk forward kernels' key and value loops (Triton's
    # num_stages; 3 is its default on CUDA)
    scores_stages: int = 3
    solve_warps: int = 4
    # input precision of the 16x16 products that build the inverse (fp32 inputs: ieee, in
    # FP32_OVERRIDES). tf32 against tf32x3 on the H200 (RESULTS_kernels.md, run 24): the inverse
    # kernel 0.137 -> 0.052 ms at 4x4096, no larger error against fp32 at any benchmark shape.
    inverse_precision: str = "tf32"
    wy_fwd_bk: int = 64
    wy_fwd_bv: int = 64
    wy_fwd_warps: int = 4
    wy_fwd_stages: int = 3
    state_bv: int = 64
    # the state kernels run one program per (value block, sequence, head), each sequential over the
    # sequence's chunks: with fewer programs than this (few long sequences), value blocks are halved
    # (down to 16) for more, shorter programs. 0: always state_bv.
    state_min_programs: int = 0
    # wider value blocks (0: none) where they still give state_min_programs programs (many
    # sequences): half the programs, each over the same chunks, where state_bv's programs would
    # need a second wave on the GPU; the backward's wide blocks run with their own warp count. Not
    # with an initial or final state (or their gradients): its fp32 tiles leave too little shared
    # memory at 128 on the H200 (run 33)
    state_wide_bv: int = 0
    state_wide_bwd_warps: int = 4
    state_warps: int = 4
    state_stages: int = 2
    # pipeline stages of the state kernels when their value blocks were halved: a chain of
    # latency-bound steps, whose smaller tiles leave shared memory for one more stage of loads
    state_narrow_stages: int = 2
    wy_bwd_bv: int = 64
    wy_bwd_warps: int = 4
    state_grads_bk: int = 64
    state_grads_bv: int = 64
    state_grads_warps: int = 4
    intra_bwd_bk: int = 32
    intra_bwd_warps: int = 4
    # keep the per-chunk tensors of the forward for the backward (about 100 KB per chunk and head
    # for K = V = 128) instead of recomputing them
    recompute_intra: bool = False


# keyed by CUDA compute capability major; anything else (and the CPU interpreter) uses the default.
# Hopper: chosen with `bench_gdn2.py --sweep` on an H200 (benchmarks/RESULTS_kernels.md).
CONFIGS = {
    9: KernelConfig(scores_bk=32, scores_warps=1, solve_warps=1, wy_fwd_bk=32, wy_fwd_bv=32,
                    intra_bwd_bk=64, state_min_programs=96, state_wide_bv=128, state_wide_bwd_warps=8,
                    state_narrow_stages=3),
}


# fp32 inputs run exact (ieee) products without tensor cores, whose operands take more shared
# memory: the WY gradient kernel's 64-wide value tiles need 248 KB on the H200 (limit 227 KB), and
# fp32 tiles are twice the size in the state kernels' pipeline stages (and their wide blocks)
FP32_OVERRIDES = {"wy_bwd_bv": 32, "state_wide_bv": 0, "state_narrow_stages": 2, "inverse_precision": "ieee"}


# keys wider than 128: the sequential state kernels hold [64, K] tiles of three operands; at K = 256
# with 64-wide value blocks and two pipeline stages they need 319 KB of shared memory on the H200
WIDE_KEY_OVERRIDES = {"state_bv": 32, "state_wide_bv": 0, "state_stages": 1, "state_narrow_stages": 1}


def arch_config(arch, dtype: torch.dtype = torch.bfloat16, key_dim: int = 128) -> KernelConfig:
    """The configuration for CUDA compute capability major `arch` (None: the CPU interpreter)."""
    cfg = CONFIGS.get(arch, KernelConfig())
    if dtype == torch.float32:
        cfg = replace(cfg, **FP32_OVERRIDES)
    return replace(cfg, **WIDE_KEY_OVERRIDES) if key_dim > 128 else cfg


def _arch(device: torch.device):
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None


def kernel_config(device: torch.device, dtype: torch.dtype = torch.bfloat16,
                  key_dim: int = 128) -> KernelConfig:
    return arch_config(_arch(device), dtype, key_dim)


def override_arch_config(arch, spec: str) -> None:
    """Replaces fields of architecture `arch`'s config from "field=value,field=value" (launch
    experiments: benchmarks' --sweep and --kernel-config, kernel_resources.py)."""
    fields = KernelConfig.__dataclass_fields__
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in fields:
            raise ValueError(f"kernel config: no field {key!r}; fields: {', '.join(fields)}")
        field_type = type(fields[key].default)
        overrides[key] = value == "True" if field_type is bool else field_type(value)
    CONFIGS[arch] = replace(arch_config(arch), **overrides)


def override_kernel_config(device: torch.device, spec: str) -> None:
    override_arch_config(_arch(device), spec)


@dataclass
class ChunkIndex:
    """How chunks map to sequences (device tensors, built without a host sync): token offsets
    cu_seqlens [N+1], first chunk of each sequence chunk_offsets [N+1] and, for packed sequences,
    the sequence of every chunk seq_of_chunk [n_chunks] (N for the padding entries of the packed
    grid bound). Without it every sequence has `length` tokens and the per-chunk kernels derive
    their coordinates from that."""

    cu_seqlens: torch.Tensor
    chunk_offsets: torch.Tensor
    seq_of_chunk: torch.Tensor | None
    N: int
    n_chunks: int
    BK: int
    BV: int
    cfg: KernelConfig
    length: int

    @property
    def varlen(self) -> bool:
        return self.seq_of_chunk is not None

    def coords(self):
        """The per-chunk kernels' coordinate arguments (cu_seqlens, chunk_offsets, seq_of_chunk, T)."""
        return self.cu_seqlens, self.chunk_offsets, self.seq_of_chunk, self.length

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
            seq_of_chunk = None
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
                   next_pow2(q.shape[-1]), next_pow2(v.shape[-1]),
                   kernel_config(dev, q.dtype, q.shape[-1]), length=length)


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


# inside `launch_plan`: what receives each launch (kernel, grid, args, kwargs) instead of the GPU
_LAUNCH_INSTEAD = contextvars.ContextVar("gdn2_launch_instead", default=None)
# (device, dtypes, shapes' kernel-relevant parts, flags, config) already compiled by `precompile`
_PRECOMPILED = set()


def _launch(kernel, grid, *args, **kwargs):
    instead = _LAUNCH_INSTEAD.get()
    if instead is None:
        kernel[grid](*args, **kwargs)
    else:
        instead(kernel, grid, args, kwargs)


def launch_plan(receive, q, k, v, g, b, w, scale, initial_state, output_final_state, idx, grads, h0_grad):
    """Runs the launch code of a forward (and of its backward when `grads`) with every kernel launch
    handed to receive(kernel, grid, args, kwargs) instead: nothing runs, the tensors may be empty
    (of the real shapes, so every launch parameter that depends on the shape is the real one)."""
    token = _LAUNCH_INSTEAD.set(receive)
    try:
        o, ht, states, intra = chunk_gdn2_fwd(q, k, v, g, b, w, scale, initial_state, output_final_state,
                                              idx, save_states=grads)
        if grads:
            chunk_gdn2_bwd(q, k, v, g, b, w, scale, initial_state, idx, states,
                           None if idx.cfg.recompute_intra else intra, torch.empty_like(o),
                           torch.empty_like(ht) if output_final_state else None, h0_grad)
    finally:
        _LAUNCH_INSTEAD.reset(token)


def precompile(q, k, v, g, b, w, scale, initial_state, output_final_state, idx, grads, h0_grad):
    """Compiles, on parallel threads, every kernel that this forward (and its backward when `grads`)
    will launch, once per specialization: Triton would otherwise compile the nine kernels one
    after the other at their first launches (a first call with an empty cache took 12.1 s on the
    H200 that way, 7.5 s with this: RESULTS_kernels.md runs 26 and 32). Nothing runs on the GPU
    (`launch_plan`)."""
    H = q.shape[2]
    # the state kernels' launches are the only ones that depend on the number of sequences
    key = (q.device, q.dtype, g.dtype, q.shape[-1], v.shape[-1], idx.varlen, idx.cfg,
           _state_launch(idx, H, carried=initial_state is not None or output_final_state),
           _state_launch(idx, H, backward=True, carried=output_final_state or h0_grad),
           initial_state is not None, output_final_state, grads, h0_grad)
    if not q.is_cuda or key in _PRECOMPILED:
        return
    triton.runtime.driver.active.get_current_device()  # the driver's one-time set-up, on this thread
    futures = []
    with ThreadPoolExecutor(max_workers=9) as pool:
        launch_plan(lambda kernel, grid, args, kwargs: futures.append(
                        pool.submit(kernel.warmup, *args, grid=grid, **kwargs)),
                    q, k, v, g, b, w, scale, initial_state, output_final_state, idx, grads, h0_grad)
        for future in futures:
            future.result()
    _PRECOMPILED.add(key)


def _intra(q, k, v, g, b, w, scale, idx):
    """Per-chunk forward pass; returns its tensors (chunk-major rows, 64 per chunk and head)."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    cfg = idx.cfg
    rows = idx.n_chunks * H * CHUNK
    f32 = torch.float32
    out = {
        "G": q.new_empty(rows, K, dtype=f32),
        "gc": q.new_empty(idx.n_chunks * H, idx.BK, dtype=f32),
        "aqk": q.new_empty(rows, CHUNK),
        "a": q.new_empty(rows, CHUNK, dtype=f32),
        "qg": q.new_empty(rows, K),
        "kt": q.new_empty(rows, K),
        "y": q.new_empty(rows, K),
        "u": q.new_empty(rows, V),
    }
    coords = idx.coords()
    grid = (idx.n_chunks, H)
    _launch(chunk_cumsum_kernel, grid, g, out["G"], out["gc"], *coords, idx.N,
            VARLEN=idx.varlen, H=H, K=K, BK=idx.BK, BKC=min(idx.BK, 64), num_warps=4)
    t = q.new_empty(rows, CHUNK, dtype=f32)
    _launch(
        chunk_scores_kernel, (idx.n_chunks, H, 4),
        q, k, b, out["G"], out["aqk"], t, *coords, idx.N, scale,
        VARLEN=idx.varlen, H=H, K=K, BKC=min(idx.BK, cfg.scores_bk),
        num_warps=cfg.scores_warps, num_stages=cfg.scores_stages,
    )
    _launch(chunk_solve_kernel, grid, t, out["a"], *coords, idx.N, VARLEN=idx.varlen,
            PREC=cfg.inverse_precision, num_warps=cfg.solve_warps)
    _launch(
        chunk_wy_fwd_kernel, grid,
        q, k, v, b, w, out["G"], out["gc"], out["a"], out["qg"], out["kt"], out["y"], out["u"],
        *coords, idx.N, scale,
        VARLEN=idx.varlen, H=H, K=K, V=V, BK=idx.BK, BKC=min(idx.BK, cfg.wy_fwd_bk),
        BVC=min(idx.BV, cfg.wy_fwd_bv), num_warps=cfg.wy_fwd_warps, num_stages=cfg.wy_fwd_stages,
    )
    return out


def _state_launch(idx, heads, backward=False, carried=False):
    """The state kernels' value block, pipeline stages and warps; `carried`: the pass reads or
    writes an initial or final state (or its gradient)."""
    cfg = idx.cfg
    bv = min(idx.BV, cfg.state_bv if carried else max(cfg.state_bv, cfg.state_wide_bv))
    while bv > 16 and idx.N * heads * (idx.BV // bv) < cfg.state_min_programs:
        bv //= 2
    if bv > cfg.state_bv:
        return bv, cfg.state_stages, cfg.state_wide_bwd_warps if backward else cfg.state_warps
    narrow = bv < min(idx.BV, cfg.state_bv)
    return bv, cfg.state_narrow_stages if narrow else cfg.state_stages, cfg.state_warps


def chunk_gdn2_fwd(q, k, v, g, b, w, scale, initial_state, output_final_state, idx, save_states):
    """Returns o, the final state (or None), the per-chunk entering states (or None) and the
    per-chunk tensors; q and k are already normalised when the caller asked for it."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    intra = _intra(q, k, v, g, b, w, scale, idx)
    o = torch.empty_like(v)
    states = q.new_empty(idx.n_chunks * H * idx.BK, V) if save_states else None
    ht = q.new_empty(idx.N, H, K, V, dtype=torch.float32) if output_final_state else None
    BV, stages, warps = _state_launch(idx, H, carried=initial_state is not None or output_final_state)
    _launch(
        chunk_state_fwd_kernel, (triton.cdiv(V, BV), idx.N, H),
        intra["qg"], intra["kt"], intra["y"], intra["u"], intra["aqk"], intra["gc"],
        initial_state, o, states, ht,
        idx.cu_seqlens, idx.chunk_offsets, idx.n_chunks,
        H=H, K=K, V=V, BK=idx.BK, BV=BV,
        HAS_H0=initial_state is not None, SAVE_STATES=save_states,
        STORE_HT=output_final_state,
        num_warps=warps, num_stages=stages,
    )
    return o, ht, states, intra


def chunk_gdn2_bwd(q, k, v, g, b, w, scale, initial_state, idx, states, intra, do, dht, h0_grad):
    """Gradients for q, k, v, g, b, w and the initial state; `intra` is the forward's per-chunk
    tensors or None (then they are recomputed)."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    cfg = idx.cfg
    if intra is None:
        intra = _intra(q, k, v, g, b, w, scale, idx)
    coords = idx.coords()
    rows = idx.n_chunks * H * CHUNK
    f32 = torch.float32
    dstates = q.new_empty(idx.n_chunks * H * idx.BK, V)
    dr = q.new_empty(rows, V)
    dh0 = torch.empty_like(initial_state) if h0_grad else None
    BV, stages, warps = _state_launch(idx, H, backward=True, carried=dht is not None or h0_grad)
    _launch(
        chunk_state_bwd_kernel, (triton.cdiv(V, BV), idx.N, H),
        intra["qg"], intra["kt"], intra["y"], intra["aqk"], intra["gc"], do, dht, dh0, dstates, dr,
        idx.cu_seqlens, idx.chunk_offsets, idx.n_chunks,
        H=H, K=K, V=V, BK=idx.BK, BV=BV,
        HAS_DHT=dht is not None, STORE_DH0=dh0 is not None,
        num_warps=warps, num_stages=stages,
    )
    r = q.new_empty(rows, V)
    dvp = q.new_empty(rows, V)
    daqk = q.new_empty(rows, CHUNK, dtype=f32)
    dtm = q.new_empty(rows, CHUNK, dtype=f32)
    dv, dw = torch.empty_like(v), torch.empty_like(w)
    _launch(
        chunk_wy_bwd_kernel, (idx.n_chunks, H),
        v, w, do, intra["y"], intra["u"], intra["a"], states, dr,
        r, dvp, daqk, dtm, dv, dw, *coords, idx.N,
        VARLEN=idx.varlen, H=H, K=K, V=V, BK=idx.BK, BV=min(idx.BV, cfg.wy_bwd_bv),
        num_warps=cfg.wy_bwd_warps,
    )
    dq_s, de_s, dk_s = (q.new_empty(rows, K, dtype=f32) for _ in range(3))
    dgc = q.new_empty(idx.n_chunks * H, idx.BK, dtype=f32)
    BKs = min(idx.BK, cfg.state_grads_bk)
    _launch(
        chunk_state_grads_kernel, (idx.n_chunks, H, triton.cdiv(K, BKs)),
        k, do, intra["G"], intra["gc"], states, dstates, r, dvp, dq_s, de_s, dk_s, dgc,
        *coords, idx.N, scale,
        VARLEN=idx.varlen, H=H, K=K, V=V, BKS=idx.BK, BK=BKs, BV=min(idx.BV, cfg.state_grads_bv),
        num_warps=cfg.state_grads_warps,
    )
    dq, dk, dg, db = (torch.empty_like(x) for x in (q, k, g, b))
    BKi = min(idx.BK, cfg.intra_bwd_bk)
    _launch(
        chunk_intra_bwd_kernel, (idx.n_chunks, H, triton.cdiv(K, BKi)),
        q, k, b, intra["G"], daqk, dtm, dq_s, de_s, dk_s, dgc,
        dq, dk, dg, db, *coords, idx.N, scale,
        VARLEN=idx.varlen, H=H, K=K, BKS=idx.BK, BK=BKi,
        num_warps=cfg.intra_bwd_warps,
    )
    return dq, dk, dv, dg, db, dw, dh0


L2NORM_EPS = 1e-6


def _l2norm(x):
    """q / |q| per head row (fp32 arithmetic), as use_qk_l2norm_in_kernel asks."""
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
        qn, kn = (_l2norm(q), _l2norm(k)) if use_l2norm else (q, k)
        h0_grad = initial_state is not None and ctx.needs_input_grad[7]
        precompile(qn, kn, v, g, b, w, scale, initial_state, output_final_state, idx, save, h0_grad)
        o, ht, states, intra = chunk_gdn2_fwd(qn, kn, v, g, b, w, scale, initial_state, output_final_state,
                                              idx, save_states=save)
        if save:
            ctx.intra = None if idx.cfg.recompute_intra else intra
            ctx.save_for_backward(q, k, v, g, b, w, initial_state, states)
            ctx.idx, ctx.scale, ctx.use_l2norm = idx, scale, use_l2norm
            ctx.h0_grad = h0_grad
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, b, w, initial_state, states = ctx.saved_tensors
        _ensure_descriptor_allocator(q)
        qn, kn = (_l2norm(q), _l2norm(k)) if ctx.use_l2norm else (q, k)
        dq, dk, dv, dg, db, dw, dh0 = chunk_gdn2_bwd(
            qn, kn, v, g, b, w, ctx.scale, initial_state, ctx.idx, states, ctx.intra,
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
