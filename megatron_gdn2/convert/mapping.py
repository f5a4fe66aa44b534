"""How a Megatron GDN-2 model and the Hugging Face model correspond: configs and tensors.

Megatron names are those of the TP=1 `model.state_dict()` (listed in megatron_gdn2.models); every
Hugging Face tensor is a set of rows of one Megatron tensor, reshaped:

    model.embed_tokens.weight                 embedding.word_embeddings.weight
    model.layers.{i}.input_layernorm.weight   decoder.layers.{i}.input_layernorm.weight
    model.layers.{i}.post_attention_layernorm decoder.layers.{i}.pre_mlp_layernorm.weight
    model.layers.{i}.mlp.gate_proj / up_proj  decoder.layers.{i}.mlp.linear_fc1.weight, rows [gate | up]
    model.layers.{i}.mlp.down_proj            decoder.layers.{i}.mlp.linear_fc2.weight
    GDN-2 layer, mixer.*:
      q_proj k_proj v_proj b_proj w_proj      self_attention.in_proj.weight, rows [q | k | v | b | w]
      q_conv1d k_conv1d v_conv1d [C, 1, K]    self_attention.conv_weight [C, K], rows [q | k | v]
      f_a_proj f_b_proj                       self_attention.decay_proj.down_weight / up_weight
      A_log dt_bias                           self_attention.A_log / dt_bias
      g_a_proj g_b_proj (weight, bias)        self_attention.gate_proj.down_weight / up_weight / up_bias
      o_norm o_proj                           self_attention.out_norm.weight / out_proj.weight
    SWA layer, mixer.*:
      q_proj k_proj v_proj                    self_attention.linear_qkv.weight, rows grouped per kv group
                                              (the group's query heads, its key head, its value head)
      o_proj                                  self_attention.linear_proj.weight
    model.norm.weight                         decoder.final_layernorm.weight
    lm_head.weight                            output_layer.weight (absent with tied embeddings)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megatron_gdn2.configs import GDN2_BLOCK, MODEL_CONFIGS, SWA_BLOCK, ModelConfig, get_model_config
from megatron_gdn2.hf.configuration_gdn2 import LINEAR_ATTENTION, SLIDING_ATTENTION, GDN2Config

BLOCK_TO_LAYER_TYPE = {GDN2_BLOCK: LINEAR_ATTENTION, SWA_BLOCK: SLIDING_ATTENTION}
LAYER_TYPE_TO_BLOCK = {v: k for k, v in BLOCK_TO_LAYER_TYPE.items()}
# ModelConfig fields a run sets itself rather than through model overrides.
RUN_FIELDS = ("name", "vocab_size", "seq_length", "published_params")
SWA_FIELDS = ("swa_num_heads", "swa_num_kv_groups", "swa_head_dim", "swa_window", "rope_base")


class ConversionError(ValueError):
    """Configs or tensors that do not fit together; the message names the field or tensor."""


def hf_config_for(model_cfg: ModelConfig, **token_ids) -> GDN2Config:
    """The GDN2Config of a Megatron model config (token ids: bos/eos/pad_token_id)."""
    settings = dict(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.ffn_hidden_size,
        num_hidden_layers=model_cfg.num_layers,
        layer_types=[BLOCK_TO_LAYER_TYPE[block] for block in model_cfg.layers],
        num_heads=model_cfg.num_heads,
        num_v_heads=model_cfg.num_v_heads,
        head_k_dim=model_cfg.head_k_dim,
        head_v_dim=model_cfg.head_v_dim,
        decay_low_rank_dim=model_cfg.decay_low_rank_dim,
        gate_low_rank_dim=model_cfg.gate_low_rank_dim,
        conv_size=model_cfg.conv_kernel,
        conv_bias=False,
        allow_neg_eigval=model_cfg.allow_neg_eigval,
        mlp_bias=False,
        rms_norm_eps=model_cfg.norm_eps,
        max_position_embeddings=model_cfg.seq_length,
        initializer_range=model_cfg.init_method_std,
        tie_word_embeddings=model_cfg.tie_embeddings,
    )
    if SWA_BLOCK in model_cfg.layers:
        settings.update(
            num_attention_heads=model_cfg.swa_num_heads,
            num_key_value_heads=model_cfg.swa_num_kv_groups,
            attention_head_dim=model_cfg.swa_head_dim,
            attention_bias=False,
            sliding_window=model_cfg.swa_window,
            rope_theta=float(model_cfg.rope_base),
            rotary_dim=model_cfg.swa_head_dim,
        )
    return GDN2Config(**settings, **token_ids)


def model_config_from_hf(config: GDN2Config, base: ModelConfig) -> ModelConfig:
    """`base` with every architecture field taken from the HF config; ConversionError names a
    setting the Megatron model cannot represent."""
    has_swa = SLIDING_ATTENTION in config.layer_types
    unsupported = [f"{field}={getattr(config, field)!r}" for field in ("conv_bias", "mlp_bias")
                   if getattr(config, field)]
    if has_swa:
        if config.attention_bias:
            unsupported.append("attention_bias=True")
        if config.rotary_dim != config.attention_head_dim:
            unsupported.append(f"rotary_dim={config.rotary_dim} (the Megatron model rotates whole heads of "
                               f"{config.attention_head_dim})")
    if unsupported:
        raise ConversionError("config.json has settings the Megatron model does not support: "
                              + ", ".join(unsupported))
    layers = "".join(LAYER_TYPE_TO_BLOCK[t] for t in config.layer_types)
    fields = dict(
        layer_pattern=base.layer_pattern if base.layers == layers else layers,
        hidden_size=config.hidden_size, ffn_hidden_size=config.intermediate_size, num_heads=config.num_heads,
        head_k_dim=config.head_k_dim, head_v_dim=config.head_v_dim, num_v_heads=config.num_v_heads,
        decay_low_rank_dim=config.decay_low_rank_dim, gate_low_rank_dim=config.gate_low_rank_dim,
        conv_kernel=config.conv_size, allow_neg_eigval=config.allow_neg_eigval, vocab_size=config.vocab_size,
        seq_length=config.max_position_embeddings, norm_eps=config.rms_norm_eps,
        tie_embeddings=config.tie_word_embeddings, init_method_std=config.initializer_range,
    )
    if has_swa:
        fields.update(swa_num_heads=config.num_attention_heads, swa_num_kv_groups=config.num_key_value_heads,
                      swa_head_dim=config.attention_head_dim, swa_window=config.sliding_window,
                      rope_base=config.rope_theta)
    try:
        return dataclasses.replace(base, **fields)
    except ValueError as err:
        raise ConversionError(f"config.json does not describe a valid model: {err}") from err


def model_overrides(model_cfg: ModelConfig, base: ModelConfig) -> list[str]:
    """The FIELD=VALUE model overrides (gdn2-pretrain --model-override) that turn `base` into
    `model_cfg`; the run's own fields (vocabulary, sequence length) aside."""
    overrides = []
    for field in dataclasses.fields(ModelConfig):
        value = getattr(model_cfg, field.name)
        if field.name not in RUN_FIELDS and value != getattr(base, field.name):
            overrides.append(f"{field.name}={value}")
    return overrides


