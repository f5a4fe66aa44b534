"""Hugging Face transformers model of Gated DeltaNet-2 language models (recurrent and hybrid).

Plain PyTorch. This file travels inside every exported model directory next to
`configuration_gdn2.py` and imports nothing else from this project: an exported model runs where only
torch and transformers are installed. When the `gdn2_kernels` package is importable its chunked
kernel runs prefill and its recurrent kernel runs decoding; otherwise the token-wise recurrence below
does both.

A layer is pre-norm residual: x + mixer(norm(x)), then x + mlp(norm(x)). The mixer is GDN-2 or causal
sliding-window attention with RoPE (`config.layer_types`); the MLP is SwiGLU.

Generation keeps, per layer, only what the next token needs (`GDN2Cache`): the GDN-2 state and the
last `conv_size - 1` conv inputs, or the keys and values of the last `sliding_window - 1` tokens, so
every new token costs the same at any context length. Padding (left padding for batched generation)
is handled through `attention_mask`: a padded position leaves the GDN-2 state and the conv inputs
untouched and is never attended to.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_gdn2 import LINEAR_ATTENTION, GDN2Config

try:
    from gdn2_kernels import chunk_gdn2, fused_recurrent_gdn2
except ImportError:
    chunk_gdn2 = fused_recurrent_gdn2 = None

# transformers 5.24 renamed the generation cache from `past_key_values` to `cache`: outputs carry it
# under whichever name the installed version reads back.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} \
    else "past_key_values"
L2NORM_EPS = 1e-6
# Xavier-uniform gain of the GDN-2 paper's initialisation of linear layers.
LINEAR_INIT_GAIN = 2 ** -2.5


def kernels_available() -> bool:
    return chunk_gdn2 is not None


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def gated_delta_rule_2(q, k, v, g, b, w, initial_state=None):
    """GDN-2 one token at a time, in fp32.

    q, k, g, b: [B, T, H, K]; v, w: [B, T, H, V]; initial_state [B, H, K, V] or None. q and k are
    L2-normalised here. Per token: S <- (I - k (b*k)^T) Diag(exp(g)) S + k (w*v)^T, o = S^T q / sqrt(K).
    Returns (o in q's dtype, final state in fp32).
    """
    out_dtype = q.dtype
    q, k, v, g, b, w = (x.float() for x in (q, k, v, g, b, w))
    q = l2norm(q) * q.shape[-1] ** -0.5
    k = l2norm(k)
    batch, length, heads, key_dim = k.shape
    state = (q.new_zeros(batch, heads, key_dim, v.shape[-1]) if initial_state is None
             else initial_state.float())
    outputs = []
    for t in range(length):
        state = state * g[:, t].exp().unsqueeze(-1)
        read = torch.einsum("bhk,bhkv->bhv", b[:, t] * k[:, t], state)
        state = state + k[:, t].unsqueeze(-1) * (w[:, t] * v[:, t] - read).unsqueeze(-2)
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))
    return torch.stack(outputs, dim=1).to(out_dtype), state


def keep_last(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The last n entries of x along dim (all of them when there are fewer)."""
    size = x.shape[dim]
    return x.narrow(dim, max(size - n, 0), min(n, size))


class GDN2Cache:
    """What generation keeps between forward calls.

    GDN-2 layers: the recurrent state [B, H_v, d_k, d_v] (fp32) and, for each of q, k and v, the last
    `conv_size - 1` conv inputs [B, C, conv_size - 1]. Attention layers: keys and values (after RoPE)
    of the last `sliding_window - 1` tokens [B, H_kv, <= window - 1, D]. Shared: which of those cached
    tokens are real (not padding), each row's count of real tokens (its next RoPE position), and the
    number of tokens seen.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, config: GDN2Config):
        self.layer_types = list(config.layer_types)
        self.attention_keep = config.sliding_window - 1
        self.reset()

    def reset(self):
        n = len(self.layer_types)
        self.recurrent_states: list[torch.Tensor | None] = [None] * n
        self.conv_states: list[tuple[torch.Tensor, ...] | None] = [None] * n
        self.keys: list[torch.Tensor | None] = [None] * n
        self.values: list[torch.Tensor | None] = [None] * n
        self.key_is_real: torch.Tensor | None = None  # [B, cached tokens] bool
        self.real_tokens: torch.Tensor | None = None  # [B] long
        self.seen_tokens = 0

    @property
    def is_linear(self) -> list[bool]:
        return [t == LINEAR_ATTENTION for t in self.layer_types]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def update_attention(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
        """Appends this call's keys and values; returns cached + new ones, keeps the window's tail."""
        if self.keys[layer_idx] is not None:
            keys = torch.cat([self.keys[layer_idx], keys], dim=2)
            values = torch.cat([self.values[layer_idx], values], dim=2)
        self.keys[layer_idx] = keep_last(keys, self.attention_keep, dim=2)
        self.values[layer_idx] = keep_last(values, self.attention_keep, dim=2)
        return keys, values

    def numel(self) -> int:
        """Elements held: bounded by the window and the state sizes, whatever the context length."""
        stores = (self.recurrent_states, self.keys, self.values)
        held = [x for store in stores for x in store if x is not None]
        held += [x for tails in self.conv_states if tails is not None for x in tails]
        return sum(x.numel() for x in held)

    def _map(self, fn):
        for store in (self.recurrent_states, self.keys, self.values):
            for i, x in enumerate(store):
                if x is not None:
                    store[i] = fn(x)
        self.conv_states = [None if s is None else tuple(fn(x) for x in s) for s in self.conv_states]
        if self.key_is_real is not None:
            self.key_is_real = fn(self.key_is_real)
            self.real_tokens = fn(self.real_tokens)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map(lambda x: x.index_select(0, beam_idx.to(x.device)))

    def batch_select_indices(self, indices: torch.Tensor):
        self._map(lambda x: x[indices])

    def batch_repeat_interleave(self, repeats: int):
        self._map(lambda x: x.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("GDN2Cache cannot be rolled back: the GDN-2 state forgets its inputs")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def normalized_fp32(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalized_fp32(x).to(x.dtype)


class GatedRMSNorm(RMSNorm):
    """RMSNorm over the last axis (one weight shared by all heads) times silu(gate), all in fp32."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return (self.normalized_fp32(x) * F.silu(gate.float())).to(x.dtype)


class ShortConvolution(nn.Conv1d):
    """Depthwise causal convolution over time, followed by SiLU, on [B, T, C] inputs.

    `state` holds the last `kernel_size - 1` inputs of the previous call ([B, C, kernel_size - 1]);
    without it the sequence is zero-padded on the left.
    """

    def __init__(self, channels: int, kernel_size: int, bias: bool):
        super().__init__(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None):
        x = x.transpose(1, 2)
        if state is None:
            state = x.new_zeros(x.shape[0], x.shape[1], self.kernel_size[0] - 1)
        x = torch.cat([state.to(x.dtype), x], dim=-1)
        y = F.conv1d(x, self.weight, self.bias, groups=self.groups)
        return F.silu(y).transpose(1, 2), x[..., x.shape[-1] - state.shape[-1]:]


class GatedDeltaNet2(nn.Module):
    """The GDN-2 token mixer (design doc section 5)."""

    def __init__(self, config: GDN2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_v_heads = config.num_heads, config.num_v_heads
        self.head_k_dim, self.head_v_dim = config.head_k_dim, config.head_v_dim
        self.erase_scale = 2.0 if config.allow_neg_eigval else 1.0  # b in [0, 2]: negative eigenvalues
        self.use_gdn2_kernels = config.use_gdn2_kernels
        key_dim = self.num_heads * self.head_k_dim
        value_dim = self.num_v_heads * self.head_v_dim
        hidden = config.hidden_size

        self.q_proj = nn.Linear(hidden, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, value_dim, bias=False)
        self.q_conv1d = ShortConvolution(key_dim, config.conv_size, config.conv_bias)
        self.k_conv1d = ShortConvolution(key_dim, config.conv_size, config.conv_bias)
        self.v_conv1d = ShortConvolution(value_dim, config.conv_size, config.conv_bias)
        # Low-rank decay d_model -> r_f -> H * d_k; A_log per key head, dt_bias per key channel.
        self.f_a_proj = nn.Linear(hidden, config.decay_low_rank_dim, bias=False)
        self.f_b_proj = nn.Linear(config.decay_low_rank_dim, key_dim, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(key_dim))
        self.b_proj = nn.Linear(hidden, key_dim, bias=False)  # erase gate, key axis
        self.w_proj = nn.Linear(hidden, value_dim, bias=False)  # write gate, value axis
        # Low-rank output gate d_model -> r_g -> H_v * d_v, with bias.
        self.g_a_proj = nn.Linear(hidden, config.gate_low_rank_dim, bias=False)
        self.g_b_proj = nn.Linear(config.gate_low_rank_dim, value_dim, bias=True)
        self.o_norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden, bias=False)

    def forward(self, x, token_mask=None, cache: GDN2Cache | None = None, **_):
        batch, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if token_mask is not None:
            # Zeros at padded positions make the conv see exactly the left zero-padding of an
            # unpadded sequence.
            keep = token_mask.unsqueeze(-1)
            q, k, v = (torch.where(keep, t, 0.0) for t in (q, k, v))
        tails = cache.conv_states[self.layer_idx] if cache is not None else None
        tails = tails if tails is not None else (None, None, None)
        q, q_tail = self.q_conv1d(q, tails[0])
        k, k_tail = self.k_conv1d(k, tails[1])
        v, v_tail = self.v_conv1d(v, tails[2])

        log_decay_rate = self.f_b_proj(self.f_a_proj(x)).float() + self.dt_bias.float()
        g = -self.A_log.float().exp().repeat_interleave(self.head_k_dim) * F.softplus(log_decay_rate)
        b = (torch.sigmoid(self.b_proj(x).float()) * self.erase_scale).to(q.dtype)
        w = torch.sigmoid(self.w_proj(x).float()).to(q.dtype)
        if token_mask is not None:
            # k = 0 and g = 0 make a padded token leave the state exactly as it was.
            keep = token_mask.unsqueeze(-1)
            k = torch.where(keep, k, 0.0)
            g = torch.where(keep, g, 0.0)

        groups = self.num_v_heads // self.num_heads
        heads = (batch, length, self.num_heads, self.head_k_dim)
        q, k, g, b = (t.reshape(heads).repeat_interleave(groups, dim=2) for t in (q, k, g, b))
        v_heads = (batch, length, self.num_v_heads, self.head_v_dim)
        v, w = v.reshape(v_heads), w.reshape(v_heads)

        state = cache.recurrent_states[self.layer_idx] if cache is not None else None
        o, state = self.recurrence(q, k, v, g, b, w, state, want_state=cache is not None)
        if cache is not None:
            cache.recurrent_states[self.layer_idx] = state
            cache.conv_states[self.layer_idx] = (q_tail, k_tail, v_tail)

        gate = self.g_b_proj(self.g_a_proj(x)).reshape(v_heads)
        o = self.o_norm(o, gate)
        return self.o_proj(o.reshape(batch, length, -1))

    def recurrence(self, q, k, v, g, b, w, state, want_state):
        if not (self.use_gdn2_kernels and kernels_available()):
            return gated_delta_rule_2(q, k, v, g, b, w, state)
        # The recurrent kernel is the decoding path: one new token on top of a cached state.
        kernel = fused_recurrent_gdn2 if (state is not None and q.shape[1] == 1) else chunk_gdn2
        return kernel(q, k, v, g, b, w, initial_state=state, output_final_state=want_state,
                      use_qk_l2norm_in_kernel=True)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """RoPE on the first rotary_dim channels of x [B, H, T, D] (halves rotated, not interleaved)."""
    channels = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=x.device)
    inv_freq = 1.0 / theta ** (channels / rotary_dim)
    freqs = positions.float().unsqueeze(-1) * inv_freq  # [B, T, rotary_dim / 2]
    angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # [B, 1, T, rotary_dim]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = x_rot * angles.cos().to(x.dtype) + rotate_half(x_rot) * angles.sin().to(x.dtype)
    return torch.cat([x_rot, x_pass], dim=-1)


