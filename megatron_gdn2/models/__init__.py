"""GDN-2 language models on Megatron-Core's GPTModel.

Interface:

    make_transformer_config(model_cfg, *, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                            sequence_parallel=False, params_dtype=torch.float32, bf16=False,
                            kernel_backend=None, recompute=None, **overrides) -> GDN2TransformerConfig
        model_cfg: a megatron_gdn2.configs.ModelConfig (get_model_config(name)). kernel_backend is
        gdn2_kernels' backend ("triton", "torch", "fla"; None: triton on a GPU, torch on CPU).
        recompute: None, "full" or "selective". overrides: any TransformerConfig field, e.g.
        num_layers_in_first_pipeline_stage=1, transformer_impl="local", swa_attention_impl="sdpa".

    build_model(model_cfg, transformer_config, *, pre_process=True, post_process=True,
                vp_stage=None) -> GPTModel
        Pass pre_process / post_process of the pipeline stage (parallel_state.is_pipeline_first_stage()
        / is_pipeline_last_stage()). Forward is GPTModel's: model(input_ids, position_ids,
        attention_mask, labels=labels) -> per-token loss [b, s] (logits [b, s, vocab/tp] without
        labels); attention_mask may be None (all layers are causal). Recurrent models have no
        position embedding (position_ids are unused); hybrid models apply RoPE (rotate-half layout,
        base rope_base, over the whole head) in the SWA layers. Packed sequences
        (packed_seq_params, qkv_format "thd") work in GDN-2 layers; SWA layers need the TE core
        attention for them.

State-dict keys (`model.state_dict()` at TP=1). Under TP each rank holds 1/t of every split
parameter: columns for out_proj / linear_proj / linear_fc2, rows otherwise, and for the fused
weights the rank's slice of each role in the same order (in_proj [q_r | k_r | v_r | b_r | w_r],
conv_weight [q_r | k_r | v_r], linear_fc1 [gate_r | up_r], linear_qkv the rank's kv groups).

    embedding.word_embeddings.weight                    [vocab, d]
    decoder.layers.{i}.input_layernorm.weight           [d]
    decoder.layers.{i}.pre_mlp_layernorm.weight         [d]
    decoder.layers.{i}.mlp.linear_fc1.weight            [2 ffn, d]  rows [gate | up] (SwiGLU)
    decoder.layers.{i}.mlp.linear_fc2.weight            [d, ffn]
  a GDN-2 layer ("G"), K = H d_k, V = H_v d_v:
    decoder.layers.{i}.self_attention.in_proj.weight    [3K + 2V, d]  rows [q | k | v | b | w]
    decoder.layers.{i}.self_attention.conv_weight       [2K + V, 4]  channels [q | k | v]; tap 3 is
                                                                     the current token
    decoder.layers.{i}.self_attention.decay_proj.down_weight  [r_f, d]   W_f1
    decoder.layers.{i}.self_attention.decay_proj.up_weight    [K, r_f]   W_f2
    decoder.layers.{i}.self_attention.A_log             [H]
    decoder.layers.{i}.self_attention.dt_bias           [K]
    decoder.layers.{i}.self_attention.gate_proj.down_weight   [r_g, d]   W_g1
    decoder.layers.{i}.self_attention.gate_proj.up_weight     [V, r_g]   W_g2
    decoder.layers.{i}.self_attention.gate_proj.up_bias       [V]
    decoder.layers.{i}.self_attention.out_norm.weight   [d_v]  shared by the heads
    decoder.layers.{i}.self_attention.out_proj.weight   [d, V]
  an SWA layer ("A"), heads n of size h, kv groups m:
    decoder.layers.{i}.self_attention.linear_qkv.weight [(n + 2m) h, d]  rows grouped per kv group:
        for each group j: its n/m query heads, then key j, then value j (Megatron's layout)
    decoder.layers.{i}.self_attention.linear_proj.weight [d, n h]
    decoder.final_layernorm.weight                      [d]
    output_layer.weight                                 [vocab, d]  (absent with tied embeddings)

With Transformer Engine, TE modules add `..._extra_state` entries (no tensors of the model).
{i} counts from 0 over the layers of a pipeline stage; global layer = stage offset + i.
Distributed checkpoints (`model.sharded_state_dict()`) use global layer numbers and store
in_proj.weight / conv_weight per role (`.q`, `.k`, `.v`, `.b`, `.w`), so they load at any TP / PP.
"""
from megatron_gdn2.models.config import GDN2TransformerConfig, make_transformer_config
from megatron_gdn2.models.gpt import build_model

__all__ = ["GDN2TransformerConfig", "build_model", "make_transformer_config"]
