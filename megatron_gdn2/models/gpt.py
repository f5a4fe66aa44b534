"""Recurrent, hybrid and layer-pattern GDN-2 models as Megatron-Core GPTModels."""
from __future__ import annotations

from gdn2_kernels import vocab_parallel_cross_entropy
from megatron.core.models.gpt import GPTModel

from megatron_gdn2.configs import SWA_BLOCK, ModelConfig
from megatron_gdn2.models.config import GDN2TransformerConfig
from megatron_gdn2.models.specs import decoder_block_spec


class GDN2GPTModel(GPTModel):
    """GPTModel whose loss is gdn2_kernels' vocabulary-parallel cross entropy: one pass over the
    logits forward and one backward, fp32 arithmetic, the gradient in the logits' dtype. Megatron's
    own (native fused or unfused) versions make several fp32 passes over [tokens, vocab] (~4-6 ms
    per step of swa_gdn2_1.3B at 4K x 4 on an H200, benchmarks/RESULTS.md). Transformer Engine's
    cross entropy, when configured, is kept."""

    def compute_language_model_loss(self, labels, logits):
        if self.config.cross_entropy_loss_fusion and self.config.cross_entropy_fusion_impl == "te":
            return super().compute_language_model_loss(labels, logits)
        # Megatron's layout: logits [s, b, vocab / tp], labels [b, s]; the loss goes back to [b, s]
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1), group=self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()


def build_model(model_cfg: ModelConfig, transformer_config: GDN2TransformerConfig, *,
                pre_process: bool = True, post_process: bool = True,
                vp_stage: int | None = None) -> GDN2GPTModel:
    """This pipeline stage's part of `model_cfg` (see megatron_gdn2.models for the interface)."""
    if not isinstance(transformer_config, GDN2TransformerConfig):
        raise ValueError("transformer_config must come from make_transformer_config, got "
                         f"{type(transformer_config).__name__}")
    if (transformer_config.layer_pattern, transformer_config.hidden_size) != (model_cfg.layers,
                                                                              model_cfg.hidden_size):
        raise ValueError(f"transformer_config was not made from {model_cfg.name} (layer pattern "
                         f"{transformer_config.layer_pattern!r} vs {model_cfg.layers!r})")
    has_swa = SWA_BLOCK in model_cfg.layers
    rope_base = model_cfg.rope_base
    return GDN2GPTModel(
        config=transformer_config,
        transformer_layer_spec=decoder_block_spec(transformer_config, vp_stage),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        position_embedding_type="rope" if has_swa else "none",
        rotary_base=int(rope_base) if float(rope_base).is_integer() else rope_base,
        vp_stage=vp_stage,
    )
