"""Megatron-Core GPT datasets (splits, weighted blends) and the pretraining micro-batch loader.

Interface (the training loop codes against these names):

``DataConfig``
    ``data_path`` ("w1 prefix1 w2 prefix2 ...", "prefix1 prefix2 ..." or a list of the same words)
    with ``split`` ("969,30,1": train/valid/test weights over each dataset's documents), or
    separate ``train_data_path`` / ``valid_data_path`` / ``test_data_path`` blends; ``seq_length``,
    ``seed``, ``tokenizer`` (a spec for ``load_tokenizer`` or a loaded ``Tokenizer``), ``cache_dir``
    (where Megatron caches its sample indices; default: beside each dataset), and Megatron's
    ``reset_position_ids`` / ``reset_attention_mask`` / ``eod_mask_loss`` /
    ``create_attention_mask`` options. Prefixes are those written by ``gdn2-preprocess``
    (``PREFIX.bin`` / ``PREFIX.idx``).

``build_datasets(cfg, train_valid_test_num_samples) -> (train, valid, test)``
    GPTDataset / BlendedDataset per split through Megatron's BlendedMegatronDatasetBuilder; a split
    with no data (weight 0 or no path) is None. ``train_valid_test_num_samples`` are the samples
    each split must provide (a dataset smaller than that is repeated in reshuffled epochs). Every
    rank builds its own datasets (rank 0 first, the others then read its cached indices): call it
    on all ranks. Each sample is a dict of int64 ``tokens`` / ``labels`` / ``position_ids`` and
    float32 ``loss_mask`` (plus ``attention_mask`` when ``create_attention_mask``).

``build_data_loader(dataset, *, consumed_samples, micro_batch_size, data_parallel_rank,
data_parallel_size, num_workers=0, backend="torch") -> MicroBatchLoader``
    An endless iterator of micro-batches (dicts of ``[micro_batch_size, seq_length]`` tensors) for
    one data-parallel rank. The global sample order is the dataset order, repeated cyclically;
    every step of ``micro_batch_size * data_parallel_size`` samples is cut into consecutive slices,
    one per rank (Megatron's pretraining sampler). The order depends only on
    ``consumed_samples`` (global samples already used, all ranks together; a multiple of
    ``micro_batch_size * data_parallel_size``), so a loader built with the consumed samples of a
    checkpoint continues exactly where training stopped. ``loader.consumed_samples`` counts on
    as batches are taken. ``backend="dali"`` gives the same batches through NVIDIA DALI
    (``megatron_gdn2.data.dali``; needs the ``dali`` extra), on the GPU when there is one;
    ``backend="torch"`` gives CPU tensors (pinned when CUDA is available).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_gdn2.data.tokenizers import Tokenizer, load_tokenizer

__all__ = [
    "BACKENDS",
    "DataConfig",
    "MicroBatchLoader",
    "MicroBatchSampler",
    "build_data_loader",
    "build_datasets",
    "collate_samples",
]

BACKENDS = ("torch", "dali")
SPLIT_NAMES = ("train", "valid", "test")
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")

Blend = tuple[list[str], list[float] | None]


@dataclass
class DataConfig:
    tokenizer: str | Tokenizer
    """Tokenizer spec (see megatron_gdn2.data.tokenizers.load_tokenizer) or a loaded Tokenizer."""
    data_path: str | Sequence[str] | None = None
    """Blend for all splits: "w1 prefix1 w2 prefix2 ..." or "prefix1 prefix2 ..." (weighted by size)."""
    split: str = "969,30,1"
    """Train/valid/test weights over the documents of every dataset in ``data_path``."""
    train_data_path: str | Sequence[str] | None = None
    valid_data_path: str | Sequence[str] | None = None
    test_data_path: str | Sequence[str] | None = None
    """Separate blends per split (instead of data_path + split)."""
    seq_length: int = 4096
    seed: int = 1234
    cache_dir: str | None = None
    """Cache of Megatron's sample indices; None: Megatron's default, PREFIX/cache/ beside each dataset."""
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False
    mmap_bin_files: bool = True
    num_dataset_builder_threads: int = 1
    eod_token: str | None = None
    """Override of the tokenizer's end-of-document token (as given to gdn2-preprocess)."""


