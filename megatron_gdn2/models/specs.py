"""Layer specs (ModuleSpec + submodules) of the two block types, and the per-stage block spec.

Both block types are Megatron TransformerLayers: RMSNorm -> mixer -> residual, RMSNorm -> SwiGLU
MLP -> residual. With Transformer Engine every linear is a TE linear and norms are TENorm; the norms
stay separate modules (not fused into the next linear) so the state-dict keys are the same for the
TE and the local specs.
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)

from megatron_gdn2.configs import GDN2_BLOCK, SWA_BLOCK
from megatron_gdn2.layers.gdn2_mixer import GatedDeltaNet2, GatedDeltaNet2Submodules
from megatron_gdn2.layers.norm import RMSNorm
from megatron_gdn2.layers.swa import RotaryInCoreSelfAttention, SlidingWindowCoreAttention, swa_core_attention


def _modules(config):
    """(column-parallel linear, row-parallel linear, norm) classes for config.transformer_impl."""
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return TEColumnParallelLinear, TERowParallelLinear, TENorm
    if config.transformer_impl != "local":
        raise ValueError("transformer_impl must be 'transformer_engine' or 'local', got "
                         f"{config.transformer_impl!r}")
    return ColumnParallelLinear, RowParallelLinear, RMSNorm


def _mlp(column, row):
    submodules = MLPSubmodules(linear_fc1=column, linear_fc2=row)
    if hasattr(MLP, "as_mlp_submodule"):  # megatron-core >= 0.17 builds MLPs from a callable
        from functools import partial

        return partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


def _layer(config, mixer: ModuleSpec) -> ModuleSpec:
    column, row, norm = _modules(config)
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=norm, self_attention=mixer, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=norm, mlp=_mlp(column, row), mlp_bda=get_bias_dropout_add))


def gdn2_layer_spec(config) -> ModuleSpec:
    """"G": GDN-2 mixer + MLP."""
    column, row, _ = _modules(config)
    mixer = ModuleSpec(module=GatedDeltaNet2,
                       submodules=GatedDeltaNet2Submodules(in_proj=column, out_proj=row))
    return _layer(config, mixer)


def swa_layer_spec(config) -> ModuleSpec:
    """"A": sliding-window causal self-attention with RoPE + MLP."""
    column, row, _ = _modules(config)
    core = swa_core_attention(config)
    # our core attentions apply RoPE themselves, fused with their layout change
    attention = (RotaryInCoreSelfAttention if issubclass(core, SlidingWindowCoreAttention)
                 and not config.rotary_interleaved else SelfAttention)
    mixer = ModuleSpec(module=attention, params={"attn_mask_type": AttnMaskType.causal},
                       submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core,
                                                          linear_proj=row))
    return _layer(config, mixer)


LAYER_SPECS = {GDN2_BLOCK: gdn2_layer_spec, SWA_BLOCK: swa_layer_spec}


def decoder_block_spec(config, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The layers of this pipeline stage (uneven first/last stages via the config's
    num_layers_in_first/last_pipeline_stage) and the final norm."""
    if config.pipeline_model_parallel_layout is not None:
        raise ValueError("pipeline_model_parallel_layout is not supported; use "
                         "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage")
    _, _, norm = _modules(config)
    specs = {block: LAYER_SPECS[block](config) for block in set(config.layer_pattern)}
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    local = config.layer_pattern[offset:offset + count]
    return TransformerBlockSubmodules(layer_specs=[specs[block] for block in local], layer_norm=norm)
