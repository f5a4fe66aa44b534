"""Training progress: throughput, TFLOP/s, MFU, memory, ETA, and the log line.

One line every ``--log-interval`` steps, on rank 0, for example::

    iter 1200/40000 | 0.630B tok | loss 3.2145 | lr 3.98e-04 | grad norm 0.412 |
    312.5K tok/s | 402.1 TFLOP/s/GPU | MFU 40.6% | mem 61.2/70.0 GB | skipped 0 | ETA 3h27m

Rates are averaged over the steps since the previous line (evaluation and checkpoint time is
excluded). Memory is the device's peak allocated / peak reserved since the previous line on GPU,
and the process's resident set size on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["IntervalStats", "ProgressMeter", "format_duration", "memory_gb"]


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    days, rem = divmod(seconds, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}" if unit != "B" else f"{n / scale:.3f}{unit}"
    return f"{n:.0f}"


def memory_gb() -> tuple[float, float | None]:
    """(peak allocated, peak reserved) GB on GPU since the last call; (RSS, None) on CPU."""
    if torch.cuda.is_available():
        allocated = torch.cuda.max_memory_allocated() / 1e9
        reserved = torch.cuda.max_memory_reserved() / 1e9
        torch.cuda.reset_peak_memory_stats()
        return allocated, reserved
    import psutil

    return psutil.Process().memory_info().rss / 1e9, None


@dataclass
class IntervalStats:
    iteration: int
    total_iters: int
    consumed_tokens: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens_per_s: float
    tflops_per_device: float
    mfu: float | None
    memory: tuple[float, float | None]
    skipped: int
    eta_s: float

    def line(self) -> str:
        grad = f"{self.grad_norm:.3f}" if self.grad_norm is not None else "-"
        mfu = f"{100 * self.mfu:.1f}%" if self.mfu is not None else "n/a"
        used, reserved = self.memory
        mem = f"{used:.1f}/{reserved:.1f} GB" if reserved is not None else f"{used:.2f} GB RSS"
        return (f"iter {self.iteration}/{self.total_iters} | {_human(self.consumed_tokens)} tok | "
                f"loss {self.loss:.4f} | lr {self.lr:.3e} | grad norm {grad} | "
                f"{_human(self.tokens_per_s)} tok/s | {self.tflops_per_device:.2f} TFLOP/s/dev | "
                f"MFU {mfu} | mem {mem} | skipped {self.skipped} | ETA {format_duration(self.eta_s)}")

    def as_dict(self) -> dict:
        out = {"train/loss": self.loss, "train/lr": self.lr, "train/tokens_per_s": self.tokens_per_s,
               "train/tflops_per_device": self.tflops_per_device,
               "train/consumed_tokens": self.consumed_tokens, "train/skipped_steps": self.skipped,
               "train/memory_gb": self.memory[0]}
        if self.grad_norm is not None:
            out["train/grad_norm"] = self.grad_norm
        if self.mfu is not None:
            out["train/mfu"] = self.mfu
        return out


class ProgressMeter:
    """Accumulates step times and losses between log lines."""

    def __init__(self, *, total_iters: int, tokens_per_step: int, flops_per_token: float,
                 world_size: int, peak_tflops: float | None):
        self.total_iters = total_iters
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak = peak_tflops
        self._reset()

    def _reset(self) -> None:
        self.step_time = 0.0
        self.steps = 0
        self.loss_sum = 0.0
        self.loss_count = 0
        self.grad_norm = None

    def record(self, seconds: float, loss: float | None, grad_norm: float | None) -> None:
        self.step_time += seconds
        self.steps += 1
        if loss is not None:
            self.loss_sum += loss
            self.loss_count += 1
        if grad_norm is not None:
            self.grad_norm = grad_norm

    def summarize(self, *, iteration: int, consumed_tokens: int, lr: float, skipped: int) -> IntervalStats:
        per_step = self.step_time / max(self.steps, 1)
        tokens_per_s = self.tokens_per_step / per_step if per_step > 0 else 0.0
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        stats = IntervalStats(
            iteration=iteration, total_iters=self.total_iters, consumed_tokens=consumed_tokens,
            loss=self.loss_sum / self.loss_count if self.loss_count else float("nan"), lr=lr,
            grad_norm=self.grad_norm, tokens_per_s=tokens_per_s, tflops_per_device=tflops,
            mfu=tflops / self.peak if self.peak else None, memory=memory_gb(), skipped=skipped,
            eta_s=per_step * (self.total_iters - iteration),
        )
        self._reset()
        return stats

