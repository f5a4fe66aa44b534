"""Causal sliding-window attention on cuDNN's fused attention kernels, through the graphs of the
cuDNN frontend's Python package (`pip install nvidia-cudnn-frontend`, optional; the library
itself comes with torch).

Why cuDNN: torch's SDPA already sends full causal attention to cuDNN on Hopper, where its kernels
ran ~1.4x the FLOP rate of the compiled FlexAttention over the window (a 2K x 8 against a
16K x 1 training profile, benchmarks/RESULTS.md, session 13). SDPA has no window argument, but
cuDNN's own attention takes a diagonal band: with top-left alignment, right bound 0 and left
bound W, query i sees the keys j with 0 <= i - j < W, the SWA layer's window. Measured on the
1.3B hybrid's layers: 1.26-1.27x faster than FlexAttention, forward+backward.

cuDNN's attention takes 16-bit inputs only. Graphs are built once per layout (shapes, strides,
dtype, window, scale, device) and cached; each call runs on torch's current stream.
"""
from __future__ import annotations

import functools

import torch

# cuDNN runs a diagonal band from this backend version on
MIN_BACKEND_VERSION = 90200
DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _frontend():
    """The cuDNN frontend module, or None when it is not installed or cannot run here."""
    if not torch.cuda.is_available():
        return None
    # loads torch's libcudnn, which the frontend then finds by its name among the loaded libraries
    torch.backends.cudnn.version()
    try:
        import cudnn
    except ImportError:
        return None
    return cudnn if cudnn.backend_version() >= MIN_BACKEND_VERSION else None


def available() -> bool:
    """True when the cuDNN frontend is installed and its cuDNN runs windowed attention."""
    return _frontend() is not None


def require():
    """The cuDNN frontend module; an error naming what is missing where it cannot run."""
    cudnn = _frontend()
    if cudnn is None:
        raise RuntimeError("swa_attention_impl='cudnn' needs a CUDA GPU, `pip install nvidia-cudnn-frontend` "
                           f"and cuDNN >= {MIN_BACKEND_VERSION} (torch's); use 'flex' otherwise")
    return cudnn


@functools.cache
def _handle(device_index: int):
    with torch.cuda.device(device_index):
        return require().create_handle()


Layout = tuple[tuple[int, ...], tuple[int, ...]]  # (shape, strides)


def _layout(x: torch.Tensor) -> Layout:
    return tuple(x.shape), tuple(x.stride())


class _Plan:
    """A built cuDNN graph and its tensors by name."""

    def __init__(self, graph, tensors: dict):
        self.graph, self.tensors = graph, tensors
        self.workspace_size = graph.get_workspace_size()

    def run(self, device: torch.device, **buffers: torch.Tensor) -> None:
        cudnn = require()
        handle = _handle(device.index)
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
        workspace = torch.empty(self.workspace_size, device=device, dtype=torch.uint8)
        self.graph.execute({self.tensors[name]: x for name, x in buffers.items()}, workspace, handle=handle)


def _graph(dtype: torch.dtype, device_index: int):
    cudnn = require()
    io_type = cudnn.data_type.BFLOAT16 if dtype == torch.bfloat16 else cudnn.data_type.HALF
    graph = cudnn.pygraph(io_data_type=io_type, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=_handle(device_index))
    return cudnn, graph


def _inputs(graph, layouts: dict[str, Layout]) -> dict:
    return {name: graph.tensor(name=name, dim=list(shape), stride=list(stride))
            for name, (shape, stride) in layouts.items()}


def _outputs(tensors: dict, layouts: dict[str, Layout]) -> None:
    for name, (shape, stride) in layouts.items():
        tensors[name].set_output(True).set_dim(list(shape)).set_stride(list(stride))


def _build(graph, tensors: dict) -> _Plan:
    cudnn = require()
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()
    return _Plan(graph, tensors)


def _band(cudnn, window: int) -> dict:
    return dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, diagonal_band_left_bound=window,
                diagonal_band_right_bound=0)


@functools.lru_cache(maxsize=64)
def _forward_plan(dtype, device_index, window, scale, q: Layout, k: Layout, v: Layout, o: Layout,
                  stats: Layout) -> _Plan:
    cudnn, graph = _graph(dtype, device_index)
    t = _inputs(graph, {"q": q, "k": k, "v": v})
    t["o"], t["stats"] = graph.sdpa(name="swa", q=t["q"], k=t["k"], v=t["v"], attn_scale=scale,
                                    generate_stats=True, **_band(cudnn, window))
    _outputs(t, {"o": o, "stats": stats})
    t["stats"].set_data_type(cudnn.data_type.FLOAT)
    return _build(graph, t)


@functools.lru_cache(maxsize=64)
def _backward_plan(dtype, device_index, window, scale, q: Layout, k: Layout, v: Layout, o: Layout,
                   do: Layout, stats: Layout, dq: Layout, dk: Layout, dv: Layout) -> _Plan:
    cudnn, graph = _graph(dtype, device_index)
    t = _inputs(graph, {"q": q, "k": k, "v": v, "o": o, "do": do})
    t["stats"] = graph.tensor(name="stats", dim=list(stats[0]), stride=list(stats[1]),
                              data_type=cudnn.data_type.FLOAT)
    t["dq"], t["dk"], t["dv"] = graph.sdpa_backward(
        name="swa_backward", q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["do"], stats=t["stats"],
        attn_scale=scale, **_band(cudnn, window))
    _outputs(t, {"dq": dq, "dk": dk, "dv": dv})
    return _build(graph, t)


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    # cuDNN reads each head's vector as one contiguous row
    return x if x.stride(-1) == 1 else x.contiguous()


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float):
        q, k, v = (_unit_last_stride(x) for x in (q, k, v))
        batch, heads, seq_len, head_dim = q.shape
        # [s, b, heads, d] storage: the caller's [s, b, heads * d] output is then a view
        o = q.new_empty(seq_len, batch, heads, head_dim).permute(1, 2, 0, 3)
        stats = torch.empty(batch, heads, seq_len, 1, device=q.device, dtype=torch.float32)
        key = (q.dtype, q.device.index, window, scale)
        plan = _forward_plan(*key, *map(_layout, (q, k, v, o, stats)))
        plan.run(q.device, q=q, k=k, v=v, o=o, stats=stats)
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.key = key
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, stats = ctx.saved_tensors
        do = _unit_last_stride(do)
        # the inputs' layouts where they are dense (the split with RoPE reads them back so)
        dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
        plan = _backward_plan(*ctx.key, *map(_layout, (q, k, v, o, do, stats, dq, dk, dv)))
        plan.run(q.device, q=q, k=k, v=v, o=o, do=do, stats=stats, dq=dq, dk=dk, dv=dv)
        return dq, dk, dv, None, None


def cudnn_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                           scale: float) -> torch.Tensor:
    """q [b, heads, s, d], k/v [b, groups, s, d] (16-bit, on a GPU) -> [b, heads, s, d]: query i
    attends to keys i - window + 1 .. i. Grouped-query heads are native."""
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"cudnn_window_attention: q, k and v must share one of {DTYPES}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if window < 1:
        raise ValueError(f"cudnn_window_attention: window must be >= 1, got {window}")
    return _WindowAttention.apply(q, k, v, window, float(scale))
