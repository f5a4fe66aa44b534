"""Multi-GPU runs of ``gdn2-pretrain`` through NCCL: layout equivalence, weak scaling, 7B memory.

Every run is the real command line, ``torch.distributed.run -m megatron_gdn2.training.pretrain``,
in a subprocess with ``NCCL_NVLS_ENABLE=0`` (NVLink multicast off), a per-run timeout and its log
kept in ``--workdir``; results are read back from the training log lines
(``iter N/T | ... | loss L | ... | X tok/s | ... | mem A/R GB``). Tables go to stdout and to
``$OUT/multi_gpu.md`` (rewritten after every section, so a run cut short keeps what it finished).

Subcommands (``--gpus`` defaults to every visible GPU; layouts that need more are skipped)::

    python benchmarks/multi_gpu.py layouts          # bf16 loss equivalence of parallel layouts
    python benchmarks/multi_gpu.py scaling          # data-parallel weak scaling, 1/2/4/8 GPUs
    python benchmarks/multi_gpu.py memory7b         # a 7B model at TP=2 and TP=4
    python benchmarks/multi_gpu.py all              # the three, in that order, one table file
    python benchmarks/multi_gpu.py layouts --cpu    # smoke test: gloo, fp32, 2 ranks, 3 steps

layouts: one run at TP=1 trains ``--warm-steps`` steps and saves a checkpoint (distributed
optimizer, ``fully_reshardable``); every layout then starts from that checkpoint
(``--load CKPT --load-iteration W``, as ``tests/training/test_gpu.py`` resumes at another layout:
weights, optimizer state, schedule and data position come from it) and trains ``--steps`` more
steps on the same data. Runs that fit side by side on the GPUs run concurrently. The bound on
max |loss - loss(TP=1)|:

- bf16: ``max(3 x spread, 2**-8 x max loss)``. ``spread`` is the largest difference between the
  TP=1 run and a second TP=1 run with micro-batch 1 instead of 2 (the same mathematics in another
  reduction order: other GEMM shapes, more gradient-accumulation steps): that is the bf16 noise a
  correct layout shows, measured on this machine; a parallel layout reorders the reductions in
  more places (TP all-reduces of bf16 partial sums, DP reduce-scatters), hence the factor 3. The
  floor 2**-8 x loss is bf16's unit roundoff at the loss's scale: below it the difference of two
  bf16 computations carries no information. A wrong layout (a missing all-reduce, a mis-sharded
  weight) moves the loss by far more within a few steps.
- fp32 (``--cpu``): 1e-4, which is also the resolution of the log's loss (4 decimals).

scaling: ``swa_gdn2_1.3B`` (``--model``), 4K x 4 tokens per GPU per step (one micro-batch),
data parallel on 1, 2, 4, 8 GPUs with the distributed optimizer; tokens/s is the mean of the
log intervals after the first (compilation and warm-up excluded) and before the last (its last
two steps run under ``--profile``); % of linear = tokens/s/GPU over the one-GPU value. Gradient
reduce-scatter / parameter all-gather overlap is requested with the ``gdn2-pretrain`` flags that
exist (the table names any that do not), and the profile column shows rank 0's kernel time,
communication time and the share of it that ran alongside compute (Chrome traces in --workdir).

memory7b: ``swa_gdn2_7B`` at TP=2 and TP=4 with sequence parallelism (DP=1), 4K x 1 micro-batches,
global batch 8; tokens/s per GPU and peak memory (rank 0's peak allocated / reserved, the only
rank that logs).

Data: ``--train-data PREFIX --tokenizer TOK`` (preprocessed), or the first ``--corpus-docs``
documents of ``--corpus`` (default: the tests' Wikipedia corpus from the shared data) tokenized by
``gdn2-preprocess``'s function into the work directory.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]

import train_throughput as tt  # noqa: E402  (beside this file; data preparation and output)

from megatron_gdn2.training.arguments import build_parser  # noqa: E402

CPU_BOUND = 1e-4
BF16_UNIT_ROUNDOFF = 2.0 ** -8
SPREAD_FACTOR = 3.0
SCALING_TARGET = 0.90
OVERLAP_FLAGS = ("--overlap-grad-reduce", "--overlap-param-gather")
ITER_LINE = re.compile(r"iter (\d+)/\d+ \|.*?\| loss ([0-9.naif]+) \|.*?\| ([0-9.]+)([KMB]?) tok/s \|"
                       r".*?\| mem ([0-9.]+)(?:/([0-9.]+))? GB")
UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9}
PROFILE_LINE = re.compile(r"profile of steps \d+-\d+ on rank 0: (.*?); trace")


class RunFailed(RuntimeError):
    pass


@dataclass
class Job:
    name: str
    gpus: int  # processes (one per GPU; ranks on a CPU)
    flags: list[str]
    log: Path = None
    losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: list[float] = field(default_factory=list)
    mem_gb: tuple[float, float | None] = (0.0, None)
    seconds: float = 0.0
    error: str | None = None
    profile: str | None = None  # the run's profile summary line

    @property
    def profiled(self) -> bool:
        """Its last steps ran under --profile (see scaling)."""
        return "--profile" in self.flags


@dataclass
class Layout:
    name: str
    tp: int = 1
    pp: int = 1
    dp: int = 1
    sp: bool = False
    micro_batch: int | None = None  # default: --micro-batch

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def flags(self) -> list[str]:
        return (["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp)]
                + (["--sequence-parallel"] if self.sp else []))


REFERENCE = Layout("TP=1")
NOISE = Layout("TP=1, micro-batch 1", micro_batch=1)
LAYOUTS = [Layout("TP=2", tp=2), Layout("PP=2", pp=2), Layout("DP=2", dp=2),
           Layout("TP=2 + SP", tp=2, sp=True), Layout("TP=2 x PP=2", tp=2, pp=2)]
CPU_LAYOUTS = [Layout("TP=2", tp=2), Layout("DP=2", dp=2)]


# ---- running gdn2-pretrain ----------------------------------------------------------------------
def child_env(args, devices: list[int] | None) -> dict[str, str]:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    elif devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
    return env


def parse_log(job: Job) -> None:
    text = job.log.read_text(errors="replace")
    rows = ITER_LINE.findall(text)
    job.losses = {int(it): float(loss) for it, loss, *_ in rows}
    job.tokens_per_s = [float(v) * UNITS[u] for _, _, v, u, *_ in rows]
    found = PROFILE_LINE.search(text)
    job.profile = found[1] if found else None
    if rows:
        reserved = [float(r[5]) for r in rows if r[5]]
        job.mem_gb = (max(float(r[4]) for r in rows), max(reserved) if reserved else None)


def failure_excerpt(path: Path, lines: int = 60) -> str:
    """The first Python traceback of a failed run (a rank's own error, not torchrun's report of
    it), else the log's last lines."""
    text = path.read_text(errors="replace").splitlines()
    start = next((i for i, line in enumerate(text) if "Traceback (most recent call last)" in line), None)
    return "\n".join(text[-lines:] if start is None else text[start:start + lines])


