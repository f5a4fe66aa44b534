"""Training throughput on one GPU: tokens/s, TFLOP/s, MFU, peak memory and time to first step.

Run (one GPU; every flag is in ``--help``)::

    python benchmarks/train_throughput.py            # the grid below; table to stdout and $OUT/throughput.md
    python benchmarks/train_throughput.py --profile  # torch.profiler on one point -> $OUT/profile.txt
    python benchmarks/train_throughput.py --quick    # tiny configs, 2 steps: a smoke test, runs on a CPU

Default grid (sequence length x micro-batch): 2K x 8, 4K x 4, 8K x 2, 16K x 1 for ``swa_gdn2_1.3B``,
``gdn2_1.3B`` and ``full_attn_1.3B``, in one process, one model after the other (everything is
freed between grid points). ``full_attn_<size>`` is the same-size full-attention baseline derived
from ``swa_gdn2_<size>``: every layer an "A" layer (causal softmax attention, RoPE, the SWA
layer's heads) with the window set to the sequence length, and the MLP width chosen so that the
block parameters match the source model's (see ``full_attention_config``). Its attention runs
through the project's SWA core attention (``megatron_gdn2.layers.swa``: Transformer Engine when
installed, else torch SDPA); the module each model used is printed under the table.

One grid point is one run of ``gdn2-pretrain``'s own pieces: ``model_setup.build_model_bundle``
(bf16 ``Float16Module`` inside Megatron's DDP with fp32 gradient buffers; fp32 on a CPU), ``optimizer``
(Megatron's distributed optimizer, AdamW, the token-based LR schedule) and steps of
``loop.Trainer.train_step`` (Megatron's forward-backward schedule, the token-summed loss, the
non-finite check, clipping, AdamW) on one micro-batch per step. Batches are synthetic (uniform
random tokens, pinned CPU tensors cycled from a pool of 4, moved to the GPU by the training
forward step as real batches are); one extra point runs on real text through
``megatron_gdn2.data`` (``gdn2-preprocess`` output, ``build_datasets``, ``build_data_loader``
with ``gdn2-pretrain``'s default of 0 workers), and the loader alone is timed as well, to show
whether it limits the step rate.

Columns:

- tokens/s: ``steps x batch x seq / wall time`` of ``--steps`` steps after ``--warmup`` steps
  (the device is synchronised before and after); step ms is the mean step time.
- TFLOP/s = tokens/s x training FLOPs per token (``megatron_gdn2/training/flops.py``):
  3 x forward FLOPs per token, forward = sum over layers + ``2 d V`` (output layer), with
  per layer ``6 d F`` (SwiGLU MLP) plus the mixer (d model width, V vocabulary, F MLP width,
  K = H d_k and V_d = H_v d_v the GDN-2 key and value widths, r_f / r_g the decay and gate ranks,
  k_c the conv length, H_q / H_kv / d_h the attention heads):
  GDN-2: ``2[d(3K + 2V_d) + r_f(d + K) + r_g(d + V_d) + V_d d] + 2 k_c(2K + V_d)
  + 2 H_v[c(3 d_k + 2 d_v) + c^2/6 + 3 d_k d_v]`` (projections, short conv, chunkwise recurrence,
  chunk c = 64); attention: ``2[d(H_q + 2 H_kv) d_h + H_q d_h d] + 4 H_q d_h L`` with L the mean
  number of keys a causal query sees in its window (about T/2 for full attention).
  Activation recomputation is not counted (model FLOPs).
- MFU = TFLOP/s / the device's dense bf16 peak (``flops.PEAK_BF16_TFLOPS``; ``--peak-tflops``).
- peak mem: the device's peak allocated / reserved GB over the whole point (model, optimizer
  state, activations); the process's resident set on a CPU.
- setup + 1st: from the start of the model build to the end of the first step (model,
  optimizer, first forward/backward with any Triton compilation and autotuning).
- Time to first step (below the table): process start to the end of the first step, for this
  process (its Triton cache state at start is printed) and for a fresh process started after
  the grid (``--ttfs-probe``, warm Triton cache; synthetic data, so no dataset build).

A grid point that runs out of memory is reported as OOM and the grid continues; any other error
is reported, its traceback printed, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import itertools
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from gdn2_kernels.gdn2.chunk import override_kernel_config
from torch.profiler import ProfilerActivity, profile, schedule

from megatron_gdn2.configs import SWA_BLOCK, count_parameters, get_model_config, layer_parameters
from megatron_gdn2.data.datasets import DataConfig, build_data_loader, build_datasets
from megatron_gdn2.data.preprocess import PreprocessConfig, preprocess
from megatron_gdn2.data.tokenizers import load_tokenizer
from megatron_gdn2.layers import wgrad_accumulation
from megatron_gdn2.models.config import transformer_engine_available
from megatron_gdn2.training.checkpointing import TrainState
from megatron_gdn2.training.config import OptimizerSettings, ParallelConfig, PretrainConfig
from megatron_gdn2.training.cpu_support import enable_megatron_on_cpu
from megatron_gdn2.training.distributed import device, init_distributed, set_seeds
from megatron_gdn2.training.flops import peak_tflops, training_flops_per_token
from megatron_gdn2.training.loop import Trainer
from megatron_gdn2.training.metrics import ProgressMeter, format_duration, memory_gb
from megatron_gdn2.training.model_setup import build_model_bundle, padded_vocab_size
from megatron_gdn2.training.optimizer import build_optimizer, build_scheduler
from megatron_gdn2.training.pretrain import configure_logging
from megatron_gdn2.training.profiling import is_gpu_kernel

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_ATTENTION_PREFIX = "full_attn_"
HYBRID_PREFIX = "swa_gdn2_"
PARAM_TOLERANCE = 0.01  # relative block-parameter mismatch accepted for the baseline's MLP width
SYNTHETIC_POOL = 4
PROBE_TAG = "TIME_TO_FIRST_STEP_S="
# Host-side waits and the device-to-host reads that cause them, counted per step by --profile.
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "aten::_local_scalar_dense")

FULL = dict(models="swa_gdn2_1.3B,gdn2_1.3B,full_attn_1.3B", grid="2Kx8,4Kx4,8Kx2,16Kx1",
            real_data="swa_gdn2_1.3B:4Kx4", warmup=5, steps=10, corpus_docs=2000,
            profile_point="swa_gdn2_1.3B:4Kx4")
QUICK = dict(models="swa_gdn2_tiny,gdn2_tiny,full_attn_tiny", grid="32x8,64x4,128x2,256x1",
             real_data="swa_gdn2_tiny:64x4", warmup=1, steps=2, corpus_docs=200,
             profile_point="swa_gdn2_tiny:64x4")
CORPUS = Path("corpora/wikipedia_vital_summaries/enwiki_vital4_summaries.jsonl.gz")
TOKENIZER = Path("tokenizers/mistral_v1/tokenizer.model")  # 32,000 tokens, as the paper's


# ---- grid and model configs -----------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    model: str
    seq: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.seq} x {self.batch}"


def parse_shape(text: str, flag: str) -> tuple[int, int]:
    """"4Kx4" or "4096x4" -> (4096, 4)."""
    m = re.fullmatch(r"\s*(\d+)([kK]?)\s*x\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(3)) < 1:
        raise ValueError(f"{flag}: cannot read {text!r} as SEQxBATCH (e.g. 4Kx4 or 4096x4)")
    return int(m.group(1)) * (1024 if m.group(2) else 1), int(m.group(3))


def parse_point(text: str, flag: str) -> Point:
    """"swa_gdn2_1.3B:4Kx4" -> Point."""
    model, sep, shape = text.rpartition(":")
    if not sep or not model:
        raise ValueError(f"{flag}: expected MODEL:SEQxBATCH, e.g. swa_gdn2_1.3B:4Kx4 (got {text!r})")
    return Point(model, *parse_shape(shape, flag))


def full_attention_config(source, name: str):
    """`source` (a hybrid ModelConfig) with every layer full causal attention, window = sequence
    length, and the MLP width that matches its block parameters: the largest of the multiples
    128, 64, ..., 8 within PARAM_TOLERANCE (else the closest multiple of 8)."""
    target = count_parameters(source).blocks
    base = dataclasses.replace(source, name=name, layer_pattern=f"{SWA_BLOCK}*{source.num_layers}",
                               swa_window=source.seq_length, published_params=None, ffn_hidden_size=1)
    without_mlp = layer_parameters(base, SWA_BLOCK) - 3 * source.hidden_size
    exact = (target / source.num_layers - without_mlp) / (3 * source.hidden_size)
    for multiple in (128, 64, 32, 16, 8):
        cfg = dataclasses.replace(base, ffn_hidden_size=max(multiple, round(exact / multiple) * multiple))
        if abs(count_parameters(cfg).blocks / target - 1) <= PARAM_TOLERANCE:
            break
    return cfg


def model_config(name: str, seq: int, vocab_size: int | None = None):
    """The ModelConfig of `name` at sequence length `seq` (registry names and full_attn_<size>)."""
    overrides = {"seq_length": seq} | ({"vocab_size": vocab_size} if vocab_size else {})
    if name.startswith(FULL_ATTENTION_PREFIX):
        source_name = HYBRID_PREFIX + name[len(FULL_ATTENTION_PREFIX):]
        try:
            source = get_model_config(source_name, **overrides)
        except ValueError as e:
            raise ValueError(f"{name}: the full-attention baseline is derived from {source_name}: {e}") from e
        return full_attention_config(source, name)
    try:
        return get_model_config(name, **overrides)
    except ValueError as e:
        raise ValueError(f"{e} (or {FULL_ATTENTION_PREFIX}<size> for the full-attention baseline of "
                         f"{HYBRID_PREFIX}<size>)") from e


# ---- data -------------------------------------------------------------------------------------
def synthetic_batches(seq: int, batch: int, vocab_size: int, seed: int):
    """Endless micro-batches shaped like GPTDataset's: int64 tokens / labels / position_ids and a
    float32 loss mask; pinned, so the copy to the GPU is the one real batches get."""
    generator = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(SYNTHETIC_POOL):
        ids = torch.randint(vocab_size, (batch, seq + 1), generator=generator)
        item = {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
                "loss_mask": torch.ones(batch, seq), "position_ids": torch.arange(seq).repeat(batch, 1)}
        pool.append({k: v.pin_memory() if torch.cuda.is_available() else v for k, v in item.items()})
    return itertools.cycle(pool)


@dataclass
class Corpus:
    prefix: str
    tokenizer: object  # megatron_gdn2.data.tokenizers.Tokenizer
    description: str


def find_shared_file(relative: Path) -> Path | None:
    """`relative` inside the shared data folder: $GDN2_SHARED_DATA (a copy carried to a GPU
    machine), else shared/data in the repository or beside it."""
    env = os.environ.get("GDN2_SHARED_DATA")
    roots = [Path(env)] if env else []
    roots += [REPO_ROOT / "shared" / "data", REPO_ROOT.parent / "shared" / "data"]
    for root in roots:
        if (root / relative).is_file():
            return root / relative
    return None


class NoCorpus(FileNotFoundError):
    """The real-data point has no corpus or tokenizer to read."""


def prepare_corpus(args, workdir: Path) -> Corpus:
    """A preprocessed corpus: --data-prefix as given, or the first --corpus-docs documents of
    --corpus tokenized into `workdir` by gdn2-preprocess's function."""
    tokenizer_path = args.tokenizer or find_shared_file(TOKENIZER)
    if tokenizer_path is None:
        raise NoCorpus(f"no tokenizer: pass --tokenizer (default: shared/data/{TOKENIZER})")
    tokenizer = load_tokenizer(str(tokenizer_path))
    if args.data_prefix:
        return Corpus(args.data_prefix, tokenizer, f"{args.data_prefix} ({tokenizer_path})")
    corpus = args.corpus or find_shared_file(CORPUS)
    if corpus is None or not Path(corpus).is_file():
        raise NoCorpus(f"no corpus: pass --corpus FILE.jsonl[.gz] or --data-prefix PREFIX "
                                f"(default: shared/data/{CORPUS}, looked for {corpus})")
    subset = workdir / "subset.jsonl"
    with (gzip.open if str(corpus).endswith(".gz") else open)(corpus, "rt", encoding="utf-8") as src, \
            subset.open("w", encoding="utf-8") as dst:
        dst.writelines(itertools.islice(src, args.corpus_docs))
    result = preprocess(PreprocessConfig(inputs=[str(subset)], output_prefix=str(workdir / "corpus"),
                                         # No fork: this process already holds CUDA and NCCL.
                                         tokenizer=str(tokenizer_path), workers=1, progress=False))
    return Corpus(result.output_prefix, tokenizer,
                  f"first {result.documents} documents of {Path(corpus).name} ({result.tokens:,} tokens, "
                  f"{Path(tokenizer_path).parent.name} tokenizer)")


