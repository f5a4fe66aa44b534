"""The optimizer step with the per-token loss normalisation and gradient clipping folded into AdamW.

Megatron's path multiplies the fp32 gradient buffer by 1/tokens in ``finalize_model_grads``, reads
it again for the global norm, multiplies it again when clipping, and the training loop read it once
more to look for NaN/Inf: four passes over 4 bytes per parameter before AdamW reads it (~9 ms of a
330 ms step of the 1.3B model on an H200, benchmarks/RESULTS.md run 35). Here:

- ``DeferredTokenScaling`` is the ``finalize_model_grads_func``: Megatron's own, which reduces the
  gradients and the token count over every group it needs, except that the division by the token
  count is kept as a factor instead of being applied;
- ``optimizer_step`` reads the gradients once for their norm (which is also the finite check: a
  NaN or Inf anywhere, on any rank, makes the reduced norm non-finite), and hands the token factor
  times the clip coefficient to torch's fused AdamW as its ``grad_scale``, which divides each
  gradient by it as it reads it. An unfused AdamW (the CPU) gets one multiply over the gradients.

The update is Megatron's: the same norm of the token-normalised gradients, the same clip
coefficient ``clip / (norm + 1e-6)`` when below 1.
"""
from __future__ import annotations

import math

import torch
from megatron.core.distributed import finalize_model_grads

__all__ = ["DeferredTokenScaling", "optimizer_step"]


class DeferredTokenScaling:
    """``TransformerConfig.finalize_model_grads_func`` that leaves the gradients unscaled and keeps
    Megatron's factor (1 / global loss tokens, as a device tensor) for ``optimizer_step``."""

    def __init__(self):
        self.factor: torch.Tensor | None = None

    def __call__(self, model, num_tokens=None, **kwargs):
        factors = []
        # Megatron scales through each chunk's scale_gradients after reducing the token count over
        # the pipeline and data-parallel groups (which differ between versions): take the factor
        # there instead of re-deriving those groups.
        for chunk in model:
            chunk.scale_gradients = factors.append
        try:
            finalize_model_grads(model, num_tokens, **kwargs)
        finally:
            for chunk in model:
                del chunk.scale_gradients
        self.factor = factors[0] if factors else None

    def take(self) -> float:
        """The pending factor as a number (one host sync), and forget it."""
        factor, self.factor = self.factor, None
        return 1.0 if factor is None else float(factor)


def _torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return [inner.optimizer for inner in getattr(optimizer, "chained_optimizers", [optimizer])
            if not getattr(inner, "is_stub_optimizer", False) and inner.optimizer is not None]


@torch.no_grad()
def optimizer_step(optimizer, grad_factor: float, clip_grad: float) -> tuple[bool, float | None]:
    """Megatron's ``optimizer.step()`` for gradients still to be multiplied by `grad_factor`.
    Returns (updated, norm of the scaled gradients); (False, None) without touching any parameter
    when a gradient is not finite."""
    if optimizer.prepare_grads():  # an fp16 loss scaler found an overflow
        return False, None
    grad_norm = grad_factor * float(optimizer.get_grad_norm())  # a tensor with TE or apex
    if not math.isfinite(grad_norm):
        return False, None
    coeff = grad_factor
    if clip_grad > 0.0:
        coeff *= min(1.0, clip_grad / (grad_norm + 1.0e-6))
    adams = _torch_optimizers(optimizer)
    if coeff != 1.0:
        if all(group.get("fused") for adam in adams for group in adam.param_groups):
            for adam in adams:
                params = [p for group in adam.param_groups for p in group["params"]]
                if params:
                    adam.grad_scale = torch.full((), 1.0 / coeff, device=params[0].device)
        else:
            grads = [p.grad for adam in adams for group in adam.param_groups for p in group["params"]
                     if p.grad is not None]
            torch._foreach_mul_(grads, coeff)
    try:
        updated = optimizer.step_with_ready_grads()
    finally:
        for adam in adams:
            adam.__dict__.pop("grad_scale", None)
    return bool(updated), grad_norm