class Launcher:
    """Starts gdn2-pretrain jobs, as many side by side as fit on the GPUs (one at a time on a
    CPU, or when `exclusive`), each killed (its whole process group) at its timeout."""

    def __init__(self, args, workdir: Path, deadline: float):
        self.args, self.workdir, self.deadline = args, workdir, deadline

    def run(self, jobs: list[Job], exclusive: bool = False) -> None:
        free = list(range(max(1, self.args.gpus)))
        pending, running = list(jobs), []
        while pending or running:
            if pending and time.monotonic() >= self.deadline:
                for job in pending:
                    job.error = "not started: --budget-s spent"
                    tt.log(f"[{job.name}] {job.error}")
                pending.clear()
            for job in list(pending):
                fits = len(free) >= job.gpus and (not (exclusive or self.args.cpu) or not running)
                if fits:
                    pending.remove(job)
                    devices, free[:] = free[:job.gpus], free[job.gpus:]
                    running.append((job, devices, self._start(job, devices), time.monotonic()))
                elif not running:
                    raise RunFailed(f"{job.name} needs {job.gpus} GPUs; {self.args.gpus} available")
            time.sleep(1.0)
            for entry in list(running):
                job, devices, proc, start = entry
                limit = min(start + self.args.run_timeout, self.deadline)
                if proc.poll() is None and time.monotonic() < limit:
                    continue
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    job.error = f"timed out after {time.monotonic() - start:.0f} s"
                elif proc.returncode != 0:
                    job.error = f"exit status {proc.returncode}"
                running.remove(entry)
                free.extend(devices)
                job.seconds = time.monotonic() - start
                parse_log(job)
                tt.log(f"[{job.name}] {job.error or 'done'} in {job.seconds:.0f} s "
                       f"({len(job.losses)} logged steps; log {job.log})")
                if job.error:
                    tt.log(failure_excerpt(job.log))

    def _start(self, job: Job, devices: list[int]) -> subprocess.Popen:
        job.log = self.workdir / (re.sub(r"[^A-Za-z0-9]+", "_", job.name).strip("_") + ".log")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={job.gpus}",
               "-m", "megatron_gdn2.training.pretrain", *job.flags]
        where = "CPU" if self.args.cpu else f"GPU {','.join(map(str, devices))}"
        tt.log(f"[{job.name}] start: {job.gpus} rank(s) on {where}, timeout {self.args.run_timeout} s")
        with job.log.open("w") as out:
            out.write(" ".join(cmd) + "\n")
            out.flush()
            return subprocess.Popen(cmd, cwd=REPO_ROOT, env=child_env(self.args, devices), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)


