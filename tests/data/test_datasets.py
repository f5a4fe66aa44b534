"""GPT datasets through BlendedMegatronDatasetBuilder and the micro-batch loader, on real data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_gdn2.data.datasets import DataConfig, MicroBatchSampler, build_data_loader, build_datasets
from tests.data.conftest import TOKENIZERS

SEQ = 64


def _config(tmp_path, **kwargs) -> DataConfig:
    kwargs.setdefault("tokenizer", str(TOKENIZERS["gpt2"]))
    return DataConfig(seq_length=SEQ, seed=1234, cache_dir=str(tmp_path / "cache"), **kwargs)


def _split_tokens(prefix: str, split: tuple[float, ...]) -> list[int]:
    """Tokens per split, computed from the .idx as Megatron splits documents (rounded bookends)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)  # must outlive the copy: its arrays view the mapped file
    lengths = dataset.sequence_lengths.astype(np.int64)
    bounds = np.cumsum([0.0, *split]) / sum(split)
    cuts = [int(round(b * len(lengths))) for b in bounds]
    return [int(lengths[a:b].sum()) for a, b in zip(cuts[:-1], cuts[1:])]


def _loader(dataset, consumed=0, mbs=2, rank=0, dp=1, **kwargs):
    return build_data_loader(dataset, consumed_samples=consumed, micro_batch_size=mbs,
                             data_parallel_rank=rank, data_parallel_size=dp, **kwargs)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _same(batches_a, batches_b) -> bool:
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(batches_a, batches_b)
    )


@pytest.fixture(scope="module")
def wiki_splits(data_dir, tmp_path_factory):
    cfg = _config(tmp_path_factory.mktemp("wiki_splits"), data_path=data_dir["wiki"], split="969,30,1")
    return build_datasets(cfg, [2000, 100, 10])


def test_split_sample_counts_and_sample_layout(wiki_splits, data_dir):
    expected = [(tokens - 1) // SEQ for tokens in _split_tokens(data_dir["wiki"], (969, 30, 1))]
    assert [len(d) for d in wiki_splits] == expected
    sample = wiki_splits[0][5]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    assert torch.equal(sample["position_ids"], torch.arange(SEQ))
    assert sample["loss_mask"].dtype == torch.float32 and bool((sample["loss_mask"] == 1).all())


def test_more_samples_than_one_epoch_repeat_the_split(data_dir, tmp_path):
    train_tokens, valid_tokens = _split_tokens(data_dir["books"], (2, 1))  # 3 books: 2 train, 1 valid
    per_epoch = (train_tokens - 1) // SEQ
    train, valid, test = build_datasets(_config(tmp_path, data_path=data_dir["books"], split="2,1"),
                                        [int(2.5 * per_epoch), 10, None])
    assert len(train) == (3 * train_tokens - 1) // SEQ  # three epochs cover 2.5 epochs of samples
    assert test is None and len(valid) == (valid_tokens - 1) // SEQ


def test_weighted_blend_draws_in_proportion(data_dir, tmp_path):
    cfg = _config(tmp_path, data_path=f"30 {data_dir['wiki']} 70 {data_dir['books']}", split="2,1")
    train, valid, test = build_datasets(cfg, [1000, 50, 0])
    assert (len(train), len(valid), test) == (1000, 50, None)
    counts = np.bincount([int(train[i]["dataset_id"]) for i in range(len(train))], minlength=2)
    assert abs(counts[0] - 300) <= 1 and abs(counts[1] - 700) <= 1
    batch = next(_loader(train, mbs=4))
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}  # dataset_id is dropped


def test_separate_split_paths(data_dir, tmp_path):
    cfg = _config(tmp_path, train_data_path=[data_dir["wiki"], data_dir["books"]],
                  valid_data_path=data_dir["books"])
    train, valid, test = build_datasets(cfg, [None, None, None])
    wiki_tokens, books_tokens = (_split_tokens(data_dir[k], (1,))[0] for k in ("wiki", "books"))
    # Unweighted blends take every sample of each dataset once.
    assert len(train) == (wiki_tokens - 1) // SEQ + (books_tokens - 1) // SEQ
    assert len(valid) == (books_tokens - 1) // SEQ and test is None


