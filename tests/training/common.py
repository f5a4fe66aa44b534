"""Shared configuration and rank workers of the training tests (workers run under
tests.harness.run_distributed, so they are module-level and return plain Python values)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_gdn2.training.config import (
    CheckpointConfig,
    DataSettings,
    LoggingConfig,
    OptimizerSettings,
    PretrainConfig,
)

SEQ, MICRO, GLOBAL = 64, 2, 8


def make_config(corpus, save: Path | str | None, *, iters: int, **changes) -> PretrainConfig:
    """The tiny hybrid model (GDN-2 + SWA layers) on the test corpus, fp32 on CPU."""
    cfg = PretrainConfig(
        model="swa_gdn2_tiny", seq_length=SEQ, micro_batch_size=MICRO, global_batch_size=GLOBAL,
        train_iters=iters, seed=1234,
        data=DataSettings(train_data=[corpus.prefix], split="95,5,0", tokenizer=corpus.tokenizer,
                          cache_dir=corpus.cache_dir),
        optim=OptimizerSettings(lr=1e-2, warmup_tokens=2 * SEQ * GLOBAL),
        checkpoint=CheckpointConfig(save=str(save) if save is not None else None, save_interval=iters),
        logging=LoggingConfig(log_interval=5, eval_interval=iters, eval_iters=2),
    )
    for dotted, value in changes.items():
        target = cfg
        *path, name = dotted.split("__")
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)
    return cfg


def summarize(result) -> dict:
    return {"reason": result.exit_reason, "train": dict(result.train_losses),
            "valid": dict(result.valid_losses), "state": dataclasses.asdict(result.state),
            "checkpoint": result.checkpoint}


def train(cfg_dicts: list[dict]) -> list[dict]:
    """Runs each configuration in turn on this set of ranks."""
    from megatron_gdn2.training.runner import run

    return [summarize(run(PretrainConfig.from_dict(d))) for d in cfg_dicts]


def train_in_layouts(runs: list[tuple[int, int, dict]]) -> list[dict]:
    """For each (tp, pp, config): rebuild Megatron's parallel state in that layout on these ranks
    (one launch serves several layouts), then run the configuration."""
    from megatron.core import parallel_state as ps

    from megatron_gdn2.training.runner import run

    out = []
    for tp, pp, cfg_dict in runs:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        out.append(summarize(run(PretrainConfig.from_dict(cfg_dict))))
    return out