def data_flags(args, workdir: Path) -> list[str]:
    if args.train_data and not args.tokenizer:
        raise ValueError("--train-data needs --tokenizer (the tokenizer the data was preprocessed with)")
    ns = argparse.Namespace(tokenizer=args.tokenizer, data_prefix=args.train_data, corpus=args.corpus,
                            corpus_docs=args.corpus_docs)
    corpus = tt.prepare_corpus(ns, workdir)
    tt.log(f"data: {corpus.description}")
    return ["--tokenizer", str(corpus.tokenizer.path), "--train-data", corpus.prefix, "--split", "100,0,0",
            "--data-cache-dir", str(workdir / "index_cache"), "--eval-iters", "0"]


def train_flags(args, data: list[str], *, model: str, seq: int, micro: int, global_batch: int,
                iters: int, warmup: int, log_interval: int = 1) -> list[str]:
    return ["--model", model, *data, "--seq-length", str(seq), "--micro-batch-size", str(micro),
            "--global-batch-size", str(global_batch), "--train-iters", str(iters), "--lr", str(args.lr),
            "--lr-warmup-tokens", str(warmup * seq * global_batch),
            "--log-interval", str(log_interval), "--eval-interval", str(iters),
            "--use-distributed-optimizer", "--precision", "fp32" if args.cpu else "bf16"]


# ---- layouts ------------------------------------------------------------------------------------
def max_difference(job: Job, reference: Job) -> tuple[float, int | None]:
    common = sorted(set(job.losses) & set(reference.losses))
    if not common:
        return math.inf, None
    it = max(common, key=lambda i: abs(job.losses[i] - reference.losses[i]))
    return round(abs(job.losses[it] - reference.losses[it]), 6), it  # the log has 4 decimals


