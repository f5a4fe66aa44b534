"""Named model configurations of Gated DeltaNet-2 language models, with parameter counts.

Every model is a stack of layers written as a layer-pattern string; one letter is one Megatron
TransformerLayer (pre-norm token mixer, then pre-norm SwiGLU MLP, each with a residual):

    G   GDN-2 mixer + MLP
    A   sliding-window softmax attention (SWA, RoPE) + MLP

Grammar (whitespace ignored):

    pattern := term+
    term    := atom ["*" count]          count: a positive integer
    atom    := "G" | "A" | "(" pattern ")"

so the recurrent 1.3B model is "G*18", the hybrid one "(GA)*9" (the paper's N x [GDN-2, MLP, SWA,
MLP] with N = 9), and one SWA layer in four is "(GGGA)*6".

Parameter-count convention (worked out from the published figures): the paper's 1,302,638,112
(`gdn2_1.3B`) and 1,300,314,384 (`swa_gdn2_1.3B`) are exactly the parameters of the 18 layers
(`ParameterCount.blocks`): they leave out the token embedding, the output layer and the final
norm. Both figures are reproduced to the parameter with: low-rank decay and output-gate factors of
rank d_v = 128 (`d_model -> d_v -> H * d_k`), a bias on the second output-gate factor only, a
depthwise conv without bias on q, k and v, one RMSNorm weight of d_v shared by all heads, no
biases elsewhere, a full multi-head SWA (18 query and 18 key/value heads of 128). Whether the
embeddings are tied does not enter the published figure; these configs keep them untied (the
reference implementation's default), so the 1.3B models hold 2 x 32,000 x 2,304 more parameters in
total. The 370M, 2.7B, 7B and 14B configs follow the same convention: their name is their
`blocks` count to within 1%.

`python -m megatron_gdn2.configs` prints every config with its counts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GDN2_BLOCK = "G"
SWA_BLOCK = "A"
BLOCK_DESCRIPTIONS = {GDN2_BLOCK: "GDN-2 mixer + MLP", SWA_BLOCK: "sliding-window attention + MLP"}


def expand_layer_pattern(pattern: str) -> str:
    """The flat layer string of a pattern ("(GA)*2" -> "GAGA"); ValueError names the bad spot."""
    if not isinstance(pattern, str):
        raise ValueError(f"layer_pattern must be a string, got {type(pattern).__name__}")
    text = "".join(pattern.split())
    pos = 0

    def fail(message):
        raise ValueError(f"layer_pattern {pattern!r}: {message} at position {pos} of {text!r}; "
                         f"valid blocks: " + ", ".join(f"{k} ({v})" for k, v in BLOCK_DESCRIPTIONS.items()))

    def parse_sequence(closing):
        nonlocal pos
        out = []
        while pos < len(text) and text[pos] != closing:
            out.append(parse_term())
        if closing and pos >= len(text):
            fail("missing ')'")
        if not out:
            fail("empty group" if closing else "empty pattern")
        return "".join(out)

    def parse_term():
        nonlocal pos
        char = text[pos]
        if char == ")":
            fail("unmatched ')'")
        if char in BLOCK_DESCRIPTIONS:
            pos += 1
            atom = char
        elif char == "(":
            pos += 1
            atom = parse_sequence(")")
            pos += 1
        else:
            fail(f"unknown block {char!r}")
        if pos < len(text) and text[pos] == "*":
            pos += 1
            start = pos
            while pos < len(text) and text[pos].isdigit():
                pos += 1
            if start == pos or int(text[start:pos]) < 1:
                fail("'*' must be followed by a positive integer")
            atom *= int(text[start:pos])
        return atom

    layers = parse_sequence(None)
    if pos != len(text):
        fail("unmatched ')'")
    return layers


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of one model. `None` fields resolve in __post_init__ (num_v_heads -> num_heads,
    low-rank dims -> head_v_dim, swa_num_kv_groups -> swa_num_heads)."""

    name: str
    layer_pattern: str
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int  # GDN-2 key heads H
    head_k_dim: int = 128
    head_v_dim: int = 128
    num_v_heads: int | None = None  # H_v, a multiple of H (grouped value heads)
    decay_low_rank_dim: int | None = None  # rank of W_f2 W_f1
    gate_low_rank_dim: int | None = None  # rank of W_g2 W_g1
    conv_kernel: int = 4
    allow_neg_eigval: bool = False  # erase gate b in [0, 2] instead of [0, 1]
    swa_num_heads: int = 0
    swa_num_kv_groups: int | None = None
    swa_head_dim: int = 128
    swa_window: int = 2048  # tokens each query sees, itself included
    vocab_size: int = 32000
    seq_length: int = 4096
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    init_method_std: float = 0.02  # embeddings, MLP and SWA (the GDN-2 mixer has its own init)
    published_params: int | None = None  # the paper's figure (see the module docstring)

    def __post_init__(self):
        for field, default in (("num_v_heads", self.num_heads), ("decay_low_rank_dim", self.head_v_dim),
                               ("gate_low_rank_dim", self.head_v_dim),
                               ("swa_num_kv_groups", self.swa_num_heads)):
            if getattr(self, field) is None:
                object.__setattr__(self, field, default)
        for field in ("hidden_size", "ffn_hidden_size", "num_heads", "head_k_dim", "head_v_dim",
                      "num_v_heads", "decay_low_rank_dim", "gate_low_rank_dim", "conv_kernel",
                      "vocab_size", "seq_length"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{self.name}: {field} must be a positive integer, got {value!r}")
        if self.num_v_heads % self.num_heads:
            raise ValueError(f"{self.name}: num_v_heads={self.num_v_heads} must be a multiple of "
                             f"num_heads={self.num_heads} (grouped value heads)")
        layers = expand_layer_pattern(self.layer_pattern)
        if SWA_BLOCK in layers:
            for field in ("swa_num_heads", "swa_num_kv_groups", "swa_head_dim", "swa_window"):
                value = getattr(self, field)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{self.name}: {field} must be a positive integer for a pattern "
                                     f"with SWA layers, got {value!r}")
            if self.swa_num_heads % self.swa_num_kv_groups:
                raise ValueError(f"{self.name}: swa_num_heads={self.swa_num_heads} must be a multiple of "
                                 f"swa_num_kv_groups={self.swa_num_kv_groups}")
            if self.swa_window > self.seq_length:
                raise ValueError(f"{self.name}: swa_window={self.swa_window} is larger than "
                                 f"seq_length={self.seq_length}")

    @property
    def layers(self) -> str:
        """One letter per layer, e.g. "GAGA"."""
        return expand_layer_pattern(self.layer_pattern)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def family(self) -> str:
        """"recurrent" (only G), "hybrid" (G and A alternating, starting with G) or "custom"."""
        layers = self.layers
        if set(layers) == {GDN2_BLOCK}:
            return "recurrent"
        if len(layers) % 2 == 0 and layers == (GDN2_BLOCK + SWA_BLOCK) * (len(layers) // 2):
            return "hybrid"
        return "custom"


@dataclass(frozen=True)
class ParameterCount:
    embedding: int
    output_layer: int  # 0 with tied embeddings
    blocks: int  # all layers: what the paper reports
    final_norm: int

    @property
    def total(self) -> int:
        return self.embedding + self.output_layer + self.blocks + self.final_norm

    @property
    def non_embedding(self) -> int:
        return self.blocks + self.final_norm


def gdn2_mixer_parameters(cfg: ModelConfig) -> int:
    key_dim, value_dim = cfg.num_heads * cfg.head_k_dim, cfg.num_v_heads * cfg.head_v_dim
    d = cfg.hidden_size
    return (
        d * (3 * key_dim + 2 * value_dim)  # q, k, v, erase b, write w projections
        + (2 * key_dim + value_dim) * cfg.conv_kernel  # depthwise conv on q, k, v
        + cfg.decay_low_rank_dim * (d + key_dim)  # W_f1, W_f2
        + cfg.num_heads + key_dim  # A_log, dt_bias
        + cfg.gate_low_rank_dim * (d + value_dim) + value_dim  # W_g1, W_g2 and its bias
        + cfg.head_v_dim  # per-head RMSNorm weight, shared by the heads
        + value_dim * d  # output projection
    )


def swa_parameters(cfg: ModelConfig) -> int:
    d, head = cfg.hidden_size, cfg.swa_head_dim
    return d * (cfg.swa_num_heads + 2 * cfg.swa_num_kv_groups) * head + cfg.swa_num_heads * head * d


def layer_parameters(cfg: ModelConfig, block: str) -> int:
    """One TransformerLayer: two RMSNorms, the mixer, the SwiGLU MLP."""
    mixer = {GDN2_BLOCK: gdn2_mixer_parameters, SWA_BLOCK: swa_parameters}[block](cfg)
    return 2 * cfg.hidden_size + mixer + 3 * cfg.hidden_size * cfg.ffn_hidden_size


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    embedding = cfg.vocab_size * cfg.hidden_size
    return ParameterCount(
        embedding=embedding,
        output_layer=0 if cfg.tie_embeddings else embedding,
        blocks=sum(layer_parameters(cfg, block) for block in cfg.layers),
        final_norm=cfg.hidden_size,
    )


def _registry(*configs: ModelConfig) -> dict[str, ModelConfig]:
    return {cfg.name: cfg for cfg in configs}


MODEL_CONFIGS: dict[str, ModelConfig] = _registry(
    # Tests: every code path at toy size. gdn2_tiny has grouped value heads (2 key heads, 4 value
    # heads); swa_gdn2_tiny has the negative-eigenvalue gate and grouped-query SWA with a window
    # shorter than the sequence.
    ModelConfig(name="gdn2_tiny", layer_pattern="G*4", hidden_size=32, ffn_hidden_size=64,
                num_heads=2, num_v_heads=4, head_k_dim=8, head_v_dim=8, decay_low_rank_dim=4,
                gate_low_rank_dim=6, vocab_size=128, seq_length=32),
    ModelConfig(name="swa_gdn2_tiny", layer_pattern="(GA)*2", hidden_size=32, ffn_hidden_size=64,
                num_heads=4, head_k_dim=8, head_v_dim=8, allow_neg_eigval=True, swa_num_heads=4,
                swa_num_kv_groups=2, swa_head_dim=8, swa_window=8, vocab_size=128, seq_length=32),
    ModelConfig(name="gdn2_370M", layer_pattern="G*24", hidden_size=1024, ffn_hidden_size=2816,
                num_heads=8),
    ModelConfig(name="swa_gdn2_370M", layer_pattern="(GA)*12", hidden_size=1024, ffn_hidden_size=3200,
                num_heads=8, swa_num_heads=8),
    # The paper's models (design doc section 6).
    ModelConfig(name="gdn2_1.3B", layer_pattern="G*18", hidden_size=2304, ffn_hidden_size=6208,
                num_heads=16, published_params=1_302_638_112),
    ModelConfig(name="swa_gdn2_1.3B", layer_pattern="(GA)*9", hidden_size=2304, ffn_hidden_size=6784,
                num_heads=16, swa_num_heads=18, published_params=1_300_314_384),
    # Scaling configs, d_k = d_v = 128 throughout.
    ModelConfig(name="gdn2_2.7B", layer_pattern="G*32", hidden_size=2560, ffn_hidden_size=5696,
                num_heads=20),
    ModelConfig(name="swa_gdn2_2.7B", layer_pattern="(GA)*16", hidden_size=2560, ffn_hidden_size=6656,
                num_heads=20, swa_num_heads=20),
    ModelConfig(name="gdn2_7B", layer_pattern="G*32", hidden_size=4096, ffn_hidden_size=9408,
                num_heads=32),
    ModelConfig(name="swa_gdn2_7B", layer_pattern="(GA)*16", hidden_size=4096, ffn_hidden_size=10880,
                num_heads=32, swa_num_heads=32),
    ModelConfig(name="gdn2_14B", layer_pattern="G*40", hidden_size=5120, ffn_hidden_size=12352,
                num_heads=40),
    ModelConfig(name="swa_gdn2_14B", layer_pattern="(GA)*20", hidden_size=5120, ffn_hidden_size=14144,
                num_heads=40, swa_num_heads=40),
)


def get_model_config(name: str, **overrides) -> ModelConfig:
    """The registered config `name`, with fields replaced by `overrides` (validated again)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; valid names: {', '.join(MODEL_CONFIGS)}")
    cfg = MODEL_CONFIGS[name]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def format_table() -> str:
    header = f"{'name':<16}{'family':<11}{'layers':>7}{'d_model':>9}{'blocks':>17}{'total':>17}  published"
    rows = [header, "-" * len(header)]
    for cfg in MODEL_CONFIGS.values():
        count = count_parameters(cfg)
        published = f"{cfg.published_params:,}" if cfg.published_params else "-"
        rows.append(f"{cfg.name:<16}{cfg.family:<11}{cfg.num_layers:>7}{cfg.hidden_size:>9}"
                    f"{count.blocks:>17,}{count.total:>17,}  {published}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(format_table())
    print("\nblocks: parameters of all layers (the paper's convention); total: with embedding, "
          "untied output layer and final norm.")
