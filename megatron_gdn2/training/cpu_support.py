"""Run Megatron-Core on a machine without a GPU (the quickstart and CPU training runs).

Megatron-Core assumes CUDA in a handful of places even when every tensor lives on the CPU. Each
patch below names the call that fails without it (verified on megatron-core 0.16.1 and 0.19.2):

- ``model_parallel_cuda_manual_seed`` / ``CudaRNGStatesTracker.fork`` read and set
  ``torch.cuda`` RNG states: the tracker is backed by the CPU generator instead;
- about 175 call sites allocate on ``torch.cuda.current_device()``: it returns the CPU device;
- the pipeline schedules allocate ``device="cuda"`` tensors and the optimizer wrappers accept only
  parameters whose ``.type()`` is ``torch.cuda.*Tensor``: a TorchFunctionMode maps CUDA devices to
  the CPU and reports CPU tensors with the CUDA type name;
- p2p communication and the checkpoint writer call ``torch.cuda.synchronize()``, and 0.19's DDP
  waits on ``torch.cuda.current_stream()``: both become no-ops;
- activation recomputation re-runs the forward inside autograd's backward, where the
  TorchFunctionMode above is not active (``get_sliding_window_causal_mask`` then allocates on
  ``"cuda"``): Megatron's ``CheckpointFunction.backward`` runs under it too.

Also ``torch.compile`` (Megatron's ``jit_fuser``) costs ~13 s per process on CPU, so dynamo is
disabled, and the tracker's "CPU RNG state changed within GPU RNG context" warning is dropped (here
the "GPU" RNG *is* the CPU one). Nothing here is applied when CUDA is available.
"""
from __future__ import annotations

import logging

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_megatron_on_cpu"]

_enabled = False


def _names_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaAsCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if _names_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if (func is torch.Tensor.to and len(args) > 1
                and not isinstance(args[1], (torch.dtype, torch.Tensor)) and _names_cuda(args[1])):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoStream:
    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _recompute_under_mode(function_cls) -> None:
    backward = function_cls.backward

    def backward_on_cpu(ctx, *grads):
        with _CudaAsCpu():
            return backward(ctx, *grads)

    function_cls.backward = staticmethod(backward_on_cpu)


def enable_megatron_on_cpu() -> None:
    """Idempotent; call before building a Megatron model in a process without CUDA."""
    global _enabled
    if _enabled or torch.cuda.is_available():
        return
    _enabled = True
    import torch._dynamo.config as dynamo_config

    dynamo_config.disable = True
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(
        lambda record: "CPU RNG state changed" not in record.getMessage())
    import megatron.core.tensor_parallel.random as mrandom

    _recompute_under_mode(mrandom.CheckpointFunction)

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    _CudaAsCpu().__enter__()  # active for the rest of the process