def parse_blend(value: str | Sequence[str] | None, name: str) -> Blend | None:
    """Parse "w1 p1 w2 p2" / "p1 p2" (or the list of its words) and check every prefix exists."""
    if value is None:
        return None
    words = value.split() if isinstance(value, str) else [str(w) for w in value]
    if not words:
        return None

    def number(word: str) -> float | None:
        try:
            return float(word)
        except ValueError:
            return None

    weights: list[float] | None = None
    prefixes = words
    if len(words) % 2 == 0 and all(number(w) is not None for w in words[0::2]):
        weights = [number(w) for w in words[0::2]]
        prefixes = words[1::2]
        if any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"{name}: blend weights must be positive numbers, got {weights}")
    bad = [w for w in prefixes if number(w) is not None]
    if bad:
        raise ValueError(
            f"{name}: cannot read {value!r} as 'weight prefix weight prefix ...' or 'prefix prefix ...'"
        )
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            path = Path(prefix + ext)
            if not path.is_file():
                raise FileNotFoundError(f"{name}: {path} does not exist (expected the {ext} file of a "
                                        "dataset written by gdn2-preprocess; give the prefix without "
                                        ".bin/.idx)")
            try:
                with path.open("rb") as fh:
                    fh.read(1)
            except OSError as err:
                raise OSError(f"{name}: cannot read {path}: {err}") from err
    return prefixes, weights


def _split_bounds(split: str) -> list[tuple[float, float] | None]:
    """Megatron's split matrix: the [begin, end) fraction of documents per split, None if unused."""
    parts = split.replace("/", ",").split(",")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"split must be up to 3 non-negative comma-separated weights like '969,30,1', not {split!r}"
        )
    weights += [0.0] * (3 - len(weights))
    edges = np.cumsum([0.0, *weights]) / sum(weights)
    return [(a, b) if w > 0 else None for a, b, w in zip(edges[:-1], edges[1:], weights)]


def _check_splits_have_documents(prefixes: Sequence[str], bounds: Sequence[tuple[float, float] | None],
                                 source: str) -> None:
    """Megatron loops forever building a split with no tokens: refuse it up front."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        documents = len(IndexedDataset(prefix))
        for name, bound in zip(SPLIT_NAMES, bounds):
            if bound is not None and int(round(bound[1] * documents)) == int(round(bound[0] * documents)):
                raise ValueError(
                    f"{source}: the {name} split of dataset '{prefix}' gets none of its {documents} "
                    "documents; give that split weight 0, or use more data"
                )


def _check_tokenizer_matches(prefixes: Sequence[str], tokenizer: Tokenizer) -> None:
    """Compare with the PREFIX.meta.json that gdn2-preprocess wrote, where there is one."""
    for prefix in prefixes:
        try:
            settings = json.loads(Path(prefix + ".meta.json").read_text())["settings"]
        except (OSError, ValueError, KeyError):
            continue
        eod = settings.get("eod")
        if settings.get("vocab_size") != tokenizer.vocab_size or eod not in (None, tokenizer.eod):
            raise ValueError(
                f"dataset '{prefix}' was tokenized with a {settings.get('tokenizer_kind')} tokenizer of "
                f"vocab size {settings.get('vocab_size')} and EOD {settings.get('eod')}, but the data "
                f"config's tokenizer {tokenizer} differs"
            )


def _ensure_helpers() -> None:
    """Megatron's sample-index builders are C++ (megatron.core.datasets.helpers_cpp). Wheels ship
    it compiled; a source checkout must compile it (once, on rank 0) as Megatron-LM does."""
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
        return
    except ImportError as err:
        import_error = err
    import megatron.core.datasets as mcore_datasets

    makefile = Path(mcore_datasets.__file__).with_name("Makefile")
    if not makefile.is_file():
        raise RuntimeError(
            "megatron.core.datasets.helpers_cpp cannot be imported and this megatron-core has no "
            f"Makefile to build it ({import_error}); install a megatron-core wheel, or build it with "
            "`make -C <megatron-lm>/megatron/core/datasets`"
        )
    from megatron.core.datasets.utils import compile_helpers

    dist = torch.distributed.is_initialized()
    if not dist or torch.distributed.get_rank() == 0:
        try:
            compile_helpers()
        except SystemExit as err:  # compile_helpers exits the process when make fails
            raise RuntimeError(f"compiling {makefile.parent}/helpers.cpp failed") from err
    if dist:
        torch.distributed.barrier()
    importlib.import_module("megatron.core.datasets.helpers_cpp")


@contextlib.contextmanager
def _process_group_for_build():
    """Megatron's builders assume a process group (BlendedDataset asks for the rank when it
    caches); without one, lend them a one-rank gloo group for the duration of the build."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def build_datasets(cfg: DataConfig, train_valid_test_num_samples: Sequence[int | None]):
    """Build (train, valid, test) datasets; see the module docstring."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if len(train_valid_test_num_samples) != 3:
        raise ValueError(
            f"train_valid_test_num_samples must have 3 entries, got {list(train_valid_test_num_samples)}"
        )
    if cfg.seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, not {cfg.seq_length}")
    tokenizer = cfg.tokenizer
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer, cfg.eod_token)

    per_split = [cfg.train_data_path, cfg.valid_data_path, cfg.test_data_path]
    if cfg.data_path is not None and any(p is not None for p in per_split):
        raise ValueError("give either data_path (with split) or train/valid/test_data_path, not both")
    blend = blend_per_split = None
    if cfg.data_path is not None:
        blend = parse_blend(cfg.data_path, "data_path")
        if blend is None:
            raise ValueError("data_path is empty")
        _check_splits_have_documents(blend[0], _split_bounds(cfg.split), f"split {cfg.split!r}")
        prefixes = blend[0]
    elif any(p is not None for p in per_split):
        blend_per_split = [parse_blend(p, f"{n}_data_path") for p, n in zip(per_split, SPLIT_NAMES)]
        prefixes = [p for b in blend_per_split if b is not None for p in b[0]]
        for i, split_blend in enumerate(blend_per_split):
            if split_blend is not None:
                whole = [(0.0, 1.0) if j == i else None for j in range(3)]
                _check_splits_have_documents(split_blend[0], whole, f"{SPLIT_NAMES[i]}_data_path")
    else:
        raise ValueError("no data: set data_path or train_data_path / valid_data_path / test_data_path")
    _check_tokenizer_matches(prefixes, tokenizer)

    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=cfg.split if blend is not None else None,
        path_to_cache=cfg.cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=cfg.reset_position_ids,
        reset_attention_mask=cfg.reset_attention_mask,
        eod_mask_loss=cfg.eod_mask_loss,
        create_attention_mask=cfg.create_attention_mask,
        mmap_bin_files=cfg.mmap_bin_files,
        num_dataset_builder_threads=cfg.num_dataset_builder_threads,
    )
    _ensure_helpers()
    with _process_group_for_build():
        datasets = BlendedMegatronDatasetBuilder(
            GPTDataset, list(train_valid_test_num_samples), lambda: True, config
        ).build()
    return tuple(datasets)


# ---------------------------------------------------------------------------------------------
# loading


class MicroBatchSampler:
    """Endless dataset indices of one data-parallel rank's micro-batches.

    Global sample ``g`` is dataset item ``g % len(dataset)``; step ``s`` covers global samples
    ``[c + s*m*d, c + (s+1)*m*d)`` (``c`` consumed samples, ``m`` micro-batch size, ``d`` DP size)
    and rank ``r`` takes the slice ``[r*m, (r+1)*m)`` of it.
    """

    def __init__(self, dataset_size: int, *, consumed_samples: int, micro_batch_size: int,
                 data_parallel_rank: int, data_parallel_size: int) -> None:
        if dataset_size < 1:
            raise ValueError("the dataset is empty")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, not {micro_batch_size}")
        if data_parallel_size < 1 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {data_parallel_rank} is not in "
                f"[0, data_parallel_size={data_parallel_size})"
            )
        step = micro_batch_size * data_parallel_size
        if consumed_samples < 0 or consumed_samples % step:
            raise ValueError(
                f"consumed_samples ({consumed_samples}) must be a non-negative multiple of "
                f"micro_batch_size * data_parallel_size ({step})"
            )
        self.dataset_size = dataset_size
        self.micro_batch_size = micro_batch_size
        self.step = step
        self.first = consumed_samples + data_parallel_rank * micro_batch_size

    def index(self, batch: int, position: int) -> int:
        """Dataset index of sample ``position`` of this rank's ``batch``-th micro-batch."""
        return (self.first + batch * self.step + position) % self.dataset_size

    def __iter__(self) -> Iterator[list[int]]:
        batch = 0
        while True:
            yield [self.index(batch, i) for i in range(self.micro_batch_size)]
            batch += 1


