"""Megatron TransformerConfig for GDN-2 models: the GDN-2 fields as dataclass fields, and the
translation from a named ModelConfig."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from gdn2_kernels.gdn2.interface import BACKENDS as KERNEL_BACKENDS
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_gdn2.configs import BLOCK_DESCRIPTIONS, SWA_BLOCK, ModelConfig, expand_layer_pattern
from megatron_gdn2.layers.gdn2_mixer import check_gdn2_shapes
from megatron_gdn2.layers.swa import SWA_ATTENTION_IMPLS

RECOMPUTE_CHOICES = {
    None: {},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective"},
}


@dataclass
class GDN2TransformerConfig(TransformerConfig):
    """TransformerConfig plus the GDN-2 mixer and layer-pattern fields (defaults are placeholders:
    build it with `make_transformer_config`)."""

    # Layers of different types cannot share one stacked checkpoint tensor per parameter name:
    # store every layer under its global number (decoder.layers.{i}.*), for both families.
    hetereogenous_dist_checkpoint: bool = True
    layer_pattern: str = ""  # flat, one letter per layer (see megatron_gdn2.configs)
    gdn2_num_heads: int = 1
    gdn2_num_v_heads: int = 1
    gdn2_head_k_dim: int = 128
    gdn2_head_v_dim: int = 128
    gdn2_decay_low_rank_dim: int = 128
    gdn2_gate_low_rank_dim: int = 128
    gdn2_conv_kernel: int = 4
    gdn2_allow_neg_eigval: bool = False
    gdn2_kernel_backend: str | None = None  # gdn2_kernels backend; None: triton on GPU, torch on CPU
    swa_attention_impl: str | None = None  # "te" | "cudnn" | "flex" | "sdpa" | "local" | None (auto)

    def __post_init__(self):
        super().__post_init__()
        if expand_layer_pattern(self.layer_pattern) != self.layer_pattern:
            raise ValueError(f"layer_pattern must be the flat layer string (one of "
                             f"{''.join(BLOCK_DESCRIPTIONS)} per layer), got {self.layer_pattern!r}")
        if len(self.layer_pattern) != self.num_layers:
            raise ValueError(f"layer_pattern {self.layer_pattern!r} has {len(self.layer_pattern)} layers "
                             f"but num_layers={self.num_layers}")
        check_gdn2_shapes(self, self.tensor_model_parallel_size)
        if self.gdn2_kernel_backend not in (None, *KERNEL_BACKENDS):
            raise ValueError(f"gdn2_kernel_backend must be one of {KERNEL_BACKENDS} or None, "
                             f"got {self.gdn2_kernel_backend!r}")
        if self.swa_attention_impl not in (None, *SWA_ATTENTION_IMPLS):
            raise ValueError(f"swa_attention_impl must be one of {SWA_ATTENTION_IMPLS} or None, "
                             f"got {self.swa_attention_impl!r}")
        if SWA_BLOCK in self.layer_pattern and self.window_size is None:
            raise ValueError("a layer pattern with SWA layers needs window_size")


def transformer_engine_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def make_transformer_config(model_cfg: ModelConfig, *, tensor_model_parallel_size: int = 1,
                            pipeline_model_parallel_size: int = 1, sequence_parallel: bool = False,
                            params_dtype: torch.dtype = torch.float32, bf16: bool = False,
                            kernel_backend: str | None = None, recompute: str | None = None,
                            **overrides) -> GDN2TransformerConfig:
    """The Megatron config of `model_cfg` at one parallel layout. `recompute`: None, "full" (every
    layer) or "selective" (attention core only). `overrides` replace any TransformerConfig field
    (e.g. num_layers_in_first_pipeline_stage, transformer_impl="local", swa_attention_impl)."""
    tp = tensor_model_parallel_size
    has_swa = SWA_BLOCK in model_cfg.layers
    split_fields = ("ffn_hidden_size", "vocab_size", "num_heads", "num_v_heads")
    for field in split_fields + (("swa_num_heads", "swa_num_kv_groups") if has_swa else ()):
        value = getattr(model_cfg, field)
        if value % tp:
            raise ValueError(f"{model_cfg.name}: {field}={value} is not divisible by "
                             f"tensor_model_parallel_size={tp}")
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute must be one of {list(RECOMPUTE_CHOICES)}, got {recompute!r}")
    on_gpu = torch.cuda.is_available()
    fields = dict(
        num_layers=model_cfg.num_layers,
        hidden_size=model_cfg.hidden_size,
        ffn_hidden_size=model_cfg.ffn_hidden_size,
        # A recurrent model has no softmax attention; Megatron still wants a head count.
        num_attention_heads=model_cfg.swa_num_heads if has_swa else model_cfg.num_heads,
        num_query_groups=model_cfg.swa_num_kv_groups if has_swa else None,
        kv_channels=model_cfg.swa_head_dim if has_swa else None,
        window_size=(model_cfg.swa_window - 1, 0) if has_swa else None,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # The fused softmax kernel ignores window_size; SWA never uses the local softmax on a GPU.
        masked_softmax_fusion=False,
        # SwiGLU as Megatron's fused (torch.compile'd) function: eager it is several passes over
        # [tokens, ffn] tensors (the H200 profile, benchmarks/RESULTS.md); uncompiled (CPU) the
        # same math.
        bias_activation_fusion=True,
        # Megatron's fused (compiled) vocab-parallel cross entropy returns the logits' gradient in
        # bf16, so it is for bf16 runs only (in fp32 it moved the CPU TP=2 test's gradients by
        # 1.6e-5); there the logits are bf16 anyway.
        cross_entropy_loss_fusion=bf16,
        init_method_std=model_cfg.init_method_std,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        pipeline_dtype=torch.bfloat16 if bf16 else params_dtype,
        use_cpu_initialization=not on_gpu,
        transformer_impl="transformer_engine" if transformer_engine_available() else "local",
        layer_pattern=model_cfg.layers,
        gdn2_num_heads=model_cfg.num_heads,
        gdn2_num_v_heads=model_cfg.num_v_heads,
        gdn2_head_k_dim=model_cfg.head_k_dim,
        gdn2_head_v_dim=model_cfg.head_v_dim,
        gdn2_decay_low_rank_dim=model_cfg.decay_low_rank_dim,
        gdn2_gate_low_rank_dim=model_cfg.gate_low_rank_dim,
        gdn2_conv_kernel=model_cfg.conv_kernel,
        gdn2_allow_neg_eigval=model_cfg.allow_neg_eigval,
        gdn2_kernel_backend=kernel_backend,
        **RECOMPUTE_CHOICES[recompute],
    )
    fields.update(overrides)
    return GDN2TransformerConfig(**fields)
