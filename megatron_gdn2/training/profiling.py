"""``--profile``: torch.profiler over a window of training steps on chosen ranks.

Each profiled rank writes a Chrome trace (``trace_rank<R>.json.gz``, open it in Perfetto or
chrome://tracing) to ``--profile-dir`` and logs one summary line: GPU kernel time per step, the
time of the communication kernels (NCCL) and the share of it that ran while a compute kernel ran
on another stream. That share is what ``--overlap-grad-reduce`` and ``--overlap-param-gather``
buy: with neither, every reduce-scatter and all-gather waits for compute and the share is near 0.
On a CPU (gloo) there are no GPU kernels; the trace still records the operators.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

COMMUNICATION_MARKERS = ("nccl",)


def covered_time(intervals: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """Total length of `intervals` that lies inside the union of `cover` (both lists of
    (start, end); `intervals` may overlap each other, each is counted on its own)."""
    union: list[list[float]] = []
    for start, end in sorted(cover):
        if union and start <= union[-1][1]:
            union[-1][1] = max(union[-1][1], end)
        else:
            union.append([start, end])
    total = 0.0
    for start, end in intervals:
        for u_start, u_end in union:
            if u_start >= end:
                break
            total += max(0.0, min(end, u_end) - max(start, u_start))
    return total


def is_gpu_kernel(event) -> bool:
    """A GPU kernel of a profile (an event or an averaged row), not the device-side range of a
    record_function annotation (ProfilerStep#, Optimizer.step#, ...): those span many kernels and
    counting them would count the kernels twice."""
    return (event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)
            and not event.key.startswith("ProfilerStep"))


def kernel_summary(events, steps: int) -> str:
    """The summary line from a finished profile's events (see the module docstring)."""
    kernels = [e for e in events if is_gpu_kernel(e) and e.time_range.elapsed_us() > 0]
    if not kernels:
        return "no GPU kernels recorded"
    comm, compute = [], []
    for e in kernels:
        span = (e.time_range.start, e.time_range.end)
        (comm if any(m in e.name.lower() for m in COMMUNICATION_MARKERS) else compute).append(span)
    busy = sum(end - start for start, end in compute + comm)
    comm_us = sum(end - start for start, end in comm)
    text = f"kernels {busy / 1e3 / steps:.1f} ms/step, communication {comm_us / 1e3 / steps:.1f} ms/step"
    if comm_us > 0:
        text += f", {100 * covered_time(comm, compute) / comm_us:.0f}% of it alongside compute"
    return text


class StepProfiler:
    """Profiles training steps [start, end] (inclusive, 1-based iterations) on `ranks`."""

    def __init__(self, start: int, end: int, ranks: list[int], out_dir: str, rank: int, log):
        self.start, self.end, self.out_dir, self.log = start, end, Path(out_dir), log
        self.active = rank in ranks
        self.rank = rank
        self.prof: profile | None = None

    def step_begins(self, iteration: int) -> None:
        if self.active and iteration == self.start:
            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities)
            self.prof.__enter__()

    def step_ends(self, iteration: int) -> None:
        if self.prof is None or iteration != self.end:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"trace_rank{self.rank}.json.gz"
        self.prof.export_chrome_trace(str(trace))
        summary = kernel_summary(self.prof.events(), self.end - self.start + 1)
        self.log(f"profile of steps {self.start}-{self.end} on rank {self.rank}: {summary}; trace {trace}")
        self.prof = None
