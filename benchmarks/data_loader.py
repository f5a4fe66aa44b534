"""Data loader backends side by side: torch DataLoader vs NVIDIA DALI (``build_data_loader``).

Tokenizes real text (the Wikipedia summaries and the Gutenberg validation books of
``../shared/data``, GPT-2 BPE) unless ``--data-prefix`` names an existing indexed dataset, builds a
GPTDataset of ``--seq-length`` tokens per sample, then for each backend / worker count measures the
time to the first micro-batch (pipeline start-up), the steady-state wall time per micro-batch and
the CPU time per micro-batch summed over the process and its loader workers (medians of
``--repeats`` runs of ``--batches`` batches after ``--warmup``). Runs on a CPU; on a GPU
machine the DALI batches are CUDA tensors and the torch ones are moved with ``.cuda()`` so that both
rows include the host-to-device copy. Prints a markdown table.

    python benchmarks/data_loader.py [--micro-batch-size 4] [--seq-length 4096] [--batches 500]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

from megatron_gdn2.data.datasets import DataConfig, build_data_loader, build_datasets
from megatron_gdn2.data.preprocess import PreprocessConfig, preprocess

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONFIGS = [("torch", 0), ("torch", 2), ("dali", 1), ("dali", 2)]


def _data_prefix(args, workdir: Path) -> str:
    if args.data_prefix:
        return args.data_prefix
    inputs = [SHARED / "corpora" / "wikipedia_vital_summaries" / "enwiki_vital4_summaries.jsonl.gz",
              SHARED / "corpora" / "gutenberg" / "val_00.jsonl.gz"]
    prefix = workdir / "bench"
    preprocess(PreprocessConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix),
                                tokenizer=str(SHARED / "tokenizers" / "gpt2"), workers=os.cpu_count() or 1,
                                progress=False))
    return str(prefix)


def _cpu_seconds() -> float:
    """CPU time of this process and its live children (loader workers): the work a batch costs,
    which unlike wall time does not depend on how busy a shared machine is."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _measure(dataset, backend: str, workers: int, args) -> tuple[float, float, float]:
    device = torch.device("cuda") if torch.cuda.is_available() else None
    start = time.perf_counter()
    loader = build_data_loader(dataset, consumed_samples=0, micro_batch_size=args.micro_batch_size,
                               data_parallel_rank=0, data_parallel_size=1, num_workers=workers,
                               backend=backend)

    def take():
        batch = next(loader)
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            torch.cuda.synchronize()
        return batch

    take()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        take()
    runs, cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), _cpu_seconds()
        for _ in range(args.batches):
            take()
        runs.append((time.perf_counter() - t0) / args.batches)
        cpu.append((_cpu_seconds() - c0) / args.batches)
    return first, statistics.median(runs), statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-prefix", help="an existing PREFIX.bin/.idx (default: tokenize ../shared/data)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--batches", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prefix = _data_prefix(args, Path(tmp))
        samples = args.micro_batch_size * (1 + args.warmup + args.repeats * args.batches)
        cfg = DataConfig(tokenizer=str(SHARED / "tokenizers" / "gpt2"), data_path=prefix, split="1,0,0",
                         seq_length=args.seq_length, cache_dir=str(Path(tmp) / "cache"))
        dataset = build_datasets(cfg, [samples, None, None])[0]
        rows = []
        for backend, workers in CONFIGS:
            first, per_batch, cpu = _measure(dataset, backend, workers, args)
            rows.append((backend, workers, first, per_batch, cpu))
            print(f"{backend} workers={workers}: first batch {first * 1e3:.0f} ms, "
                  f"{per_batch * 1e6:.0f} us/batch, {cpu * 1e6:.0f} us CPU/batch", flush=True)

    tokens = args.micro_batch_size * (args.seq_length + 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{device}; micro-batch {args.micro_batch_size} x {args.seq_length + 1} tokens; median of "
          f"{args.repeats} x {args.batches} batches after {args.warmup} warm-up; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| backend | workers | first batch (ms) | wall per batch (us) | CPU per batch (us) | tokens/s |")
    print("|---|---|---|---|---|---|")
    for backend, workers, first, per_batch, cpu in rows:
        print(f"| {backend} | {workers} | {first * 1e3:.0f} | {per_batch * 1e6:.0f} | {cpu * 1e6:.0f} "
              f"| {tokens / per_batch:,.0f} |")


if __name__ == "__main__":
    main()