def model_config_for(config: GDN2Config, name: str | None = None) -> tuple[ModelConfig, list[str]]:
    """(the Megatron model config of an HF config, its overrides of the registered config it is
    based on): `name`, or else the registered config it differs least from."""
    if name is not None:
        bases = [get_model_config(name)]
    else:
        bases = list(MODEL_CONFIGS.values())
    candidates = [(model_config_from_hf(config, base), base) for base in bases]
    model_cfg, base = min(candidates, key=lambda pair: len(model_overrides(*pair)))
    return model_cfg, model_overrides(model_cfg, base)


@dataclass(frozen=True)
class TensorMap:
    """The HF tensor `hf_name` is rows `rows` of the Megatron tensor `megatron_name`, reshaped."""

    hf_name: str
    hf_shape: tuple[int, ...]
    megatron_name: str
    megatron_shape: tuple[int, ...]
    rows: torch.Tensor | None = None  # None: all rows

    def to_hf(self, megatron_tensor: torch.Tensor) -> torch.Tensor:
        picked = megatron_tensor if self.rows is None else megatron_tensor.index_select(0, self.rows)
        return picked.reshape(self.hf_shape)

    def write_megatron(self, megatron_tensor: torch.Tensor, hf_tensor: torch.Tensor) -> None:
        """Writes the HF tensor into its rows of `megatron_tensor` (in place)."""
        if self.rows is None:
            megatron_tensor.copy_(hf_tensor.reshape(self.megatron_shape))
        else:
            megatron_tensor[self.rows] = hf_tensor.reshape(len(self.rows), *self.megatron_shape[1:]).to(
                megatron_tensor.dtype)

    @property
    def numel(self) -> int:
        return int(torch.Size(self.hf_shape).numel())