class SlidingWindowAttention(nn.Module):
    """Causal softmax attention over the last `sliding_window` tokens (the query's own included)."""

    def __init__(self, config: GDN2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.attention_head_dim
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        self.window = config.sliding_window
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x, positions, key_is_real=None, cache: GDN2Cache | None = None, **_):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, positions, self.rotary_dim, self.rope_theta)
        k = apply_rotary(k, positions, self.rotary_dim, self.rope_theta)
        if cache is not None:
            k, v = cache.update_attention(self.layer_idx, k, v)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

        # Query i (i = 0..T-1) and key j (j = -cached..T-1) in the coordinates of this call's tokens.
        cached = k.shape[2] - length
        query_pos = torch.arange(length, device=x.device).unsqueeze(-1)
        key_pos = torch.arange(-cached, length, device=x.device).unsqueeze(0)
        allowed = (key_pos <= query_pos) & (query_pos - key_pos < self.window)
        if key_is_real is not None:
            # A padded query attends to itself only, so that no row is empty (NaN-free).
            allowed = (allowed & key_is_real[:, None, None, :]) | (key_pos == query_pos)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class GDN2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: GDN2Config):
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GDN2DecoderLayer(nn.Module):
    def __init__(self, config: GDN2Config, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        mixer_class = GatedDeltaNet2 if self.layer_type == LINEAR_ATTENTION else SlidingWindowAttention
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = mixer_class(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GDN2MLP(config)

    def forward(self, x, **mixer_inputs):
        x = x + self.mixer(self.input_layernorm(x), **mixer_inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


class GDN2PreTrainedModel(PreTrainedModel):
    config_class = GDN2Config
    base_model_prefix = "model"
    _no_split_modules = ["GDN2DecoderLayer"]
    # The GDN-2 state cannot be rewound, which rules out assisted generation.
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        """Normal(0, initializer_range) for embeddings, MLP and attention; the GDN-2 paper's
        initialisation for the GDN-2 mixer (design doc section 5). transformers visits children before
        their parent, so the mixer re-initialises its own linears."""
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, ShortConvolution):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, GatedDeltaNet2):
            for linear in module.children():
                if isinstance(linear, nn.Linear):
                    init.xavier_uniform_(linear.weight, gain=LINEAR_INIT_GAIN)
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1, 16).log())
            # softplus(dt_bias) log-uniform in [1e-3, 1e-1]; dt_bias = softplus^-1(dt) = dt + log(1 - e^-dt).
            dt = torch.exp(torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))