def test_loader_resumes_exactly_from_consumed_samples(wiki_splits):
    train = wiki_splits[0]
    straight = _take(_loader(train, mbs=3), 20)
    resumed_loader = _loader(train, consumed=8 * 3, mbs=3)
    assert _same(_take(resumed_loader, 12), straight[8:])
    assert resumed_loader.consumed_samples == 20 * 3
    assert _same(_take(_loader(train, mbs=3, num_workers=2), 20), straight)
    assert straight[0]["tokens"].shape == (3, SEQ) and straight[0]["tokens"].dtype == torch.int64


def test_data_parallel_shards_are_disjoint_and_cover_the_single_rank_order(wiki_splits):
    train = wiki_splits[0]
    single = _take(_loader(train, mbs=2, dp=1), 20)
    ranks = [_take(_loader(train, mbs=2, rank=r, dp=2), 10) for r in range(2)]
    assert _same([b for step in zip(*ranks) for b in step], single)

    indices = [list(zip(range(10), MicroBatchSampler(len(train), consumed_samples=0, micro_batch_size=2,
                                                     data_parallel_rank=r, data_parallel_size=2)))
               for r in range(2)]
    seen = [i for rank in indices for _, batch in rank for i in batch]
    assert sorted(seen) == list(range(40))


def test_loader_is_cyclic_past_the_end(wiki_splits):
    valid = wiki_splits[1]
    batches = _take(_loader(valid, mbs=4), 2 * len(valid) // 4 + 1)
    samples = torch.cat([b["tokens"] for b in batches])
    expected = torch.stack([valid[g % len(valid)]["tokens"] for g in range(len(samples))])
    assert len(samples) > len(valid) and torch.equal(samples, expected)


def _rank_batches(cfg: DataConfig, steps: int):
    from megatron.core import parallel_state

    train = build_datasets(cfg, [400, 10, 10])[0]
    loader = _loader(train, mbs=2, rank=parallel_state.get_data_parallel_rank(),
                     dp=parallel_state.get_data_parallel_world_size())
    return [b["tokens"] for b in _take(loader, steps)]


def test_distributed_build_matches_single_process(data_dir, tmp_path):
    from tests.harness import run_distributed

    cfg = _config(tmp_path, data_path=f"1 {data_dir['wiki']} 1 {data_dir['books']}", split="2,1")
    per_rank = run_distributed(_rank_batches, world_size=2, args=(cfg, 6), timeout=300)
    train = build_datasets(cfg, [400, 10, 10])[0]
    single = [b["tokens"] for b in _take(_loader(train, mbs=2), 12)]
    interleaved = [t for step in zip(*per_rank) for t in step]
    assert all(torch.equal(a, b) for a, b in zip(interleaved, single)) and len(interleaved) == 12


def test_bad_configs_are_reported(data_dir, tmp_path, wiki_splits):
    wiki = data_dir["wiki"]
    cases = [
        (dict(data_path=f"{wiki}-missing"), FileNotFoundError, "wiki-missing.bin"),
        (dict(data_path=f"-1 {wiki}"), ValueError, "weights must be positive"),
        (dict(data_path=f"{wiki} 30 {wiki}"), ValueError, "cannot read"),
        (dict(data_path=wiki, split="train,valid"), ValueError, "split must be"),
        (dict(data_path=data_dir["books"], split="90,10"), ValueError, "valid split of dataset .* gets none"),
        (dict(data_path=wiki, train_data_path=wiki), ValueError, "not both"),
        (dict(), ValueError, "no data"),
        (dict(data_path=wiki, tokenizer=str(TOKENIZERS["mistral_v1"])), ValueError, "vocab size 50257"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            build_datasets(_config(tmp_path, **kwargs), [10, 10, 10])
    train = wiki_splits[0]
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        _loader(train, consumed=3, mbs=2)
    with pytest.raises(ValueError, match="data_parallel_rank 2"):
        _loader(train, rank=2, dp=2)
    with pytest.raises(ValueError, match="unknown data backend 'jax'"):
        _loader(train, backend="jax")


def test_missing_cpp_helpers_give_a_clear_error(monkeypatch):
    import sys

    from megatron_gdn2.data import datasets

    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers_cpp", None)  # import fails
    with pytest.raises(RuntimeError, match="helpers_cpp cannot be imported"):
        datasets._ensure_helpers()