def real_batches(corpus: Corpus, point: Point, samples: int, args, workdir: Path):
    """gdn2-pretrain's loader over `corpus`: (loader, a second loader for timing it alone)."""
    data_cfg = DataConfig(tokenizer=corpus.tokenizer, data_path=[corpus.prefix], split="100,0,0",
                          seq_length=point.seq, seed=args.seed, cache_dir=str(workdir / "index_cache"))
    train, _, _ = build_datasets(data_cfg, [samples, 0, 0])
    return [build_data_loader(train, consumed_samples=0, micro_batch_size=point.batch, data_parallel_rank=0,
                              data_parallel_size=1, num_workers=args.num_workers) for _ in range(2)]


def loader_tokens_per_s(loader, point: Point, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * point.batch * point.seq / (time.perf_counter() - start)


# ---- one grid point ---------------------------------------------------------------------------
@dataclass
class Result:
    point: Point
    data: str
    params_total: int = 0
    params_blocks: int = 0
    flops_per_token: float = 0.0
    status: str = "ok"  # "ok", "OOM", "skipped: ...", "error: ..."
    tokens_per_s: float = math.nan
    step_ms: float = math.nan
    tflops: float = math.nan
    mfu: float | None = None
    mem_gb: tuple[float, float | None] = (math.nan, None)
    setup_first_step_s: float = math.nan
    loss: float = math.nan
    skipped_steps: int = 0  # steps whose gradients were not finite (the optimizer skipped them)
    loader_tokens_per_s: float | None = None
    attention: str = ""


def use_bf16() -> bool:
    """gdn2-pretrain's --precision auto: bf16 on a GPU, fp32 on a CPU."""
    return torch.cuda.is_available()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_trainer(model_cfg, point: Point, batches, args):
    """gdn2-pretrain's model, optimizer, schedule and step for one micro-batch of `point` per step."""
    steps = args.warmup + args.steps
    cfg = PretrainConfig(model=model_cfg.name, seq_length=point.seq, micro_batch_size=point.batch,
                         global_batch_size=point.batch, train_iters=steps, seed=args.seed,
                         kernel_backend=args.kernel_backend, swa_attention_impl=args.swa_attention_impl,
                         gradient_accumulation_fusion=args.gradient_accumulation_fusion,
                         parallel=ParallelConfig(use_distributed_optimizer=True),
                         # Peak learning rate after the first step: the updates are of a realistic size.
                         optim=OptimizerSettings(warmup_tokens=point.seq * point.batch))
    set_seeds(args.seed)
    bf16 = use_bf16()
    bundle = build_model_bundle(cfg, model_cfg, bf16=bf16)
    optimizer = build_optimizer(cfg, [bundle.model], bf16=bf16)
    scheduler = build_scheduler(cfg, optimizer)
    # The meter and wandb serve Trainer.run's log lines only; this script times the steps itself.
    meter = ProgressMeter(total_iters=steps, tokens_per_step=cfg.tokens_per_step, flops_per_token=0.0,
                          world_size=1, peak_tflops=None)
    return Trainer(cfg=cfg, bundle=bundle, model_config=dataclasses.asdict(model_cfg), optimizer=optimizer,
                   scheduler=scheduler, train_loader=batches, valid_dataset=None, state=TrainState(),
                   meter=meter, wandb=None, device=device(), num_microbatches=1)


def train_step(trainer, result: Result | None = None) -> float:
    """One step as Trainer.run takes it (the schedule advances by the step's tokens); the loss.
    A step with non-finite gradients is counted in `result`."""
    loss, _, ok = trainer.train_step()
    if ok:
        trainer.scheduler.step(increment=trainer.cfg.tokens_per_step)
    elif result is not None:
        result.skipped_steps += 1
    return loss


def attention_cores(module) -> str:
    names = {type(m.core_attention).__name__ for m in module.modules() if hasattr(m, "core_attention")}
    return ", ".join(sorted(names)) or "-"


def run_point(result: Result, model_cfg, batches, args, peak: float | None, clock: dict) -> None:
    """Fills `result`; exceptions propagate (the caller records them)."""
    point = result.point
    memory_gb()  # resets the peak counters
    start = time.perf_counter()
    trainer = build_trainer(model_cfg, point, batches, args)
    result.attention = attention_cores(trainer.bundle.module)
    result.loss = train_step(trainer, result)
    result.setup_first_step_s = time.perf_counter() - start
    if "first_step" not in clock:
        clock["first_step"] = time.time() - clock["process_start"]
    log(f"    first step after {result.setup_first_step_s:.1f} s (loss {result.loss:.3f})")
    for _ in range(args.warmup - 1):
        train_step(trainer, result)
    synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        result.loss = train_step(trainer, result)
    synchronize()
    elapsed = time.perf_counter() - start
    result.tokens_per_s = args.steps * point.batch * point.seq / elapsed
    result.step_ms = 1e3 * elapsed / args.steps
    result.tflops = result.tokens_per_s * result.flops_per_token / 1e12
    result.mfu = result.tflops / peak if peak else None
    result.mem_gb = memory_gb()
    if result.skipped_steps:
        # a skipped step runs no optimizer: its time is not a training step's
        raise FloatingPointError(f"{result.skipped_steps} of {args.warmup + args.steps} steps had non-finite "
                                 f"gradients (last loss {result.loss}); their timings are not valid")


def free_memory() -> str:
    """Collects the last point's objects (they form reference cycles); what is still in use."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return f"{torch.cuda.memory_allocated() / 1e9:.2f} GB still allocated"
    return f"{psutil.Process().memory_info().rss / 1e9:.2f} GB resident"


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ---- output -----------------------------------------------------------------------------------
def log(message: str) -> None:
    print(message, flush=True)


def triton_cache_state() -> str:
    """Compiled kernels in the Triton cache (entries holding only autotune results, as carried for
    fla by gpu_session.sh, do not make it warm)."""
    cache = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    def compiled(entry: Path) -> bool:
        return entry.is_dir() and any(not f.name.endswith(".autotune.json") for f in entry.iterdir())

    entries = sum(map(compiled, cache.iterdir())) if cache.is_dir() else 0
    return f"{'warm' if entries else 'cold'} ({entries} compiled entries in {cache} at start)"


NVIDIA_SMI_FIELDS = {"power.limit": "power limit {} W", "clocks.max.sm": "max SM clock {} MHz",
                     "clocks.sm": "SM clock {} MHz", "temperature.gpu": "{} C"}


def gpu_power_and_clocks(props) -> str:
    """nvidia-smi's power limit and clocks of this process's GPU: lent H200s of one name have moved
    the same grid by up to 3% (RESULTS.md), and the power limit is one difference they can have."""
    uuid = getattr(props, "uuid", None)
    if uuid is None:
        return "unknown (no device UUID from torch)"
    try:
        proc = subprocess.run(["nvidia-smi", f"--id=GPU-{uuid}", "--format=csv,noheader,nounits",
                               f"--query-gpu={','.join(NVIDIA_SMI_FIELDS)}"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    values = [v.strip() for v in proc.stdout.strip().split(",")]
    if proc.returncode or len(values) != len(NVIDIA_SMI_FIELDS):
        return f"unknown (nvidia-smi: {(proc.stderr or proc.stdout).strip()[:200]})"
    return ", ".join(fmt.format(v) for fmt, v in zip(NVIDIA_SMI_FIELDS.values(), values))


def environment(args, peak: float | None) -> dict[str, str]:
    import megatron.core
    import triton

    env = {"python": platform.python_version(),
           "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
           "triton": triton.__version__, "megatron-core": megatron.core.__version__,
           "transformer engine": "yes" if transformer_engine_available() else "no (local linears, SDPA)"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        env["power limit and clocks at start"] = gpu_power_and_clocks(props)
        env["SDPA backends"] = ", ".join(
            name for name, on in (("flash", torch.backends.cuda.flash_sdp_enabled()),
                                  ("mem-efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                                  ("math", torch.backends.cuda.math_sdp_enabled())) if on)
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores)"
    env["precision"] = "bf16 params, fp32 main weights and grads" if use_bf16() else "fp32"
    env["optimizer"] = "Megatron distributed optimizer (AdamW), DDP with fp32 grad buffers"
    env["peak bf16 TFLOP/s"] = f"{peak:g}" if peak else "unknown (no MFU)"
    env["GDN-2 kernel backend"] = args.kernel_backend or "default (triton on a GPU, torch on a CPU)"
    if args.kernel_config:
        env["GDN-2 kernel config overrides"] = args.kernel_config
    fused = args.gradient_accumulation_fusion and wgrad_accumulation.install()
    env["weight-gradient accumulation"] = ("in the wgrad GEMM (gradient_accumulation_fusion)" if fused
                                           else "separate add into main_grad")
    env["Triton cache"] = triton_cache_state()
    return env


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def fmt_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def results_table(results: list[Result]) -> str:
    head = ("| model | params (blocks / total) | seq x batch | data | tokens/s | step ms | TFLOP/s | MFU "
            "| GFLOP/token | peak mem GB (alloc / reserved) | setup + 1st step s | loss |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        params = f"{fmt_count(r.params_blocks)} / {fmt_count(r.params_total)}"
        used, reserved = r.mem_gb
        mem = f"{used:.1f} / {reserved:.1f}" if reserved is not None else f"{fmt(used, '.2f')} (RSS)"
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "-"
        tokens = f"{r.tokens_per_s:,.0f}" if r.status == "ok" else r.status.split(":")[0]
        rows.append(f"| {r.point.model} | {params} | {r.point.label} | {r.data} | {tokens} "
                    f"| {fmt(r.step_ms, '.1f')} | {fmt(r.tflops, '.4g')} | {mfu} "
                    f"| {r.flops_per_token / 1e9:.4g} | {mem if r.status == 'ok' else '-'} "
                    f"| {fmt(r.setup_first_step_s, '.3g')} | {fmt(r.loss, '.3f')} |")
    return "\n".join(rows)


def comparisons(results: list[Result]) -> list[str]:
    """Per model: throughput change from the first to the last grid point; the GDN-2 models'
    speed relative to the full-attention baseline at each sequence length."""
    ok = [r for r in results if r.status == "ok" and r.data == "synthetic"]
    by_model: dict[str, list[Result]] = {}
    for r in ok:
        by_model.setdefault(r.point.model, []).append(r)
    lines = []
    for model, rows in by_model.items():
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            change = 100 * (last.tokens_per_s / first.tokens_per_s - 1)
            lines.append(f"- {model}: {first.point.label} -> {last.point.label}: {change:+.1f}% tokens/s")
    baselines = {r.point.seq: r for r in ok if r.point.model.startswith(FULL_ATTENTION_PREFIX)}
    for r in ok:
        base = baselines.get(r.point.seq)
        if base is not None and r is not base:
            lines.append(f"- {r.point.model} / {base.point.model} at {r.point.label}: "
                         f"{r.tokens_per_s / base.tokens_per_s:.2f}x tokens/s")
    return lines


def report(results: list[Result], env: dict, clock: dict, sections: dict[str, list[str]],
           command: str) -> str:
    lines = [f"# Training throughput, one {env['device']}", "", f"Command: `{command}`", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()] + ["", results_table(results), ""]
    cache = env["Triton cache"].split()[0]
    lines += ["Time to first step (process start to the end of the first step):",
              f"- this process, first grid point: {fmt(clock.get('first_step'), '.1f')} s "
              f"(Triton cache {cache} at start)",
              f"- a fresh process after the grid (warm Triton cache): {clock.get('probe', 'not run')}"]
    for title, notes in sections.items():
        if notes:
            lines += ["", f"{title}:", *notes]
    comparison = comparisons(results)
    if comparison:
        lines += ["", "Comparisons:"] + comparison
    cores: dict[str, str] = {}
    for r in results:
        if r.attention and r.attention != "-":
            cores.setdefault(r.point.model, r.attention)
    if cores:
        lines += ["", "Core attention modules: " + "; ".join(f"{m}: {c}" for m, c in cores.items())]
    lines += ["", "TFLOP/s = tokens/s x training FLOPs per token (3 x forward, "
              "megatron_gdn2/training/flops.py: projections, MLP, output layer, GDN-2 chunkwise recurrence "
              "and windowed/causal attention; recomputation not counted); MFU = TFLOP/s / peak bf16 "
              "TFLOP/s.", "", "Errors:"]
    lines += [f"- {r.point.model} {r.point.label} ({r.data}): {r.status}" for r in results
              if r.status != "ok"] or ["- none"]
    return "\n".join(lines) + "\n"


def write_output(name: str, text: str) -> None:
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(text)
        log(f"wrote {Path(out) / name}")


# ---- modes ------------------------------------------------------------------------------------
def setup_process() -> None:
    """gdn2-pretrain's process setup for one rank (CPU patches, process group, parallel state)."""
    configure_logging()
    if not torch.cuda.is_available():
        enable_megatron_on_cpu()
    init_distributed(ParallelConfig())


def describe(result: Result, model_cfg) -> Result:
    count = count_parameters(model_cfg)
    result.params_total, result.params_blocks = count.total, count.blocks
    result.flops_per_token = training_flops_per_token(model_cfg)
    return result


def describe_baselines(configs: dict) -> list[str]:
    """The derived full-attention configs next to the models they are sized after."""
    lines = {}
    for point, cfg in configs.items():
        if point.model.startswith(FULL_ATTENTION_PREFIX) and point.model not in lines:
            source = model_config(HYBRID_PREFIX + point.model[len(FULL_ATTENTION_PREFIX):], point.seq)
            mine, theirs = count_parameters(cfg).blocks, count_parameters(source).blocks
            lines[point.model] = (
                f"- {point.model}: layer pattern {cfg.layer_pattern}, {cfg.swa_num_heads} query / "
                f"{cfg.swa_num_kv_groups} key-value heads of {cfg.swa_head_dim}, window = sequence length, "
                f"ffn_hidden_size {cfg.ffn_hidden_size}: {mine:,} block parameters vs {theirs:,} in "
                f"{source.name} ({100 * (mine / theirs - 1):+.2f}%)")
    return list(lines.values())


def real_data_setup(result: Result, args, workdir: Path, notes: list[str]):
    """Corpus, model config (the tokenizer's vocabulary) and loader of the real-data point;
    a second loader over the same dataset is timed alone first. Returns (loader, model config)."""
    point = result.point
    corpus = prepare_corpus(args, workdir)
    model_cfg = model_config(point.model, point.seq, padded_vocab_size(corpus.tokenizer.vocab_size, 1))
    describe(result, model_cfg)
    start = time.perf_counter()
    samples = (args.warmup + args.steps) * point.batch
    loader, timing_loader = real_batches(corpus, point, samples, args, workdir)
    build_s = time.perf_counter() - start
    result.loader_tokens_per_s = loader_tokens_per_s(timing_loader, point, args.steps)
    notes += [f"- corpus: {corpus.description}; vocabulary {model_cfg.vocab_size}; loader with "
              f"{args.num_workers} workers (gdn2-pretrain's --num-workers)",
              f"- dataset build {build_s:.2f} s; the loader alone delivers "
              f"{result.loader_tokens_per_s:,.0f} tokens/s ({point.model} {point.label}: "
              f"{args.steps} batches)"]
    return loader, model_cfg


def run_jobs(jobs: list, configs: dict, args, peak: float | None, clock: dict, workdir: Path):
    """Every (point, data) job in turn, each failure recorded; (results, real-data notes, failed)."""
    results, notes, failed, grid_start = [], [], False, time.perf_counter()
    for index, (point, data) in enumerate(jobs):
        elapsed = time.perf_counter() - grid_start
        eta = f" | ETA {format_duration(elapsed / index * (len(jobs) - index))}" if index else ""
        log(f"[{index + 1}/{len(jobs)}] {point.model} {point.label} {data} | "
            f"elapsed {format_duration(elapsed)}{eta}")
        model_cfg = configs.get(point) or model_config(point.model, point.seq)
        result = describe(Result(point=point, data=data), model_cfg)
        results.append(result)
        batches = None
        try:
            if data == "real":
                batches, model_cfg = real_data_setup(result, args, workdir, notes)
            else:
                batches = synthetic_batches(point.seq, point.batch, model_cfg.vocab_size, args.seed)
            run_point(result, model_cfg, batches, args, peak, clock)
            mfu = f"{100 * result.mfu:.1f}%" if result.mfu is not None else "-"
            log(f"    {result.tokens_per_s:,.0f} tokens/s | {result.step_ms:.1f} ms/step | "
                f"{result.tflops:.4g} TFLOP/s | MFU {mfu} | peak {result.mem_gb[0]:.2f} GB | "
                f"loss {result.loss:.3f}")
        except NoCorpus as e:
            result.status = "skipped: no corpus"
            notes.append(f"- skipped: {e}")
            log(f"    skipped: {e}")
        except Exception as e:  # one failing point must not cost the rest of the grid
            if is_oom(e):
                result.status = "OOM"
                log("    OOM")
            else:
                failed = True
                first_line = str(e).splitlines()[0][:200] if str(e) else ""
                result.status = f"error: {type(e).__name__}: {first_line}"
                log(f"    FAILED:\n{traceback.format_exc()}")
        del batches
        log(f"    {free_memory()} after freeing")
    return results, notes, failed


def run_grid(args, clock: dict) -> int:
    points = [Point(m.strip(), *shape) for m in args.models.split(",")
              for shape in (parse_shape(s, "--grid") for s in args.grid.split(","))]
    configs = {p: model_config(p.model, p.seq) for p in points}  # bad names and shapes fail here
    jobs = [(p, "synthetic") for p in points]
    if args.real_data:
        real_point = parse_point(args.real_data, "--real-data")
        model_config(real_point.model, real_point.seq)
        after = [i + 1 for i, (p, _) in enumerate(jobs) if p == real_point]
        jobs.insert(after[0] if after else len(jobs), (real_point, "real"))
    baselines = describe_baselines(configs)
    for line in baselines:
        log(line)
    peak = peak_tflops(args.peak_tflops)
    env = environment(args, peak)
    for key, value in env.items():
        log(f"{key}: {value}")
    setup_process()

    with tempfile.TemporaryDirectory(prefix="gdn2_throughput_") as workdir:
        results, notes, failed = run_jobs(jobs, configs, args, peak, clock, Path(workdir))

    if not args.no_ttfs_probe and jobs:
        clock["probe"] = probe_time_to_first_step(args, jobs[0][0])
    command = " ".join(["python benchmarks/train_throughput.py", *args.argv])
    sections = {"Real data": notes, "Full-attention baseline": baselines}
    text = report(results, env, clock, sections, command)
    log("\n" + text)
    write_output("throughput.md", text)
    return 1 if failed else 0


def probe_time_to_first_step(args, point: Point) -> str:
    """Starts this script in a new process that builds `point` and takes one step; its process
    start to first-step end, or why there is none."""
    command = [sys.executable, str(Path(__file__).resolve()), "--ttfs-probe",
               f"{point.model}:{point.seq}x{point.batch}", "--seed", str(args.seed)]
    if args.kernel_backend:
        command += ["--kernel-backend", args.kernel_backend]
    if args.swa_attention_impl:
        command += ["--swa-attention-impl", args.swa_attention_impl]
    if not args.gradient_accumulation_fusion:
        command.append("--no-gradient-accumulation-fusion")
    if args.kernel_config:
        command += ["--kernel-config", args.kernel_config]
    log(f"time-to-first-step probe: {' '.join(command[1:])}")
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.probe_timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {args.probe_timeout} s"
    found = [line for line in proc.stdout.splitlines() if line.startswith(PROBE_TAG)]
    if proc.returncode or not found:
        log(f"probe failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return f"probe failed (exit {proc.returncode})"
    return f"{float(found[-1][len(PROBE_TAG):]):.1f} s ({point.model} {point.label})"


def synthetic_trainer(text: str, flag: str, args):
    """(point, trainer on synthetic batches) for a MODEL:SEQxBATCH flag value, in a new process."""
    point = parse_point(text, flag)
    model_cfg = model_config(point.model, point.seq)
    setup_process()
    batches = synthetic_batches(point.seq, point.batch, model_cfg.vocab_size, args.seed)
    return point, build_trainer(model_cfg, point, batches, args)


def run_probe(args, clock: dict) -> int:
    _, trainer = synthetic_trainer(args.ttfs_probe, "--ttfs-probe", args)
    train_step(trainer)
    log(f"{PROBE_TAG}{time.time() - clock['process_start']:.3f}")
    return 0


# Module types whose forward passes --profile times as ranges (the output layer by its name).
PROFILED_MODULES = ("GatedDeltaNet2", "SelfAttention", "RotaryInCoreSelfAttention", "MLP", "RMSNorm",
                    "LanguageModelEmbedding")
RANGE_PREFIX = "forward: "


def time_module_forwards(model) -> None:
    """Wraps the forward of every module of a PROFILED_MODULES type (and the output layer) in a
    record_function range named after its type, for the rest of the process."""
    for name, module in model.named_modules():
        kind = "output layer" if name.endswith("output_layer") else type(module).__name__
        if kind not in PROFILED_MODULES and kind != "output layer":
            continue

        def enter(mod, inputs, kind=kind):
            mod._profile_range = torch.profiler.record_function(RANGE_PREFIX + kind)
            mod._profile_range.__enter__()

        def leave(mod, inputs, output):
            mod._profile_range.__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def module_table(events, steps: int, cuda: bool) -> list[str]:
    """Time inside each module type's forward ranges per step (device time on a GPU: the span of
    the range's kernels; CPU time otherwise). Recomputed forwards count again."""
    rows = {}
    for e in events:
        if e.key.startswith(RANGE_PREFIX):
            us = e.device_time_total if cuda else e.cpu_time_total
            # on a GPU a range is listed twice, as its host-side event and as its device-side
            # annotation: keep the larger of the two
            calls, total = rows.get(e.key, (0, 0.0))
            rows[e.key] = (max(calls, e.count), max(total, us))
    lines = [f"Forward time by module type ({'device' if cuda else 'CPU'} time; the backward is not split):",
             "", "| module | calls/step | ms/step |", "|---|---|---|"]
    for key, (calls, us) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {key[len(RANGE_PREFIX):]} | {calls / steps:g} | {us / 1e3 / steps:.2f} |")
    return lines


def idle_table(events, steps: int, rows: int = 20) -> list[str]:
    """Where the GPU waits: the gaps between one kernel's end (the latest end so far) and the next
    kernel's start over the profiled steps, summed per (kernel before, kernel after) pair. With
    CPU activity recorded the profiler's own host work widens every gap (``--profile-gpu-only``)."""
    kernels = sorted((e for e in events if is_gpu_kernel(e) and e.time_range.elapsed_us() > 0),
                     key=lambda e: e.time_range.start)
    if not kernels:
        return []
    pairs: dict[tuple[str, str], list[float]] = {}
    last_end, last_name, idle = kernels[0].time_range.end, kernels[0].name, 0.0
    for e in kernels[1:]:
        gap = e.time_range.start - last_end
        if gap > 0:
            idle += gap
            entry = pairs.setdefault((last_name[:60], e.name[:60]), [0, 0.0])
            entry[0] += 1
            entry[1] += gap
        if e.time_range.end >= last_end:
            last_end, last_name = e.time_range.end, e.name
    span = last_end - kernels[0].time_range.start
    lines = [f"GPU idle between the first and last kernel: {idle / 1e3 / steps:.2f} ms/step of "
             f"{span / 1e3 / steps:.1f}", "", f"Largest idle gaps by kernel pair (top {rows}):", "",
             "| idle ms/step | gaps/step | kernel before | kernel after |", "|---|---|---|---|"]
    for (before, after), (count, us) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:rows]:
        lines.append(f"| {us / 1e3 / steps:.3f} | {count / steps:g} | `{before}` | `{after}` |")
    return lines


def run_profile(args, clock: dict) -> int:
    env = environment(args, None)
    for key, value in env.items():
        log(f"{key}: {value}")
    point, trainer = synthetic_trainer(args.profile_point, "--profile-point", args)
    for _ in range(args.warmup):
        train_step(trainer)
    cuda = torch.cuda.is_available()
    gpu_only = cuda and args.profile_gpu_only
    if not gpu_only:
        time_module_forwards(trainer.bundle.module)
    activities = ([] if gpu_only else [ProfilerActivity.CPU]) + ([ProfilerActivity.CUDA] if cuda else [])
    steps = args.profile_steps
    log(f"profiling {steps} steps of {point.model} {point.label}")
    with profile(activities=activities, record_shapes=not gpu_only,
                 schedule=schedule(wait=0, warmup=1, active=steps, repeat=1)) as prof:
        train_step(trainer)
        prof.step()
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(trainer)
            prof.step()
        synchronize()
        wall_ms = 1e3 * (time.perf_counter() - start) / steps
    events = prof.key_averages()
    lines = [f"# Profile: {point.model} {point.label}, {steps} steps, {env['device']}"
             + (", GPU activity only" if gpu_only else ""), "",
             f"wall time per step (profiler on): {wall_ms:.1f} ms"]
    if cuda:
        kernels = sorted((e for e in events if is_gpu_kernel(e)),
                         key=lambda e: e.self_device_time_total, reverse=True)
        total_us = sum(e.self_device_time_total for e in kernels)
        lines.append(f"kernel time per step: {total_us / 1e3 / steps:.1f} ms "
                     f"({100 * total_us / 1e3 / steps / wall_ms:.0f}% of the wall time)")
        if not gpu_only:  # the syncs are host-side events
            syncs = {e.key: e.count for e in events if e.key in SYNC_EVENTS}
            lines.append("host-device syncs per step: " + (", ".join(
                f"{k} {v / steps:g}" for k, v in sorted(syncs.items())) or "none recorded"))
        lines += ["", f"Top 40 CUDA kernels by self time ({steps} steps):", "",
                  "| # | self ms/step | % of kernel time | calls/step | kernel |", "|---|---|---|---|---|"]
        lines += [f"| {i + 1} | {e.self_device_time_total / 1e3 / steps:.2f} | "
                  f"{100 * e.self_device_time_total / max(total_us, 1):.1f} | {e.count / steps:g} | "
                  f"`{e.key[:120]}` |" for i, e in enumerate(kernels[:40])]
        lines += ["", *idle_table(prof.events(), steps)]
    if not gpu_only:  # the module ranges and operators are host-side events
        sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
        lines += ["", *module_table(events, steps, cuda),
                  "", f"key_averages() sorted by {sort_by}:", "",
                  events.table(sort_by=sort_by, row_limit=20, max_name_column_width=90),
                  "", "By operator and input shapes (to attribute elementwise work):", "",
                  prof.key_averages(group_by_input_shape=True).table(
                      sort_by=sort_by, row_limit=40, max_name_column_width=40, max_shapes_column_width=110)]
    text = "\n".join(lines) + "\n"
    log(text)
    write_output("profile.txt", text)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny configs, 2 steps (a CPU smoke test)")
    p.add_argument("--models", help=f"comma-separated names (default {FULL['models']})")
    p.add_argument("--grid", help=f"comma-separated SEQxBATCH (default {FULL['grid']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps per point, >= 1 (default {FULL['warmup']})")
    p.add_argument("--steps", type=int, help=f"timed steps per point (default {FULL['steps']})")
    p.add_argument("--real-data", help="MODEL:SEQxBATCH to run once on real text "
                                       f"(default {FULL['real_data']})")
    p.add_argument("--no-real-data", action="store_true", help="skip the real-data point")
    p.add_argument("--corpus", help="JSON-lines text (.jsonl[.gz], field 'text') for the real-data point "
                                    f"(default shared/data/{CORPUS}, in the repository or beside it)")
    p.add_argument("--corpus-docs", type=int, help="documents of --corpus to tokenize "
                                                   f"(default {FULL['corpus_docs']})")
    p.add_argument("--data-prefix", help="a preprocessed corpus (PREFIX.bin/.idx) instead of --corpus")
    p.add_argument("--tokenizer", help=f"tokenizer of the real-data corpus (default shared/data/{TOKENIZER})")
    p.add_argument("--num-workers", type=int, default=0, help="loader workers (gdn2-pretrain's default: 0)")
    p.add_argument("--kernel-backend", help="gdn2_kernels backend (default: triton on a GPU, torch on a CPU)")
    p.add_argument("--kernel-config", help="Triton kernels' launch config overrides on this GPU, "
                   "FIELD=VALUE,... (gdn2_kernels.gdn2.chunk.KernelConfig)")
    p.add_argument("--swa-attention-impl",
                   help="SWA core attention (default: the model's; on a GPU cudnn with the cuDNN "
                        "frontend installed, else flex)")
    p.add_argument("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion",
                   action="store_false",
                   help="weight gradients added to main_grad in a separate pass (as gdn2-pretrain's flag)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s of the device for MFU")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-ttfs-probe", action="store_true", help="skip the fresh-process first-step timing")
    p.add_argument("--probe-timeout", type=int, default=600)
    p.add_argument("--profile", action="store_true", help="profile one point instead of the grid")
    p.add_argument("--profile-point", help=f"MODEL:SEQxBATCH (default {FULL['profile_point']})")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-gpu-only", action="store_true",
                   help="record GPU kernels only: the idle gaps without the profiler's host overhead")
    p.add_argument("--ttfs-probe", metavar="MODEL:SEQxBATCH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.no_real_data:
        args.real_data = None
    for flag in ("warmup", "steps", "corpus_docs", "profile_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    clock = {"process_start": psutil.Process().create_time()}
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        if args.kernel_config:
            if not torch.cuda.is_available():
                raise ValueError("--kernel-config: the Triton kernels' launch config needs a GPU")
            override_kernel_config(torch.device("cuda"), args.kernel_config)
        if args.ttfs_probe:
            return run_probe(args, clock)
        if args.profile:
            return run_profile(args, clock)
        return run_grid(args, clock)
    except ValueError as e:  # bad input found before any training
        print(f"train_throughput: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
