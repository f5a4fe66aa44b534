"""AdamW through Megatron-Core's optimizer stack, and the learning-rate schedule in tokens.

- ``get_megatron_optimizer`` builds the optimizer: fp32 AdamW on CPU; on GPU a bf16 model with
  fp32 main weights (Float16OptimizerWithFloat16Params), or the DistributedOptimizer, which shards
  the fp32 state over data-parallel ranks.
- Parameter groups: weight decay (0.1 by default) on every matrix; none on norms, biases, the
  GDN-2 ``A_log`` and ``dt_bias`` (a ``wd_mult=0`` override group). The same predicate runs on
  every rank, so the groups line up across ranks as dist-checkpointing requires.
- The schedule is Megatron's ``OptimizerParamScheduler`` stepped in *tokens*: after every optimizer
  step it advances by the step's token count (global batch x sequence length), so warm-up and
  decay lengths are token counts: linear warm-up from 0 to the peak over ``warmup_tokens``, then
  cosine decay to ``min_lr_ratio x peak`` at ``decay_tokens`` (default: all training tokens), flat
  after that. A skipped (non-finite) step does not advance it. On resume the schedule of the
  current command line applies at the checkpoint's token position.
"""
from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_gdn2.training.config import PretrainConfig

__all__ = ["build_optimizer", "build_scheduler", "uses_weight_decay"]

_NO_DECAY_SUFFIXES = (".bias", "A_log", "dt_bias")


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """False for norm weights (every 1-D tensor), biases, A_log and dt_bias."""
    return param.dim() >= 2 and not name.endswith(_NO_DECAY_SUFFIXES)


def build_optimizer(cfg: PretrainConfig, model_chunks: list, *, bf16: bool):
    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="gdn2_no_weight_decay", fn=lambda param, name: not uses_weight_decay(name, param)))
    optimizer = get_megatron_optimizer(opt_config, model_chunks,
                                       config_overrides={no_decay: {"wd_mult": 0.0}})
    fuse_adamw(optimizer)
    if torch.cuda.is_available():
        _use_foreach_norm()
    return optimizer


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """The global L2 norm of tensor_lists[0] as a [1] tensor on their device, with the calling
    convention of amp_C.multi_tensor_l2norm, in three launches and without a host sync."""
    tensors = tensor_lists[0]
    if not tensors:
        return torch.zeros(1, device="cuda"), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _use_foreach_norm() -> None:
    """Without Transformer Engine or apex, Megatron's gradient norm falls back to one that reads
    every gradient's norm to the host one by one (~200 GPU syncs per step for a 1.3B model;
    benchmarks/RESULTS.md); give it the foreach version instead, only when Megatron picked its
    local fallback (a module attribute set at import)."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm


def fuse_adamw(optimizer, device_types=("cuda",)) -> None:
    """Switches the torch AdamW inside Megatron's optimizer to its fused kernel (one launch per
    parameter group instead of torch's default multi-tensor passes; without Transformer Engine or
    apex Megatron builds the default one) when every parameter is on one of `device_types`.

    Fused AdamW wants its step counters on the parameters' device; Megatron's checkpoint loading
    may leave them on the CPU, so a pre-step hook moves any that are not."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(inner, "optimizer", None)
        if not isinstance(adam, torch.optim.AdamW):
            continue
        params = [p for group in adam.param_groups for p in group["params"]]
        if not params or any(p.device.type not in device_types for p in params):
            continue
        for group in adam.param_groups:
            group["fused"], group["foreach"] = True, False
        adam.register_step_pre_hook(_steps_on_device)


def _steps_on_device(adam, args, kwargs) -> None:
    for param, state in adam.state.items():
        step = state.get("step")
        if step is not None and (not torch.is_tensor(step) or step.device != param.device
                                 or step.dtype != torch.float32):
            state["step"] = torch.as_tensor(step, dtype=torch.float32, device=param.device)


def build_scheduler(cfg: PretrainConfig, optimizer) -> OptimizerParamScheduler:
    o = cfg.optim
    decay = cfg.lr_decay_tokens
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.lr * o.min_lr_ratio,
        lr_warmup_steps=o.warmup_tokens,
        lr_decay_steps=decay,
        lr_decay_style="cosine",
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
