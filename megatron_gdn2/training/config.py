"""Configuration of a pretraining run: plain dataclasses, grouped by concern.

Everything a run needs is in :class:`PretrainConfig`; the command line (``arguments.py``) only
fills it in. ``PretrainConfig.validate(world_size)`` runs before any process group, model or
dataset exists, so bad input fails in seconds with a message that names the flag or file.
Token counts are plain integers (``parse_count("20B") == 20_000_000_000``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from megatron_gdn2.data.datasets import parse_blend

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataSettings",
    "LoggingConfig",
    "OptimizerSettings",
    "ParallelConfig",
    "PretrainConfig",
    "parse_count",
]


class ConfigError(ValueError):
    """Bad user input: a flag value, a missing file, a layout that does not divide."""


_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_count(text: str | int, what: str = "value") -> int:
    """``"1B" -> 10**9``, ``"500M" -> 5 * 10**8``, ``"2.5K" -> 2500``, ``"4096" -> 4096``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([KkMmBbGgTt]?)\s*", str(text))
    if not m:
        raise ConfigError(f"{what}: cannot read {text!r} as a count (examples: 4096, 500M, 1B)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if value != int(value):
        raise ConfigError(f"{what}: {text!r} is not a whole number")
    return int(value)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # Start each gradient bucket's data-parallel reduction during the backward pass.
    overlap_grad_reduce: bool = False
    # Gather each parameter bucket of the distributed optimizer's update during the next forward
    # pass (forward pre-hooks) instead of right after the optimizer step.
    overlap_param_gather: bool = False
    # None, "selective" (attention core only) or "full" (whole layers, uniform chunks of 1)
    recompute: str | None = None

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)


@dataclass
class DataSettings:
    # Megatron blend syntax: ["prefixA", "prefixB"] or ["0.7", "prefixA", "0.3", "prefixB"];
    # prefixes name preprocessed .bin/.idx pairs (without the extension).
    train_data: list[str] = field(default_factory=list)
    # Validation data; when empty, validation comes from `split` of train_data.
    valid_data: list[str] = field(default_factory=list)
    split: str = "98,2,0"
    tokenizer: str | None = None
    num_workers: int = 0
    cache_dir: str | None = None
    # "torch" (a plain loader) or "dali" (the same samples through an NVIDIA DALI pipeline).
    backend: str = "torch"


@dataclass
class OptimizerSettings:
    lr: float = 4e-4
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak
    warmup_tokens: int = 1_000_000_000
    decay_tokens: int | None = None  # default: all training tokens
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class CheckpointConfig:
    save: str | None = None  # directory of iter_XXXXXXX checkpoints; resumed from when it has one
    load: str | None = None  # another directory to start from (default: `save`)
    save_interval: int = 1000
    keep_last: int = 3  # 0 keeps every checkpoint
    load_iteration: int | None = None  # a specific iteration instead of `latest`
    no_load_optim: bool = False
    no_load_rng: bool = False
    exit_interval: int | None = None  # save and stop when iteration % exit_interval == 0
    exit_duration_mins: float | None = None  # save and stop after this much wall time
    signal_exit_code: int = 0
    # DistributedOptimizer state format: "fully_reshardable" (any layout) or "dp_reshardable"
    optim_format: str = "fully_reshardable"


@dataclass
class LoggingConfig:
    log_interval: int = 10
    eval_interval: int = 1000
    eval_iters: int = 15
    wandb_project: str | None = None
    wandb_name: str | None = None
    wandb_group: str | None = None
    wandb_dir: str | None = None
    wandb_mode: str | None = None  # online / offline / disabled (default: wandb's own)
    peak_tflops: float | None = None  # per device; default: looked up from the GPU name
    # torch.profiler over iterations [profile_step_start, profile_step_end] on profile_ranks
    profile: bool = False
    profile_step_start: int = 5
    profile_step_end: int = 7
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    profile_dir: str | None = None  # default: <save>/profile, else ./profile