def _row_blocks(sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Consecutive row ranges of the named sections, in order."""
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = torch.arange(start, start + size)
        start += size
    return out


def _swa_rows(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rows of q, k and v in Megatron's linear_qkv: per kv group, its query heads, then k, then v."""
    head, groups = cfg.swa_head_dim, cfg.swa_num_kv_groups
    per_group = cfg.swa_num_heads // groups
    group_rows = (per_group + 2) * head
    rows = {"q": [], "k": [], "v": []}
    for g in range(groups):
        base = g * group_rows
        rows["q"].append(torch.arange(base, base + per_group * head))
        rows["k"].append(torch.arange(base + per_group * head, base + (per_group + 1) * head))
        rows["v"].append(torch.arange(base + (per_group + 1) * head, base + group_rows))
    return {name: torch.cat(parts) for name, parts in rows.items()}


def _gdn2_maps(cfg: ModelConfig, hf: str, mg: str) -> list[TensorMap]:
    d = cfg.hidden_size
    key_dim, value_dim = cfg.num_heads * cfg.head_k_dim, cfg.num_v_heads * cfg.head_v_dim
    in_shape, conv_shape = (3 * key_dim + 2 * value_dim, d), (2 * key_dim + value_dim, cfg.conv_kernel)
    in_rows = _row_blocks({"q": key_dim, "k": key_dim, "v": value_dim, "b": key_dim, "w": value_dim})
    conv_rows = _row_blocks({"q": key_dim, "k": key_dim, "v": value_dim})
    maps = [TensorMap(f"{hf}.{role}_proj.weight", (len(rows), d), f"{mg}.in_proj.weight", in_shape, rows)
            for role, rows in in_rows.items()]
    maps += [TensorMap(f"{hf}.{role}_conv1d.weight", (len(rows), 1, cfg.conv_kernel), f"{mg}.conv_weight",
                       conv_shape, rows) for role, rows in conv_rows.items()]
    whole = [
        ("f_a_proj.weight", "decay_proj.down_weight", (cfg.decay_low_rank_dim, d)),
        ("f_b_proj.weight", "decay_proj.up_weight", (key_dim, cfg.decay_low_rank_dim)),
        ("A_log", "A_log", (cfg.num_heads,)),
        ("dt_bias", "dt_bias", (key_dim,)),
        ("g_a_proj.weight", "gate_proj.down_weight", (cfg.gate_low_rank_dim, d)),
        ("g_b_proj.weight", "gate_proj.up_weight", (value_dim, cfg.gate_low_rank_dim)),
        ("g_b_proj.bias", "gate_proj.up_bias", (value_dim,)),
        ("o_norm.weight", "out_norm.weight", (cfg.head_v_dim,)),
        ("o_proj.weight", "out_proj.weight", (d, value_dim)),
    ]
    return maps + [TensorMap(f"{hf}.{h}", shape, f"{mg}.{m}", shape) for h, m, shape in whole]


def _swa_maps(cfg: ModelConfig, hf: str, mg: str) -> list[TensorMap]:
    d, head = cfg.hidden_size, cfg.swa_head_dim
    qkv_shape = ((cfg.swa_num_heads + 2 * cfg.swa_num_kv_groups) * head, d)
    maps = [TensorMap(f"{hf}.{role}_proj.weight", (len(rows), d), f"{mg}.linear_qkv.weight", qkv_shape, rows)
            for role, rows in _swa_rows(cfg).items()]
    out_shape = (d, cfg.swa_num_heads * head)
    return maps + [TensorMap(f"{hf}.o_proj.weight", out_shape, f"{mg}.linear_proj.weight", out_shape)]


def tensor_maps(cfg: ModelConfig) -> list[TensorMap]:
    """Every tensor of the HF model, in the HF model's order."""
    d, ffn = cfg.hidden_size, cfg.ffn_hidden_size
    vocab = (cfg.vocab_size, d)
    maps = [TensorMap("model.embed_tokens.weight", vocab, "embedding.word_embeddings.weight", vocab)]
    fc1_rows = _row_blocks({"gate": ffn, "up": ffn})
    for i, block in enumerate(cfg.layers):
        hf, mg = f"model.layers.{i}", f"decoder.layers.{i}"
        maps.append(TensorMap(f"{hf}.input_layernorm.weight", (d,), f"{mg}.input_layernorm.weight", (d,)))
        mixer = _gdn2_maps if block == GDN2_BLOCK else _swa_maps
        maps += mixer(cfg, f"{hf}.mixer", f"{mg}.self_attention")
        maps.append(TensorMap(f"{hf}.post_attention_layernorm.weight", (d,), f"{mg}.pre_mlp_layernorm.weight",
                              (d,)))
        maps += [TensorMap(f"{hf}.mlp.{part}_proj.weight", (ffn, d), f"{mg}.mlp.linear_fc1.weight",
                           (2 * ffn, d), rows) for part, rows in fc1_rows.items()]
        maps.append(TensorMap(f"{hf}.mlp.down_proj.weight", (d, ffn), f"{mg}.mlp.linear_fc2.weight",
                              (d, ffn)))
    maps.append(TensorMap("model.norm.weight", (d,), "decoder.final_layernorm.weight", (d,)))
    if not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", vocab, "output_layer.weight", vocab))
    return maps


def megatron_shapes(maps: list[TensorMap]) -> dict[str, tuple[int, ...]]:
    """The TP=1 shape of every Megatron tensor the maps read, in first-use order."""
    return {m.megatron_name: m.megatron_shape for m in maps}
