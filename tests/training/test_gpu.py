"""bf16 pretraining on GPUs through the real command line (torchrun, NCCL, Triton kernels)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_gdn2.training.checkpointing import latest_iteration

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]


def _pretrain(corpus, save: Path, gpus: int, *extra: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
           "-m", "megatron_gdn2.training.pretrain", "--model", "swa_gdn2_tiny",
           "--tokenizer", corpus.tokenizer, "--train-data", corpus.prefix, "--split", "95,5,0",
           "--data-cache-dir", corpus.cache_dir, "--seq-length", "64", "--micro-batch-size", "2",
           "--global-batch-size", "8", "--train-iters", "20", "--lr", "1e-2", "--lr-warmup-tokens", "1024",
           "--log-interval", "1", "--eval-interval", "10", "--eval-iters", "2", "--save", str(save),
           "--save-interval", "10", "--use-distributed-optimizer", *extra]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _losses(log: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"iter (\d+)/\d+ .*?\| loss ([0-9.]+)", log)}


def test_bf16_training_and_resume_at_another_layout(corpus, tmp_path):
    gpus = min(2, torch.cuda.device_count())
    log = _pretrain(corpus, tmp_path / "ref", gpus)
    assert "bf16 on cuda" in log and "MFU n/a" not in log, log
    valid = [float(v) for v in re.findall(r"validation at iter \d+: loss ([0-9.]+)", log)]
    assert len(valid) == 3 and valid[0] - valid[-1] > 1.5, valid
    ref = _losses(log)
    assert latest_iteration(tmp_path / "ref") == 20
    tp = ["--tensor-model-parallel-size", str(gpus)]
    resumed = _losses(_pretrain(corpus, tmp_path / "tp", gpus, *tp, "--load", str(tmp_path / "ref"),
                                "--load-iteration", "10"))
    assert sorted(resumed) == list(range(11, 21))
    for it, loss in resumed.items():
        assert loss == pytest.approx(ref[it], abs=2e-2), it  # bf16, another reduction order
