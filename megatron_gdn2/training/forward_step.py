"""The forward step handed to Megatron-Core's pipeline schedules, and the token-summed loss.

The loss is the *sum* of the per-token cross entropies over the loss mask, returned with its token
count (``TransformerConfig.calculate_per_token_loss=True``): ``finalize_model_grads`` divides the
gradients by the number of loss tokens of the whole global batch (all micro-batches, all
data-parallel ranks), so the step optimizes the exact token-mean loss whatever the micro-batch
split or layout. The reported loss is ``[sum, count]``; ``reduce_loss`` turns the schedule's
per-micro-batch reports into the global token-mean on every rank.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

__all__ = ["forward_step", "masked_token_loss", "reduce_loss"]


def masked_token_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(loss sum, token count, {"lm loss": [sum, count]}) of one micro-batch."""
    per_token = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(per_token * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_step(data_iterator, model, *, device: torch.device):
    """Megatron's forward_step_func contract: (output tensor, loss function)."""
    batch = _to_device(next(data_iterator), device)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(masked_token_loss, batch["loss_mask"])


def reduce_loss(reports: list, device: torch.device) -> float:
    """Token-mean loss of a global batch on every rank, from the schedule's reports (which exist
    only on the last pipeline stage); NaN/Inf propagate."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for report in reports:
        total += report["lm loss"].to(device=device, dtype=torch.float64)
    dist.all_reduce(total, group=ps.get_data_parallel_group())
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())
    return (total[0] / total[1].clamp(min=1)).item()
