"""Optional NVIDIA DALI backend of ``build_data_loader`` (``backend="dali"``, ``--data-backend dali``).

It yields exactly the micro-batches of the default torch backend, bit for bit: the same
GPTDataset / BlendedDataset samples in the same order (``MicroBatchSampler``: data-parallel
slices, resume from consumed samples, cyclic past the end). Only the machinery differs: a DALI
pipeline whose parallel ``external_source`` calls the dataset in ``num_workers`` Python worker
processes (at least one), with DALI's prefetch queue; when CUDA is available the pipeline runs on
the current device and the batches arrive as CUDA tensors, copied ahead of time; without CUDA it
runs on the CPU (``device_id=None``) and yields CPU tensors.

When it helps: when the host-to-device copy or a slow sample source (remote or compressed
storage, future image/video/audio decoding) is on the critical path. When it does not: for
pre-tokenized text the dataset only slices memory-mapped token arrays, and a plain DataLoader is
faster per batch (see benchmarks/RESULTS_data.md).

Install: ``pip install 'megatron-gdn2[dali]'`` for a CUDA 12 torch, or
``'megatron-gdn2[dali-cuda130]'`` for a CUDA 13 torch (pip extras cannot depend on the installed
torch, so the choice is the user's; ``dali_package_for_torch()`` names the right one).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from megatron_gdn2.data.datasets import BATCH_KEYS, MicroBatchSampler

__all__ = ["dali_batches", "dali_package_for_torch", "require_dali"]


def dali_package_for_torch() -> tuple[str, str]:
    """(pip package, megatron-gdn2 extra) of the DALI build matching torch's CUDA major version."""
    cuda = torch.version.cuda
    if cuda is not None and int(cuda.split(".")[0]) >= 13:
        return "nvidia-dali-cuda130", "dali-cuda130"
    return "nvidia-dali-cuda120", "dali"


def require_dali() -> None:
    """Raises ImportError naming the extra to install when DALI is missing (checked before any
    long work starts)."""
    _import_dali()


def _import_dali():
    try:
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator
    except ImportError as err:
        package, extra = dali_package_for_torch()
        raise ImportError(
            f"the dali data backend needs NVIDIA DALI ({package} for this torch, CUDA "
            f"{torch.version.cuda or 'none'}): pip install 'megatron-gdn2[{extra}]' "
            f"(or pip install {package}); the default --data-backend torch needs nothing extra"
        ) from err
    return Pipeline, fn, types, DALIGenericIterator


class _SampleSource:
    """Per-sample callback of the parallel external_source: stateless (DALI's workers compute
    samples out of order), so the sample is a pure function of its position in this rank's stream."""

    def __init__(self, dataset, sampler: MicroBatchSampler, keys: Sequence[str]) -> None:
        self.dataset, self.sampler, self.keys = dataset, sampler, tuple(keys)

    def __call__(self, info) -> tuple[np.ndarray, ...]:
        batch, position = divmod(info.idx_in_epoch, self.sampler.micro_batch_size)
        sample = self.dataset[self.sampler.index(batch, position)]
        return tuple(sample[key].numpy() for key in self.keys)


def dali_batches(
    dataset, sampler: MicroBatchSampler, *, num_workers: int, start_method: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches of ``sampler`` over ``dataset`` through a DALI pipeline (built and
    started here, so a missing DALI fails at loader construction, not at the first batch).

    The Python workers fork, unless CUDA is already initialised here (a forked child cannot use
    it): then they spawn and receive the dataset pickled. ``start_method`` forces either.
    """
    Pipeline, fn, types, DALIGenericIterator = _import_dali()
    first = dataset[sampler.index(0, 0)]
    keys = [key for key in BATCH_KEYS if key in first]
    dali_types = {torch.int64: types.INT64, torch.float32: types.FLOAT, torch.bool: types.BOOL}
    device_id = torch.cuda.current_device() if torch.cuda.is_available() else None
    pipe = Pipeline(
        batch_size=sampler.micro_batch_size,
        num_threads=1,
        device_id=device_id,
        py_num_workers=max(num_workers, 1),
        py_start_method=start_method or ("spawn" if torch.cuda.is_initialized() else "fork"),
        prefetch_queue_depth=2,
    )
    with pipe:
        outputs = fn.external_source(
            source=_SampleSource(dataset, sampler, keys),
            num_outputs=len(keys),
            batch=False,
            parallel=True,
            dtype=[dali_types[first[key].dtype] for key in keys],
            ndim=[first[key].dim() for key in keys],
        )
        if device_id is not None:
            outputs = [out.gpu() for out in outputs]
        pipe.set_outputs(*outputs)
    pipe.start_py_workers()
    pipe.build()
    return (outputs[0] for outputs in DALIGenericIterator(pipe, output_map=keys, auto_reset=False))