def collate_samples(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack the model inputs of GPTDataset samples (BlendedDataset's dataset_id is dropped)."""
    return {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS if key in samples[0]}


class MicroBatchLoader:
    """Endless iterator of one rank's micro-batches; ``consumed_samples`` counts global samples
    (all data-parallel ranks) of the micro-batches taken so far."""

    def __init__(self, batches: Iterator[dict[str, torch.Tensor]], *, consumed_samples: int,
                 samples_per_step: int, backend: str) -> None:
        self._batches = batches
        self.consumed_samples = consumed_samples
        self.samples_per_step = samples_per_step
        self.backend = backend

    def __iter__(self) -> MicroBatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self._batches)
        self.consumed_samples += self.samples_per_step
        return batch


def build_data_loader(
    dataset,
    *,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
    backend: str = "torch",
) -> MicroBatchLoader:
    """An endless micro-batch iterator over ``dataset`` for one data-parallel rank (see the module
    docstring)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}: choose one of {BACKENDS}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, not {num_workers}")
    sampler = MicroBatchSampler(
        len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=data_parallel_rank,
        data_parallel_size=data_parallel_size,
    )
    if backend == "dali":
        from megatron_gdn2.data.dali import dali_batches

        batches = dali_batches(dataset, sampler, num_workers=num_workers)
    else:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_samples,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=num_workers > 0,
        )
        batches = iter(loader)
    return MicroBatchLoader(
        batches, consumed_samples=consumed_samples, samples_per_step=sampler.step, backend=backend
    )

