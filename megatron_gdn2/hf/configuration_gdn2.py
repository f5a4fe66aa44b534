"""Hugging Face configuration of Gated DeltaNet-2 language models (recurrent and hybrid).

This file travels inside every exported model directory next to `modeling_gdn2.py`; it imports
only transformers.
"""
from transformers import PretrainedConfig

LINEAR_ATTENTION = "linear_attention"  # a GDN-2 token mixer
SLIDING_ATTENTION = "sliding_attention"  # causal sliding-window softmax attention with RoPE
LAYER_TYPES = (LINEAR_ATTENTION, SLIDING_ATTENTION)


class GDN2Config(PretrainedConfig):
    """A stack of pre-norm residual layers, each one token mixer followed by a SwiGLU MLP.

    `layer_types[i]` names the mixer of layer i: "linear_attention" (GDN-2) or "sliding_attention".
    The recurrent family is all "linear_attention"; the hybrid family alternates the two.

    GDN-2 mixer: `num_heads` key heads of `head_k_dim`, `num_v_heads` value heads of `head_v_dim`
    (grouped value heads when num_v_heads > num_heads), depthwise causal conv of `conv_size`,
    low-rank decay and output gate of ranks `decay_low_rank_dim` and `gate_low_rank_dim` (default
    head_v_dim), erase gate in [0, 2] when `allow_neg_eigval`. All RMSNorms (the per-head one of the
    GDN-2 output included) use `rms_norm_eps`. Sliding-window attention: `num_attention_heads` query heads and
    `num_key_value_heads` key/value heads of `attention_head_dim`; a query attends to itself and
    the `sliding_window - 1` tokens before it.

    `use_gdn2_kernels`: run the GDN-2 recurrence with the `gdn2_kernels` package when it is
    importable (Triton on GPU, its chunked PyTorch backend on CPU); False always uses the plain
    PyTorch recurrence of modeling_gdn2.py.
    """

    model_type = "gdn2"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 2304,
        intermediate_size: int = 6208,
        num_hidden_layers: int = 18,
        layer_types: list[str] | None = None,
        num_heads: int = 16,
        num_v_heads: int | None = None,
        head_k_dim: int = 128,
        head_v_dim: int = 128,
        decay_low_rank_dim: int | None = None,
        gate_low_rank_dim: int | None = None,
        conv_size: int = 4,
        conv_bias: bool = False,
        allow_neg_eigval: bool = False,
        num_attention_heads: int = 18,
        num_key_value_heads: int | None = None,
        attention_head_dim: int = 128,
        attention_bias: bool = False,
        sliding_window: int = 2048,
        rope_theta: float = 10000.0,
        rotary_dim: int | None = None,
        mlp_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        use_gdn2_kernels: bool = True,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        if layer_types is None:
            layer_types = [LINEAR_ATTENTION] * num_hidden_layers
        layer_types = list(layer_types)
        unknown = sorted({t for t in layer_types if t not in LAYER_TYPES})
        if unknown:
            raise ValueError(f"layer_types: unknown layer type(s) {unknown}; allowed: {list(LAYER_TYPES)}")
        if len(layer_types) != num_hidden_layers:
            raise ValueError(f"layer_types has {len(layer_types)} entries but num_hidden_layers is "
                             f"{num_hidden_layers}")
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        if num_v_heads % num_heads:
            raise ValueError(f"num_v_heads ({num_v_heads}) must be a multiple of num_heads ({num_heads})")
        num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_key_value_heads})")
        rotary_dim = attention_head_dim if rotary_dim is None else rotary_dim
        if rotary_dim % 2 or not 0 < rotary_dim <= attention_head_dim:
            raise ValueError(f"rotary_dim ({rotary_dim}) must be even and in (0, attention_head_dim="
                             f"{attention_head_dim}]")
        if sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        if conv_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {conv_size}")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.layer_types = layer_types
        self.num_heads = num_heads
        self.num_v_heads = num_v_heads
        self.head_k_dim = head_k_dim
        self.head_v_dim = head_v_dim
        self.decay_low_rank_dim = head_v_dim if decay_low_rank_dim is None else decay_low_rank_dim
        self.gate_low_rank_dim = head_v_dim if gate_low_rank_dim is None else gate_low_rank_dim
        self.conv_size = conv_size
        self.conv_bias = conv_bias
        self.allow_neg_eigval = allow_neg_eigval
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.attention_head_dim = attention_head_dim
        self.attention_bias = attention_bias
        self.sliding_window = sliding_window
        self.rope_theta = rope_theta
        self.rotary_dim = rotary_dim
        self.mlp_bias = mlp_bias
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.use_gdn2_kernels = use_gdn2_kernels
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
