"""Make Megatron-Core run on a CPU-only torch build with gloo (tests only).

Megatron-Core assumes CUDA in six places that matter for tests; each patch below names the call
that breaks without it. Measured on megatron-core 0.16.1 and 0.19.2.
"""
import torch
from torch.overrides import TorchFunctionMode

_applied = False


def _is_cuda_device(d) -> bool:
    if isinstance(d, bool):
        return False
    if isinstance(d, int):
        return True
    if isinstance(d, str):
        return d.startswith("cuda")
    return isinstance(d, torch.device) and d.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Rewrites hard-coded `device="cuda"`, `.cuda()` and `.to("cuda")` to CPU, and reports CPU
    tensors with their CUDA type string, which the optimizer wrappers check
    (`param.type() == 'torch.cuda.FloatTensor'`)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if (
            func is torch.Tensor.to
            and len(args) > 1
            and not isinstance(args[1], (torch.dtype, torch.Tensor))
            and _is_cuda_device(args[1])
        ):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NoopStream:
    def wait_event(self, *a, **k):
        pass

    def wait_stream(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *a, **k):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def apply_cpu_patches() -> None:
    """Idempotent; call before building any Megatron model in a process without CUDA."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    import megatron.core.tensor_parallel.random as mrandom

    # CudaRNGStatesTracker.add/fork -> torch.cuda.get_rng_state(): back the tracker with the CPU RNG.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # ~175 call sites allocate on torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    # p2p communication and the dist_checkpointing async writer synchronise the device.
    torch.cuda.synchronize = lambda *a, **k: None
    # megatron-core 0.19 DDP grad sync waits on torch.cuda.current_stream().
    torch.cuda.current_stream = lambda *a, **k: _NoopStream()
    # schedules.py allocates `device="cuda"` tensors; optimizer wrappers check CUDA type strings.
    _CudaToCpu().__enter__()  # stays active for the whole process
    _applied = True
