"""The training loop: steps, non-finite handling, logging, evaluation, checkpoints, stopping.

One step: zero the DDP grad buffers, run Megatron's forward-backward schedule over the global
batch's micro-batches (gradients reduced over data-parallel ranks in ``finalize_model_grads``),
reduce the loss, check the loss and the gradients' global norm for NaN/Inf on all ranks, then (if
finite) step AdamW with the gradients divided by the loss tokens and clipped to ``--clip-grad``
(``optimizer_step``), and advance the learning-rate schedule by the step's tokens.

Non-finite loss or gradient: the step is skipped (no update, schedule not advanced; the batch
counts as consumed) and a line is logged. ``--max-nonfinite-steps`` K skipped steps in a row stop
the run: the model and optimizer still hold the last good state, which is checkpointed (with the
data position after the bad batches) before the run ends with ``DivergenceError``.

Stopping: at the last iteration (final checkpoint); on SIGTERM/SIGUSR1 (see ``signals``); at
``--exit-interval`` multiples; after ``--exit-duration-mins``. Each saves a checkpoint first.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_gdn2.data.datasets import MicroBatchLoader
from megatron_gdn2.training.checkpointing import TrainState, save_checkpoint
from megatron_gdn2.training.config import PretrainConfig
from megatron_gdn2.training.distributed import log_any_rank
from megatron_gdn2.training.distributed import log_rank0 as info
from megatron_gdn2.training.evaluation import evaluate, perplexity
from megatron_gdn2.training.forward_step import forward_step, reduce_loss
from megatron_gdn2.training.metrics import ProgressMeter
from megatron_gdn2.training.model_setup import ModelBundle
from megatron_gdn2.training.optimizer_step import optimizer_step
from megatron_gdn2.training.profiling import StepProfiler
from megatron_gdn2.training.signals import PreemptionHandler
from megatron_gdn2.training.wandb_logger import WandbLogger

__all__ = ["DivergenceError", "RunResult", "Trainer"]


class DivergenceError(RuntimeError):
    """K non-finite steps in a row; the last good state was checkpointed."""


@dataclass
class RunResult:
    exit_reason: str  # "finished", "signal", "exit-interval", "exit-duration"
    state: TrainState
    train_losses: dict[int, float] = field(default_factory=dict)  # iteration -> loss (NaN if skipped)
    valid_losses: dict[int, float] = field(default_factory=dict)  # iteration -> validation loss
    checkpoint: str | None = None


@dataclass
class Trainer:
    cfg: PretrainConfig
    bundle: ModelBundle
    model_config: dict  # the ModelConfig as a dict, stored in checkpoints
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    train_loader: MicroBatchLoader
    valid_dataset: object | None  # a Megatron GPTDataset / BlendedDataset
    state: TrainState
    meter: ProgressMeter
    wandb: WandbLogger
    device: torch.device
    num_microbatches: int

    def __post_init__(self):
        self.schedule = get_forward_backward_func()
        self.result = RunResult(exit_reason="", state=self.state)
        self.nonfinite_in_row = 0
        self.last_saved: int | None = None
        lg = self.cfg.logging
        out_dir = lg.profile_dir or str(Path(self.cfg.checkpoint.save or ".") / "profile")
        self.profiler = StepProfiler(lg.profile_step_start, lg.profile_step_end,
                                     lg.profile_ranks if lg.profile else [], out_dir, dist.get_rank(),
                                     log_any_rank)

    # ---- pieces ---------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float | None, bool]:
        model = self.bundle.model
        model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self.schedule(
            forward_step_func=partial(forward_step, device=self.device), data_iterator=self.train_loader,
            model=[model], num_microbatches=self.num_microbatches, seq_length=self.cfg.seq_length,
            micro_batch_size=self.cfg.micro_batch_size, forward_only=False,
        )
        loss = reduce_loss(reports, self.device)
        grad_factor = self.bundle.token_scaling.take()
        if not math.isfinite(loss):
            return loss, None, False
        updated, grad_norm = optimizer_step(self.optimizer, grad_factor, self.cfg.optim.clip_grad)
        return loss, grad_norm, updated

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @contextlib.contextmanager
    def params_current(self):
        """With --overlap-param-gather the optimizer's update reaches the model's parameters only in
        the next forward (its pre-hooks gather bucket by bucket; an evaluation forward does that
        too). A checkpoint reads them outside any forward: gather now, synchronously, with the
        hooks off meanwhile."""
        model = self.bundle.model
        if not self.cfg.parallel.overlap_param_gather:
            yield
            return
        model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            model.enable_forward_pre_hook()

    def save(self) -> str | None:
        if self.cfg.checkpoint.save is None or self.last_saved == self.state.iteration:
            return None
        start = time.perf_counter()
        self.state.wandb_run_id = self.wandb.run_id or self.state.wandb_run_id
        with self.params_current():
            path = save_checkpoint(self.cfg, self.state, self.bundle.module, self.optimizer, self.scheduler,
                                   self.model_config)
        self.last_saved = self.state.iteration
        self.result.checkpoint = str(path)
        info(f"saved checkpoint {path} ({time.perf_counter() - start:.1f} s)")
        return str(path)

    def run_evaluation(self) -> None:
        if self.valid_dataset is None or self.cfg.logging.eval_iters == 0:
            return
        start = time.perf_counter()
        loss = evaluate(self.cfg, self.bundle.model, self.valid_dataset,
                        num_microbatches=self.num_microbatches, device=self.device)
        it = self.state.iteration
        self.result.valid_losses[it] = loss
        info(f"validation at iter {it}: loss {loss:.4f} | ppl {perplexity(loss):.2f} "
             f"({time.perf_counter() - start:.1f} s)")
        self.wandb.log({"valid/loss": loss, "valid/ppl": perplexity(loss)}, step=it)

    def _log_interval(self) -> None:
        s = self.state
        stats = self.meter.summarize(iteration=s.iteration, consumed_tokens=s.consumed_tokens,
                                     lr=self.current_lr(), skipped=s.skipped_steps)
        info(stats.line())
        self.wandb.log(stats.as_dict(), step=self.state.iteration)

    def _stop_reason(self, handler: PreemptionHandler, start_time: float) -> str | None:
        c = self.cfg.checkpoint
        over_time = c.exit_duration_mins is not None and time.time() - start_time > 60 * c.exit_duration_mins
        flags = torch.tensor([1.0 if handler.received is not None else 0.0, 1.0 if over_time else 0.0],
                             device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            info(f"received {handler.name}: saving a checkpoint and stopping")
            return "signal"
        if flags[1] > 0:
            info(f"--exit-duration-mins {c.exit_duration_mins} reached: saving and stopping")
            return "exit-duration"
        if c.exit_interval and self.state.iteration % c.exit_interval == 0:
            info(f"--exit-interval {c.exit_interval} reached at iter {self.state.iteration}: "
                 "saving and stopping")
            return "exit-interval"
        return None

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg, state = self.cfg, self.state
        total = cfg.total_iters
        handler = PreemptionHandler().install()
        start_time = time.time()
        try:
            if state.iteration == 0:
                self.run_evaluation()
            while state.iteration < total:
                t0 = time.perf_counter()
                self.profiler.step_begins(state.iteration + 1)
                loss, grad_norm, ok = self.train_step()
                state.iteration += 1
                self.profiler.step_ends(state.iteration)
                state.consumed_samples += cfg.global_batch_size
                state.consumed_tokens += cfg.tokens_per_step
                it = state.iteration
                self.result.train_losses[it] = loss if ok else math.nan
                if ok:
                    self.nonfinite_in_row = 0
                    self.scheduler.step(increment=cfg.tokens_per_step)
                else:
                    self._skip(it, loss)
                self.meter.record(time.perf_counter() - t0, loss if ok else None,
                                  float(grad_norm) if grad_norm is not None else None)
                if it % cfg.logging.log_interval == 0 or it == total:
                    self._log_interval()
                if it % cfg.logging.eval_interval == 0 or it == total:
                    self.run_evaluation()
                if it % cfg.checkpoint.save_interval == 0:
                    self.save()
                reason = self._stop_reason(handler, start_time)
                if reason is not None:
                    self.save()
                    self.result.exit_reason = reason
                    return self.result
            if self.last_saved != state.iteration and self.result.train_losses:
                self.save()
            self.result.exit_reason = "finished"
            info(f"training finished at iter {state.iteration} ({state.consumed_tokens:,} tokens)")
            return self.result
        finally:
            handler.restore()

    def _skip(self, it: int, loss: float) -> None:
        self.nonfinite_in_row += 1
        self.state.skipped_steps += 1
        k = self.cfg.max_nonfinite_steps
        info(f"iter {it}: non-finite loss or gradient (loss {loss}); step skipped "
             f"({self.nonfinite_in_row} in a row, the run stops at {k})")
        if self.nonfinite_in_row >= k:
            first = it - k + 1
            path = self.save()
            raise DivergenceError(
                f"{k} non-finite steps in a row (iterations {first}-{it}): stopping. The model and "
                f"optimizer still hold the state after iteration {first - 1}"
                + (f", saved in {path} (its data position skips the bad batches)" if path else
                   " (no --save directory: not saved)")
                + "; lower --lr or check the data before resuming.")