@dataclass
class PretrainConfig:
    model: str = "swa_gdn2_tiny"
    model_overrides: list[str] = field(default_factory=list)  # ModelConfig FIELD=VALUE
    seq_length: int = 4096
    micro_batch_size: int = 1
    global_batch_size: int = 128
    train_tokens: int | None = None
    train_iters: int | None = None
    seed: int = 1234
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    kernel_backend: str | None = None
    swa_attention_impl: str | None = None  # SWA core attention; None: the model's default (layers/swa.py)
    # weight gradients added to the fp32 main_grad by their GEMM on a GPU (layers/wgrad_accumulation.py)
    gradient_accumulation_fusion: bool = True
    max_nonfinite_steps: int = 5  # K non-finite losses in a row stop the run
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimizerSettings = field(default_factory=OptimizerSettings)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def total_iters(self) -> int:
        if self.train_iters is not None:
            return self.train_iters
        return math.ceil(self.train_tokens / self.tokens_per_step)

    @property
    def total_tokens(self) -> int:
        return self.total_iters * self.tokens_per_step

    @property
    def lr_decay_tokens(self) -> int:
        return self.optim.decay_tokens if self.optim.decay_tokens is not None else self.total_tokens

    def num_microbatches(self, world_size: int) -> int:
        dp = self.parallel.data_parallel_size(world_size)
        return self.global_batch_size // (self.micro_batch_size * dp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainConfig:
        """Inverse of to_dict (e.g. the configuration stored in a checkpoint)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: _NESTED[k](**v) if k in _NESTED else v for k, v in d.items() if k in names})

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, world_size: int) -> None:
        """Cheap checks of everything that can be checked before starting distributed work."""
        p = self.parallel
        _positive("--micro-batch-size", self.micro_batch_size)
        _positive("--global-batch-size", self.global_batch_size)
        _positive("--seq-length", self.seq_length)
        _positive("--tensor-model-parallel-size", p.tensor_model_parallel_size)
        _positive("--pipeline-model-parallel-size", p.pipeline_model_parallel_size)
        model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size "
                f"{p.tensor_model_parallel_size} x --pipeline-model-parallel-size "
                f"{p.pipeline_model_parallel_size} = {model_parallel}")
        dp = p.data_parallel_size(world_size)
        if self.global_batch_size % (self.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {self.global_batch_size} is not divisible by "
                f"--micro-batch-size {self.micro_batch_size} x data-parallel size {dp} "
                f"(world size {world_size} / (TP {p.tensor_model_parallel_size} x PP "
                f"{p.pipeline_model_parallel_size}))")
        if p.sequence_parallel and p.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if p.overlap_param_gather and not p.use_distributed_optimizer:
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (it overlaps that "
                              "optimizer's parameter all-gather)")
        if p.recompute not in (None, "selective", "full"):
            raise ConfigError(f"--recompute must be one of none, selective, full (got {p.recompute!r})")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision must be auto, bf16 or fp32 (got {self.precision!r})")
        if (self.train_tokens is None) == (self.train_iters is None):
            raise ConfigError("give exactly one of --train-tokens and --train-iters")
        _positive("--train-tokens/--train-iters", self.total_iters)
        o = self.optim
        if o.lr <= 0:
            raise ConfigError(f"--lr must be positive (got {o.lr})")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1] (got {o.min_lr_ratio})")
        if o.warmup_tokens < 0 or o.warmup_tokens >= self.lr_decay_tokens:
            raise ConfigError(
                f"--lr-warmup-tokens {o.warmup_tokens:,} must be >= 0 and smaller than the decay "
                f"length {self.lr_decay_tokens:,} tokens (--lr-decay-tokens, default: all "
                f"{self.total_tokens:,} training tokens = {self.total_iters} steps x "
                f"{self.tokens_per_step:,} tokens)")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max-nonfinite-steps must be >= 1 (got {self.max_nonfinite_steps})")
        lg = self.logging
        _positive("--log-interval", lg.log_interval)
        _positive("--eval-interval", lg.eval_interval)
        if lg.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0 (got {lg.eval_iters})")
        if lg.profile and not 1 <= lg.profile_step_start <= lg.profile_step_end:
            raise ConfigError(f"--profile-step-start {lg.profile_step_start} and --profile-step-end "
                              f"{lg.profile_step_end} must satisfy 1 <= start <= end")
        if lg.wandb_mode not in (None, "online", "offline", "disabled"):
            raise ConfigError(f"--wandb-mode must be online, offline or disabled (got {lg.wandb_mode!r})")
        c = self.checkpoint
        _positive("--save-interval", c.save_interval)
        if c.optim_format not in ("fully_reshardable", "dp_reshardable"):
            raise ConfigError(f"--ckpt-optim-format must be fully_reshardable or dp_reshardable "
                              f"(got {c.optim_format!r})")
        if c.keep_last < 0:
            raise ConfigError(f"--keep-last must be >= 0 (got {c.keep_last})")
        if self.data.num_workers < 0:
            raise ConfigError(f"--num-workers must be >= 0 (got {self.data.num_workers})")
        if self.data.backend == "dali":
            from megatron_gdn2.data.dali import require_dali

            try:
                require_dali()
            except ImportError as err:
                raise ConfigError(f"--data-backend dali: {err}") from err
        if not self.data.train_data:
            raise ConfigError("no training data: pass --train-data PREFIX (or --train_data_dir DIR)")
        for flag, blend in (("--train-data", self.data.train_data), ("--valid-data", self.data.valid_data)):
            try:
                parse_blend(blend, flag)
            except (ValueError, OSError) as err:
                raise ConfigError(str(err)) from err
        if self.data.tokenizer is None:
            raise ConfigError("--tokenizer (or --tokenizer_path) is required: the tokenizer.json, "
                              "SentencePiece .model, or GPT-2 encoder.json + vocab.bpe directory the "
                              "data was preprocessed with")
        if not Path(self.data.tokenizer).exists():
            raise ConfigError(f"--tokenizer: {self.data.tokenizer} does not exist")


_NESTED = {
    "parallel": ParallelConfig,
    "data": DataSettings,
    "optim": OptimizerSettings,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
}


def _positive(flag: str, value: int) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{flag} must be positive (got {value})")
