"""Public Gated DeltaNet-2 functions: check the inputs once, then dispatch to a backend.

Layouts follow fla: q, k, g, b are [B, T, H, K]; v, w and the output are [B, T, H, V]; the state is
[N, H, K, V] with N = B, or N = len(cu_seqlens) - 1 for packed sequences (then B must be 1).
"""
import inspect
import math
import os
from dataclasses import dataclass, replace

import torch

from .naive import recurrent_gdn2

MAX_HEAD_DIM = 256
BACKENDS = ("triton", "torch", "fla")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class GDN2Inputs:
    """Validated arguments of one call, in the order every backend takes them."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    b: torch.Tensor
    w: torch.Tensor
    scale: float
    initial_state: torch.Tensor | None
    output_final_state: bool
    use_qk_l2norm_in_kernel: bool
    cu_seqlens: torch.Tensor | None

    def as_args(self):
        return (self.q, self.k, self.v, self.g, self.b, self.w, self.scale, self.initial_state,
                self.output_final_state, self.use_qk_l2norm_in_kernel, self.cu_seqlens)


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")


def _check_cu_seqlens(cu_seqlens, batch, length, device, check_values):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with at least 2 offsets, got shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if batch != 1:
        raise ValueError(f"cu_seqlens needs the packed sequences flattened to batch size 1, got B={batch}")
    if not check_values:
        return
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != length:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={length}, got {offsets[0]}..{offsets[-1]}")
    if any(end <= start for start, end in zip(offsets[:-1], offsets[1:])):
        raise ValueError("cu_seqlens must be strictly increasing (every sequence at least one token)")


def validate_inputs(
    q, k, v, g, b, w, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens,
    check_values=True,
) -> GDN2Inputs:
    """Raises ValueError naming the offending argument; returns the arguments with scale resolved.

    `check_values=False` skips the checks that read tensor contents (g <= 0, cu_seqlens offsets):
    on a GPU each is a host-device sync, which a training step whose g is non-positive by
    construction should not pay."""
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("b", b), ("w", w)):
        _check_tensor(name, x)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    for name, x, want in (("k", k, key_dim), ("g", g, key_dim), ("b", b, key_dim), ("v", v, value_dim),
                          ("w", w, value_dim)):
        if tuple(x.shape) != (batch, length, heads, want):
            raise ValueError(f"{name} must have shape {(batch, length, heads, want)} "
                             f"(q is [B, T, H, K] = {tuple(q.shape)}), got {tuple(x.shape)}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    for name, dim in (("k", key_dim), ("v", value_dim)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} head dimension must be in [1, {MAX_HEAD_DIM}], got {dim}")
    if length == 0:
        raise ValueError("q must have at least one token (T = 0)")
    if check_values and bool((g > 0).any()):
        raise ValueError("g is a log-decay and must be <= 0 everywhere")

    if scale is None:
        scale = key_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    for name, flag in (("output_final_state", output_final_state),
                       ("use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")

    n_seq = batch
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, batch, length, q.device, check_values)
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor) or initial_state.dtype not in _FLOAT_DTYPES:
            raise ValueError("initial_state must be a floating-point torch.Tensor")
        if tuple(initial_state.shape) != (n_seq, heads, key_dim, value_dim):
            want = (n_seq, heads, key_dim, value_dim)
            raise ValueError(f"initial_state must have shape [N, H, K, V] = {want}, "
                             f"got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
    return GDN2Inputs(q, k, v, g, b, w, float(scale), initial_state, output_final_state,
                      use_qk_l2norm_in_kernel, cu_seqlens)


def _resolve_backend(backend, device):
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device} tensors")
    return backend


def _fla_ops():
    try:
        from fla.ops import gdn2
    except ImportError as err:
        raise ValueError("backend='fla' needs fla-core (pip install fla-core), not installed here") from err
    return gdn2


def _fla_call(fn, inputs: GDN2Inputs):
    # Older fla-core releases shipped a fused_recurrent_gdn2(q, k, v, g, beta, ...) without the
    # write gate; calling that positionally would silently misread w as the scale.
    if "w" not in inspect.signature(fn).parameters:
        raise ValueError(f"backend='fla': the installed fla-core's {fn.__name__} takes no write gate w "
                         "(fla-core >= 0.6.0 needed)")
    state = inputs.initial_state
    cu_seqlens = inputs.cu_seqlens
    return fn(
        inputs.q, inputs.k, inputs.v, inputs.g, inputs.b, inputs.w,
        scale=inputs.scale,
        initial_state=None if state is None else state.float(),
        output_final_state=inputs.output_final_state,
        use_qk_l2norm_in_kernel=inputs.use_qk_l2norm_in_kernel,
        cu_seqlens=None if cu_seqlens is None else cu_seqlens.long(),
    )


def _for_triton(inputs: GDN2Inputs) -> GDN2Inputs:
    """Contiguous tensors and an fp32 (fp64 for fp64 inputs) initial state: the Triton kernels address
    unit-stride rows, and a copy is what the caller would have to make anyway."""
    fields = {name: getattr(inputs, name).contiguous() for name in ("q", "k", "v", "g", "b", "w")}
    if inputs.initial_state is not None:
        state_dtype = torch.float64 if inputs.q.dtype == torch.float64 else torch.float32
        fields["initial_state"] = inputs.initial_state.to(state_dtype).contiguous()
    return replace(inputs, **fields)


def chunk_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel Gated DeltaNet-2 for training and prefill; differentiable in q, k, v, g, b, w
    and initial_state.

    S_t = (I - k_t (b_t * k_t)^T) Diag(exp(g_t)) S_{t-1} + k_t (w_t * v_t)^T,  o_t = S_t^T (scale * q_t).
    Returns (o in q's dtype, final state [N, H, K, V] in fp32 or None). `check_values=False` skips
    the content checks that sync a GPU (see `validate_inputs`).
    """
    inputs = validate_inputs(q, k, v, g, b, w, scale, initial_state, output_final_state,
                             use_qk_l2norm_in_kernel, cu_seqlens, check_values)
    backend = _resolve_backend(backend, q.device)
    if backend == "torch":
        from .chunk_torch import chunk_gdn2_torch
        return chunk_gdn2_torch(*inputs.as_args())
    if backend == "fla":
        return _fla_call(_fla_ops().chunk_gdn2, inputs)
    from .chunk import chunk_gdn2_triton
    return chunk_gdn2_triton(*_for_triton(inputs).as_args())


def fused_recurrent_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token-by-token Gated DeltaNet-2 for decoding: forward only (no autograd), fp32 state.

    Same arguments and returns as `chunk_gdn2`.
    """
    inputs = validate_inputs(q, k, v, g, b, w, scale, initial_state, output_final_state,
                             use_qk_l2norm_in_kernel, cu_seqlens, check_values)
    backend = _resolve_backend(backend, q.device)
    with torch.no_grad():
        if backend == "torch":
            from .fused_recurrent import fused_recurrent_gdn2_torch
            return fused_recurrent_gdn2_torch(*inputs.as_args())
        if backend == "fla":
            return _fla_call(_fla_ops().fused_recurrent_gdn2, inputs)
        from .fused_recurrent import fused_recurrent_gdn2_triton
        return fused_recurrent_gdn2_triton(*_for_triton(inputs).as_args())


def naive_recurrent_gdn2(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    b: torch.Tensor,
    w: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token-wise reference in fp64 (slow; differentiable). Same arguments as `chunk_gdn2`
    without `backend`."""
    inputs = validate_inputs(q, k, v, g, b, w, scale, initial_state, output_final_state,
                             use_qk_l2norm_in_kernel, cu_seqlens)
    return recurrent_gdn2(*inputs.as_args())
