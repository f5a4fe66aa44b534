"""RMSNorm for the local (non-Transformer-Engine) layer specs.

Megatron's WrappedTorchNorm refuses sequence parallelism; this one supports it the way Megatron's
fused norms do: each rank normalises its own tokens, so the weight gradient is partial and the
weight carries `sequence_parallel = True`, which makes `finalize_model_grads` sum it over the
tensor-parallel group.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gdn2.layers.params import new_parameter


class RMSNorm(torch.nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight through torch's rms_norm: the statistics in fp32 (one
    fused kernel on a GPU), the result in x's dtype. Spelled out in PyTorch it was seven passes over
    the activations forward and kept fp32 copies of them for the backward (benchmarks/RESULTS.md)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        self.eps = eps
        self.weight = new_parameter(config, hidden_size, fill=1.0)
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)
