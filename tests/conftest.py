"""Test session setup: runs before any test module imports torch extensions or triton."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run in the interpreter on machines without a GPU; it must be set before
    # any @triton.jit function is created, including triton's own (tl.zeros, tl.sum, ...), so
    # before torch._dynamo imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Megatron's jit_fuser is torch.compile: ~13 s per process on CPU for no gain. On a GPU
    # compilation stays on (FlexAttention needs it). Subprocesses inherit the variable.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch._dynamo.config as _dynamo_config

    _dynamo_config.disable = True
    import triton.runtime.autotuner as _autotuner

    # Autotuner benchmarks need a GPU driver: with no GPU every config reports 0 ms and the
    # first one is used.
    _autotuner.Autotuner.do_bench = property(lambda self: (lambda fn, quantiles=None: [0.0, 0.0, 0.0]))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
