"""Test session setup: runs before any test module imports torch extensions or triton."""
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run in the interpreter on machines without a GPU; it must be set before
    # any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")
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
