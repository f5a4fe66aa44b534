"""Validation loss and perplexity.

Every evaluation reads the same ``eval_iters`` global batches from the start of the validation
split (a fresh loader at sample 0), so successive values are comparable; the loss is the
token-mean cross entropy over them (all micro-batches, all data-parallel ranks) and the
perplexity its exponential.
"""
from __future__ import annotations

import math
from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_gdn2.data.datasets import build_data_loader
from megatron_gdn2.training.forward_step import forward_step, reduce_loss

__all__ = ["evaluate", "perplexity"]


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def evaluate(cfg, model, dataset, *, num_microbatches: int, device: torch.device) -> float:
    """Collective. Token-mean validation loss over cfg.logging.eval_iters global batches."""
    loader = build_data_loader(
        dataset, consumed_samples=0, micro_batch_size=cfg.micro_batch_size,
        data_parallel_rank=ps.get_data_parallel_rank(), data_parallel_size=ps.get_data_parallel_world_size(),
        num_workers=cfg.data.num_workers, backend=cfg.data.backend,
    )
    schedule = get_forward_backward_func()
    reports = []
    model.eval()
    with torch.no_grad():
        for _ in range(cfg.logging.eval_iters):
            reports += schedule(
                forward_step_func=partial(forward_step, device=device), data_iterator=loader,
                model=[model], num_microbatches=num_microbatches, seq_length=cfg.seq_length,
                micro_batch_size=cfg.micro_batch_size, forward_only=True,
            )
    model.train()
    return reduce_loss(reports, device)
