"""The DALI backend yields bit-identical batches to the torch backend (CPU pipelines, real data)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from megatron_gdn2.data.datasets import DataConfig, build_data_loader, build_datasets
from tests.data.conftest import TOKENIZERS

SEQ, MBS, STEPS = 64, 4, 300

if importlib.util.find_spec("nvidia.dali") is None:
    if os.environ.get("CI"):  # CI installs DALI (.ci/run): its absence there is a failure
        raise ImportError("tests/data/test_dali.py needs nvidia-dali-cuda120 installed in CI")
    pytest.skip("NVIDIA DALI is not installed (pip install 'megatron-gdn2[dali]')", allow_module_level=True)


@pytest.fixture(scope="module")
def blended_train(data_dir, tmp_path_factory):
    cfg = DataConfig(tokenizer=str(TOKENIZERS["gpt2"]), seq_length=SEQ, split="2,1",
                     data_path=f"40 {data_dir['wiki']} 60 {data_dir['books']}",
                     cache_dir=str(tmp_path_factory.mktemp("dali_cache")))
    return build_datasets(cfg, [2 * STEPS * MBS, 10, 0])[0]


def _batches(dataset, backend, steps, consumed=0, rank=0, dp=1, num_workers=0):
    loader = build_data_loader(dataset, consumed_samples=consumed, micro_batch_size=MBS,
                               data_parallel_rank=rank, data_parallel_size=dp, num_workers=num_workers,
                               backend=backend)
    batches = [next(loader) for _ in range(steps)]
    assert loader.consumed_samples == consumed + steps * MBS * dp
    return batches


def _assert_identical(dali, reference):
    assert len(dali) == len(reference)
    for step, (a, b) in enumerate(zip(dali, reference)):
        assert a.keys() == b.keys(), step
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, (step, key)
            assert torch.equal(a[key].cpu(), b[key]), (step, key)


def test_dali_matches_torch_over_hundreds_of_batches_and_after_resume(blended_train):
    reference = _batches(blended_train, "torch", STEPS)
    _assert_identical(_batches(blended_train, "dali", STEPS, num_workers=2), reference)
    half = STEPS // 2
    _assert_identical(_batches(blended_train, "dali", STEPS - half, consumed=half * MBS), reference[half:])


def test_dali_matches_torch_at_data_parallel_size_2(blended_train):
    for rank in range(2):
        reference = _batches(blended_train, "torch", STEPS // 2, consumed=40 * MBS * 2, rank=rank, dp=2)
        _assert_identical(
            _batches(blended_train, "dali", STEPS // 2, consumed=40 * MBS * 2, rank=rank, dp=2), reference
        )


def test_spawned_workers_receive_the_pickled_dataset(blended_train):
    # The start method used once CUDA is initialised (GPU machines): the dataset travels pickled.
    from megatron_gdn2.data.dali import dali_batches
    from megatron_gdn2.data.datasets import MicroBatchSampler

    sampler = MicroBatchSampler(len(blended_train), consumed_samples=8 * MBS, micro_batch_size=MBS,
                                data_parallel_rank=0, data_parallel_size=1)
    batches = dali_batches(blended_train, sampler, num_workers=1, start_method="spawn")
    reference = _batches(blended_train, "torch", 20, consumed=8 * MBS)
    _assert_identical([next(batches) for _ in range(20)], reference)


def test_missing_dali_names_the_extra(blended_train, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"megatron-gdn2\[dali\]"):
        build_data_loader(blended_train, consumed_samples=0, micro_batch_size=MBS, data_parallel_rank=0,
                          data_parallel_size=1, backend="dali")
