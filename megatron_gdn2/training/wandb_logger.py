"""Optional Weights & Biases logging: on rank 0, only when ``--wandb-project`` is given.

``--wandb-mode offline`` writes the run under ``--wandb-dir`` for a later ``wandb sync`` (no
network, no account); ``disabled`` turns it off. wandb is never required: when the package is
missing or ``wandb.init`` fails, a warning is logged and training goes on. The run id is kept in
the checkpoint's training state, so a resumed job continues the same wandb run.
"""
from __future__ import annotations

import logging

__all__ = ["WandbLogger"]

log = logging.getLogger(__name__)


class WandbLogger:
    def __init__(self, run=None):
        self._run = run

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @classmethod
    def start(cls, logging_cfg, *, config: dict, run_id: str | None, is_writer: bool) -> WandbLogger:
        if not is_writer or not logging_cfg.wandb_project or logging_cfg.wandb_mode == "disabled":
            return cls()
        try:
            import wandb
        except ImportError:
            log.warning("--wandb-project given but wandb is not installed: not logging to wandb")
            return cls()
        kwargs = dict(project=logging_cfg.wandb_project, name=logging_cfg.wandb_name,
                      group=logging_cfg.wandb_group, dir=logging_cfg.wandb_dir, config=config,
                      mode=logging_cfg.wandb_mode, id=run_id, resume="allow" if run_id else None)
        if logging_cfg.wandb_dir:
            from pathlib import Path

            Path(logging_cfg.wandb_dir).mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(**{k: v for k, v in kwargs.items() if v is not None})
        except Exception as e:  # noqa: BLE001 - wandb is optional: any failure must not stop training
            log.warning("wandb.init failed (%s): not logging to wandb", e)
            return cls()
        return cls(run)

    def log(self, metrics: dict, step: int) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