class GDN2Model(GDN2PreTrainedModel):
    def __init__(self, config: GDN2Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GDN2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: GDN2Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: GDN2Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """attention_mask: [B, past + T] or [B, T], 1 for real tokens and 0 for padding."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("output_attentions is not supported: GDN-2 layers have no attention matrix")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = GDN2Cache(self.config)
        if not use_cache:
            cache = None
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]

        is_real = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != batch \
                    or attention_mask.shape[1] < length:
                raise ValueError(f"attention_mask must be [batch, >= {length}] (1 = token, 0 = padding), "
                                 f"got shape {tuple(attention_mask.shape)}")
            is_real = attention_mask[:, -length:].bool()
        token_mask = None if attention_mask is None or bool(is_real.all()) else is_real

        first_position = torch.zeros(batch, dtype=torch.long, device=x.device)
        key_is_real = is_real
        if cache is not None and cache.real_tokens is not None:
            first_position = cache.real_tokens
            key_is_real = torch.cat([cache.key_is_real, is_real], dim=1)
        if position_ids is None:
            position_ids = (first_position.unsqueeze(-1) + is_real.long().cumsum(-1) - 1).clamp(min=0)
        if bool(key_is_real.all()):
            key_is_real = None

        hidden_states = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, token_mask=token_mask, positions=position_ids, key_is_real=key_is_real, cache=cache)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states[-1] = x

        if cache is not None:
            all_keys_real = torch.cat([cache.key_is_real, is_real], 1) if cache.key_is_real is not None \
                else is_real
            cache.key_is_real = keep_last(all_keys_real, cache.attention_keep, dim=1)
            cache.real_tokens = first_position + is_real.long().sum(-1)
            cache.seen_tokens += length
        if hidden_states is not None:
            hidden_states = tuple(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden_states,
                                       **{CACHE_FIELD: cache})


class GDN2ForCausalLM(GDN2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GDN2Config):
        super().__init__(config)
        self.model = GDN2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: GDN2Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: GDN2Cache | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels: [B, T] token ids, -100 where no loss is wanted; the loss predicts token t+1 from t."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        output = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                        **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
        return output.to_tuple() if return_dict is False else output

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: int | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ):
        """Feeds only the tokens the cache has not seen. Positions come from the attention mask and the
        cache (see GDN2Model.forward), so generate's position_ids are not forwarded."""
        cache = kwargs.pop("cache", None)
        legacy_cache = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy_cache
        seen = cache.get_seq_length() if cache is not None else 0
        inputs = {}
        if inputs_embeds is not None and seen == 0:
            inputs["inputs_embeds"] = inputs_embeds if next_sequence_length is None \
                else inputs_embeds[:, -next_sequence_length:]
        elif next_sequence_length is not None:
            inputs["input_ids"] = input_ids[:, -next_sequence_length:]
        else:
            inputs["input_ids"] = input_ids[:, seen:]
        for unused in ("position_ids", "is_first_iteration", "cache_position", "token_type_ids"):
            kwargs.pop(unused, None)
        return {**kwargs, **inputs, "attention_mask": attention_mask, CACHE_FIELD: cache,
                "use_cache": use_cache}


__all__ = ["GDN2Cache", "GDN2ForCausalLM", "GDN2Model", "GDN2PreTrainedModel"]