def run_layouts(args, workdir: Path, launcher: Launcher) -> tuple[list[str], bool]:
    if args.cpu:
        seq, micro, global_batch = 64, 2, 8
    else:
        seq, micro, global_batch = args.layout_seq, args.micro_batch, args.layout_batch
    steps = 3 if args.cpu else args.steps
    warm = 1 if args.cpu else args.warm_steps
    total = warm + steps
    data = data_flags(args, workdir)
    ckpt = workdir / "checkpoint_tp1"

    def flags(layout: Layout) -> list[str]:
        return train_flags(args, data, model=args.model, seq=seq, micro=layout.micro_batch or micro,
                           global_batch=global_batch, iters=total, warmup=warm) + layout.flags()

    save = Job("save TP=1 checkpoint", 1, flags(REFERENCE) + [
        "--save", str(ckpt), "--save-interval", str(warm), "--exit-interval", str(warm)])
    launcher.run([save])
    if save.error:
        raise RunFailed(f"the TP=1 checkpoint run failed ({save.error}); log {save.log}")
    layouts = [REFERENCE] + ([] if args.cpu else [NOISE]) + [
        lay for lay in (CPU_LAYOUTS if args.cpu else LAYOUTS) if lay.gpus <= args.gpus]
    jobs = {lay.name: Job(lay.name, lay.gpus, flags(lay) + [
        "--load", str(ckpt), "--load-iteration", str(warm),
        "--save", str(workdir / f"run_{i}"), "--save-interval", str(total)]) for i, lay in enumerate(layouts)}
    launcher.run(list(jobs.values()))
    reference = jobs[REFERENCE.name]
    expected = list(range(warm + 1, total + 1))
    if reference.error or sorted(reference.losses) != expected:
        raise RunFailed(f"the TP=1 reference run failed ({reference.error or 'missing steps'}); "
                        f"log {reference.log}")
    if args.cpu:
        bound, why = CPU_BOUND, "fp32: 1e-4 (also the log's loss resolution, 4 decimals)"
    else:
        spread, _ = max_difference(jobs[NOISE.name], reference)
        floor = BF16_UNIT_ROUNDOFF * max(reference.losses.values())
        bound = max(SPREAD_FACTOR * spread, floor)
        why = (f"bf16: max({SPREAD_FACTOR:g} x {spread:.4f} (TP=1 vs TP=1 micro-batch 1), "
               f"2^-8 x max loss {floor:.4f}) = {bound:.4f}")
    lines = [f"## Parallel layouts: {args.model}, {'fp32 on CPU (gloo)' if args.cpu else 'bf16 (NCCL)'}",
             "", f"One TP=1 checkpoint at step {warm}; every layout loads it and trains steps "
             f"{warm + 1}-{total} ({global_batch} x {seq} tokens per step, micro-batch {micro}). "
             f"Bound: {why}.", "",
             "| layout | ranks | TP | PP | DP | SP | steps | loss first -> last | max abs(loss - TP=1) "
             "| at iter | bound | result |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = True
    for lay in layouts:
        job = jobs[lay.name]
        diff, at = max_difference(job, reference)
        complete = not job.error and sorted(job.losses) == expected
        passed = complete and (lay is REFERENCE or diff <= bound)
        ok &= passed or lay is NOISE and complete
        first_last = (f"{job.losses[warm + 1]:.4f} -> {job.losses[total]:.4f}" if complete else "-")
        verdict = ("reference" if lay is REFERENCE else "noise estimate" if lay is NOISE
                   else "ok" if passed else job.error or ("missing steps" if not complete else "EXCEEDED"))
        lines.append(f"| {lay.name} | {lay.gpus} | {lay.tp} | {lay.pp} | {lay.dp} | "
                     f"{'yes' if lay.sp else 'no'} | {len(job.losses)} | {first_last} | {diff:.4f} | "
                     f"{at or '-'} | {bound:.4f} | {verdict} |")
    skipped = [lay.name for lay in LAYOUTS if lay.gpus > args.gpus and not args.cpu]
    if skipped:
        lines += ["", f"Not run (need more than {args.gpus} GPUs): {', '.join(skipped)}."]
    return lines, ok


# ---- throughput runs ----------------------------------------------------------------------------
def overlap_note() -> tuple[list[str], str]:
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    flags = [f for f in OVERLAP_FLAGS if f in known]
    missing = [f for f in OVERLAP_FLAGS if f not in known]
    text = f"on ({', '.join(flags)})" if flags else "off"
    if missing:
        text += f"; gdn2-pretrain has no {', '.join(missing)} yet"
    return flags, text


def steady_rate(job: Job) -> float | None:
    # the first interval holds compilation and warm-up, the last one a profiled run's profiler
    rates = job.tokens_per_s[1:-1] if job.profiled else job.tokens_per_s[1:]
    return sum(rates) / len(rates) if rates else None


def profile_flags(args, workdir: Path, name: str) -> list[str]:
    """--profile over the run's last two steps on rank 0 (its trace lands in the work directory)."""
    last = args.throughput_steps
    return ["--profile", "--profile-step-start", str(last - 1), "--profile-step-end", str(last),
            "--profile-ranks", "0", "--profile-dir", str(workdir / re.sub(r"\W+", "_", name))]


def throughput_job(args, data: list[str], name: str, gpus: int, model: str, micro: int,
                   global_batch: int, extra: list[str]) -> Job:
    flags = train_flags(args, data, model=model, seq=args.seq, micro=micro, global_batch=global_batch,
                        iters=args.throughput_steps, warmup=args.throughput_log_interval,
                        log_interval=args.throughput_log_interval)
    return Job(name, gpus, flags + extra)


def run_scaling(args, workdir: Path, launcher: Launcher) -> tuple[list[str], bool]:
    data = data_flags(args, workdir)
    overlap, overlap_text = overlap_note()
    counts = [n for n in (1, 2, 4, 8) if n <= args.gpus]
    jobs = [throughput_job(args, data, f"scaling {n} GPU", n, args.scaling_model, args.scaling_micro,
                            args.scaling_micro * n, overlap + profile_flags(args, workdir, f"profile {n}"))
            for n in counts]
    launcher.run(jobs, exclusive=True)
    base = steady_rate(jobs[0])
    lines = [f"## Data-parallel weak scaling: {args.scaling_model}, {args.seq} x {args.scaling_micro} "
             "tokens per GPU per step, bf16, distributed optimizer", "",
             f"Gradient reduce-scatter / param all-gather overlap: {overlap_text}. Tokens/s: mean of the "
             f"log intervals after the first ({args.throughput_steps} steps, interval "
             f"{args.throughput_log_interval}), without the last, whose two last steps ran under "
             "--profile (rank 0's kernel, communication and overlapped communication time in the "
             "profile column; Chrome traces in the work directory).", "",
             "| GPUs | global batch | tokens/s | tokens/s/GPU | % of linear "
             "| peak mem GB (rank 0, alloc/reserved) | profile (rank 0) | result |",
             "|---|---|---|---|---|---|---|---|"]
    ok = True
    for n, job in zip(counts, jobs):
        rate = steady_rate(job)
        share = rate / n / base if rate and base else None
        ok &= job.error is None and rate is not None
        result = job.error or ("no steady interval" if rate is None else "baseline" if n == 1
                               else "ok" if share >= SCALING_TARGET else f"below {SCALING_TARGET:.0%}")
        per_gpu = rate / n if rate else None
        linear = tt.fmt(100 * share if share else None, ".1f")
        lines.append(f"| {n} | {args.scaling_micro * n} | {tt.fmt(rate, ',.0f')} | "
                     f"{tt.fmt(per_gpu, ',.0f')} | {linear} | {memory(job)} | {job.profile or '-'} "
                     f"| {result} |")
    return lines, ok


def memory(job: Job) -> str:
    used, reserved = job.mem_gb
    return f"{used:.1f} / {tt.fmt(reserved, '.1f')}" if job.losses else "-"


def run_memory7b(args, workdir: Path, launcher: Launcher) -> tuple[list[str], bool]:
    data = data_flags(args, workdir)
    sizes = [tp for tp in (2, 4) if tp <= args.gpus]
    jobs = [throughput_job(args, data, f"7B TP={tp}", tp, args.big_model, 1, args.big_batch,
                            ["--tensor-model-parallel-size", str(tp), "--sequence-parallel"]) for tp in sizes]
    launcher.run(jobs, exclusive=True)
    lines = [f"## {args.big_model} with tensor parallelism: {args.seq} x 1 micro-batches, global batch "
             f"{args.big_batch}, bf16, sequence parallel, DP=1", "",
             "| TP | GPUs | tokens/s | tokens/s/GPU | peak mem GB/GPU (rank 0, alloc/reserved) | result |",
             "|---|---|---|---|---|---|"]
    for tp, job in zip(sizes, jobs):
        rate = steady_rate(job)
        per_gpu = rate / tp if rate else None
        lines.append(f"| {tp} | {tp} | {tt.fmt(rate, ',.0f')} | {tt.fmt(per_gpu, ',.0f')} | {memory(job)} | "
                     f"{job.error or 'ok'} |")
    if not sizes:
        lines.append("Not run: needs 2 GPUs or more.")
    return lines, bool(sizes) and all(job.error is None for job in jobs)


SECTIONS = {"layouts": run_layouts, "scaling": run_scaling, "memory7b": run_memory7b}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=[*SECTIONS, "all"])
    p.add_argument("--cpu", action="store_true",
                   help="smoke test on a CPU: gloo, fp32, 2 ranks, 3 steps (layouts)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible; 2 with --cpu)")
    p.add_argument("--model", default="swa_gdn2_tiny", help="layouts: model")
    p.add_argument("--scaling-model", default="swa_gdn2_1.3B")
    p.add_argument("--big-model", default="swa_gdn2_7B")
    p.add_argument("--train-data", default=None, help="preprocessed dataset prefix (.bin/.idx)")
    p.add_argument("--tokenizer", default=None, help="its tokenizer (default: the shared Mistral v1 model)")
    p.add_argument("--corpus", default=None, help="jsonl(.gz) to preprocess (default: shared Wikipedia)")
    p.add_argument("--corpus-docs", type=int, default=2000)
    p.add_argument("--workdir", default=None, help="checkpoints, data and logs (default: a new temp dir)")
    p.add_argument("--steps", type=int, default=20, help="layouts: steps after loading the checkpoint")
    p.add_argument("--warm-steps", type=int, default=5, help="layouts: TP=1 steps before the checkpoint")
    p.add_argument("--layout-seq", type=int, default=1024)
    p.add_argument("--layout-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2, help="layouts: micro-batch")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seq", type=int, default=4096, help="scaling / memory7b sequence length")
    p.add_argument("--scaling-micro", type=int, default=4, help="scaling: sequences per GPU per step")
    p.add_argument("--big-batch", type=int, default=8, help="memory7b: global batch")
    p.add_argument("--throughput-steps", type=int, default=30)
    p.add_argument("--throughput-log-interval", type=int, default=5)
    p.add_argument("--run-timeout", type=int, default=300, help="seconds per gdn2-pretrain run")
    p.add_argument("--budget-s", type=int, default=3600,
                   help="seconds for everything (runs past it are killed)")
    args = p.parse_args(argv)
    if args.cpu and args.command != "layouts":
        p.error("--cpu runs only the layouts smoke test")
    if args.gpus is None:
        import torch

        args.gpus = 2 if args.cpu else torch.cuda.device_count()
    if args.gpus < 1:
        p.error("--gpus: no GPU visible (use --cpu for the CPU smoke test)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="multi_gpu_"))
    workdir.mkdir(parents=True, exist_ok=True)
    where = "CPU, 2 ranks" if args.cpu else f"{args.gpus} GPU(s)"
    tt.log(f"multi_gpu {args.command}: {where}; work dir {workdir}")
    deadline = time.monotonic() + args.budget_s
    report, ok = ["# Multi-GPU runs of gdn2-pretrain", ""], True
    for name in SECTIONS if args.command == "all" else [args.command]:
        (workdir / name).mkdir(exist_ok=True)
        try:
            lines, passed = SECTIONS[name](args, workdir / name, Launcher(args, workdir / name, deadline))
        except (RunFailed, ValueError, FileNotFoundError) as e:
            lines, passed = [f"## {name}", "", f"FAILED: {e}"], False
        report += lines + [""]
        ok &= passed
        print("\n".join(lines), flush=True)
        tt.write_output("multi_gpu.md", "\n".join(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
