"""The GDN-2 mixer against layers computed independently here (token by token, fp64): the full
GDN-2 layer, and with tied gates the plain KDA and Gated DeltaNet layers; packed sequences; the
paper's initialisation; the blocked SDPA and FlexAttention SWA paths against Megatron's local
attention and full recomputation against none; parameter counts of the registry against
instantiated models.

Everything that needs Megatron's parallel state runs in one single-rank launch (module fixture).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from tests.harness import run_distributed
from tests.model.helpers import flex_backward_on_cpu

SEQ, BATCH = 24, 2
L2NORM_EPS = 1e-6  # the kernels' q/k normalisation: x / sqrt(sum(x^2) + 1e-6)


# ---- independent reference layers (fp64, no code shared with the mixer) -------------------------

def _conv_silu(x, weight):
    """x [b, t, c], weight [c, K]: y[t] = sum_i weight[:, i] x[t - K + 1 + i], zeros before t = 0."""
    kernel = weight.shape[1]
    padded = torch.cat([x.new_zeros(x.shape[0], kernel - 1, x.shape[2]), x], dim=1)
    y = sum(weight[:, i] * padded[:, i:i + x.shape[1]] for i in range(kernel))
    return y * torch.sigmoid(y)


def _unit(x):
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def _heads(x, n):
    return x.reshape(x.shape[0], x.shape[1], n, -1)


def _output(o, x, p, eps):
    """Per-head RMSNorm times silu(low-rank gate), then the output projection."""
    gate = _heads(x @ p["gate_proj.down_weight"].T @ p["gate_proj.up_weight"].T + p["gate_proj.up_bias"],
                  o.shape[2])
    normed = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + eps) * p["out_norm.weight"]
    y = (normed * gate * torch.sigmoid(gate)).flatten(2)
    return y @ p["out_proj.weight"].T


def _qkv(x, p, key_dim, value_dim, heads, v_heads):
    proj = x @ p["in_proj.weight"].T
    q, k, v = (_conv_silu(proj[..., lo:hi], p["conv_weight"][lo:hi]) for lo, hi in
               ((0, key_dim), (key_dim, 2 * key_dim), (2 * key_dim, 2 * key_dim + value_dim)))
    return _unit(_heads(q, heads)), _unit(_heads(k, heads)), _heads(v, v_heads), proj


def reference_gdn2_layer(x, p, shape, erase_scale, eps):
    """The design doc's layer with its recurrence S = Diag(a) S_prev; S += k (w v - S^T (b k))^T."""
    heads, v_heads, dk, dv = shape
    key_dim, value_dim = heads * dk, v_heads * dv
    q, k, v, proj = _qkv(x, p, key_dim, value_dim, heads, v_heads)
    b = erase_scale * torch.sigmoid(_heads(proj[..., 2 * key_dim + value_dim:3 * key_dim + value_dim], heads))
    w = torch.sigmoid(_heads(proj[..., 3 * key_dim + value_dim:], v_heads))
    decay_in = x @ p["decay_proj.down_weight"].T @ p["decay_proj.up_weight"].T + p["dt_bias"]
    g = -torch.exp(p["A_log"])[:, None] * _heads(F.softplus(decay_in), heads)
    group = v_heads // heads
    q, k, g, b = (t.repeat_interleave(group, dim=2) for t in (q, k, g, b))
    state = x.new_zeros(x.shape[0], v_heads, dk, dv)
    outs = []
    for t in range(x.shape[1]):
        state = state * torch.exp(g[:, t])[..., None]
        read = torch.einsum("bhk,bhkv->bhv", b[:, t] * k[:, t], state)
        state = state + k[:, t, ..., None] * (w[:, t] * v[:, t] - read)[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * dk ** -0.5, state))
    return _output(torch.stack(outs, 1), x, p, eps)


def reference_delta_rule_layer(x, p, shape, beta_rows, scalar_decay, eps):
    """Plain KDA (channel-wise decay) or Gated DeltaNet (scalar decay per head) with one learning
    rate beta per head: S = (I - beta k k^T) Diag(alpha) S_prev + beta k v^T."""
    heads, _, dk, dv = shape
    q, k, v, _ = _qkv(x, p, heads * dk, heads * dv, heads, heads)
    beta = torch.sigmoid(x @ beta_rows.T)  # [b, t, heads]
    decay_in = _heads(x @ p["decay_proj.down_weight"].T @ p["decay_proj.up_weight"].T + p["dt_bias"], heads)
    if scalar_decay:
        decay_in = decay_in[..., :1]  # the test made all channels of a head equal
    alpha = torch.exp(-torch.exp(p["A_log"])[:, None] * F.softplus(decay_in))
    eye = torch.eye(dk, dtype=x.dtype)
    state = x.new_zeros(x.shape[0], heads, dk, dv)
    outs = []
    for t in range(x.shape[1]):
        kt, bt = k[:, t], beta[:, t, :, None, None]
        decayed = alpha[:, t, :, :, None] * state
        erase = eye - bt * kt[..., :, None] * kt[..., None, :]
        state = erase @ decayed + bt * kt[..., :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * dk ** -0.5, state))
    return _output(torch.stack(outs, 1), x, p, eps)


# ---- work done inside the single-rank launch ----------------------------------------------------

def _mixer(model_cfg, **overrides):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_gdn2.models import make_transformer_config
    from megatron_gdn2.models.specs import gdn2_layer_spec

    config = make_transformer_config(model_cfg, kernel_backend="torch", **overrides)
    return build_module(gdn2_layer_spec(config).submodules.self_attention, config=config, layer_number=1)


def _randomise(mixer, seed):
    """Weights far from the small init, so every path of the layer moves the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in mixer.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if name == "A_log":
                param.copy_(torch.rand(param.shape, generator=gen) * math.log(16))
            elif name == "dt_bias":
                param.copy_(noise - 2)
            elif name == "out_norm.weight":
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.3 * noise)


def _params64(mixer):
    return {name: p.detach().double() for name, p in mixer.named_parameters()}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _mixer_checks(out):
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_gdn2.configs import ModelConfig

    gen = torch.Generator().manual_seed(3)
    # Full GDN-2: grouped value heads, negative eigenvalues, low-rank dims != d_v.
    cfg = ModelConfig(name="mixer", layer_pattern="G", hidden_size=32, ffn_hidden_size=32, num_heads=2,
                      num_v_heads=4, head_k_dim=8, head_v_dim=6, decay_low_rank_dim=5, gate_low_rank_dim=7,
                      allow_neg_eigval=True, vocab_size=64, seq_length=SEQ)
    mixer = _mixer(cfg)
    _randomise(mixer, 0)
    x = torch.randn(SEQ, BATCH, cfg.hidden_size, generator=gen)
    y, bias = mixer(x)
    expected = reference_gdn2_layer(x.double().transpose(0, 1), _params64(mixer), (2, 4, 8, 6), 2.0,
                                    cfg.norm_eps)
    out["gdn2_vs_reference"] = _rel(y.double().transpose(0, 1), expected)
    out["bias_is_none"] = bias is None

    # Packed sequences (one shorter than the conv kernel) equal separate runs.
    lengths = [2, 9, 13]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = torch.randn(sum(lengths), 1, cfg.hidden_size, generator=gen)
    y_packed, _ = mixer(packed, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=13, max_seqlen_kv=13))
    y_separate = torch.cat([mixer(chunk)[0] for chunk in packed.split(lengths)])
    out["packed_vs_separate"] = _rel(y_packed, y_separate)

    # KDA (b = w = beta, channel-wise decay) and Gated DeltaNet (also a scalar decay per head).
    plain = ModelConfig(name="plain", layer_pattern="G", hidden_size=32, ffn_hidden_size=32, num_heads=2,
                        head_k_dim=8, head_v_dim=8, vocab_size=64, seq_length=SEQ)
    heads, dk = 2, 8
    for variant in ("kda", "gdn"):
        mixer = _mixer(plain)
        _randomise(mixer, 1)
        beta_rows = 0.3 * torch.randn(heads, plain.hidden_size, generator=gen)
        with torch.no_grad():
            key_dim = heads * dk
            rows = beta_rows.repeat_interleave(dk, dim=0)
            mixer.in_proj.weight[3 * key_dim:4 * key_dim] = rows  # erase gate b
            mixer.in_proj.weight[4 * key_dim:] = rows  # write gate w (d_v = d_k here)
            if variant == "gdn":
                per_head = mixer.decay_proj.up_weight.view(heads, dk, -1)
                per_head.copy_(per_head[:, :1].expand_as(per_head))
                bias = mixer.dt_bias.view(heads, dk)
                bias.copy_(bias[:, :1].expand_as(bias))
        y, _ = mixer(x)
        expected = reference_delta_rule_layer(x.double().transpose(0, 1), _params64(mixer), (2, 2, 8, 8),
                                              beta_rows.double(), variant == "gdn", plain.norm_eps)
        out[f"{variant}_vs_reference"] = _rel(y.double().transpose(0, 1), expected)


def _init_checks(out):
    """The paper's initialisation, on a mixer of the 1.3B shapes."""
    from megatron_gdn2.configs import ModelConfig, get_model_config

    mixer = _mixer(get_model_config("gdn2_1.3B"))
    d, key_dim = 2304, 2048
    bound = 2**-2.5 * math.sqrt(6 / (d + key_dim))
    w = mixer.in_proj.weight.detach()
    out["in_proj_max_over_bound"] = w.abs().max().item() / bound
    out["in_proj_std_over_uniform_std"] = w.std().item() / (bound / math.sqrt(3))
    out["out_proj_max_over_bound"] = mixer.out_proj.weight.abs().max().item() / (
        2**-2.5 * math.sqrt(6 / (key_dim + d)))
    out["decay_down_max_over_bound"] = mixer.decay_proj.down_weight.abs().max().item() / (
        2**-2.5 * math.sqrt(6 / (d + 128)))
    dt = F.softplus(mixer.dt_bias.detach().double())
    out["dt_range"] = (dt.min().item(), dt.max().item())
    out["A_range"] = (mixer.A_log.exp().min().item(), mixer.A_log.exp().max().item())
    out["gate_bias_abs_max"] = mixer.gate_proj.up_bias.abs().max().item()
    out["out_norm_weight"] = (mixer.out_norm.weight.min().item(), mixer.out_norm.weight.max().item())
    out["conv_max"] = mixer.conv_weight.abs().max().item()
    out["no_weight_decay"] = sorted(n for n, p in mixer.named_parameters()
                                    if getattr(p, "_no_weight_decay", False))
    # With grouped value heads the roles of the fused in_proj have different fan-outs.
    grouped = _mixer(ModelConfig(name="grouped", layer_pattern="G", hidden_size=64, ffn_hidden_size=64,
                                 num_heads=2, num_v_heads=6, head_k_dim=16, head_v_dim=16, vocab_size=64,
                                 seq_length=SEQ))
    rows = grouped.in_proj.weight.detach().split([32, 32, 96, 32, 96])
    fan_outs = [32, 32, 96, 32, 96]
    out["role_max_over_bound"] = [block.abs().max().item() / (2**-2.5 * math.sqrt(6 / (64 + fan_out)))
                                  for block, fan_out in zip(rows, fan_outs)]


def _loss_and_grads(model_cfg, tokens, state, **config_kwargs):
    from megatron_gdn2.models import build_model, make_transformer_config

    model = build_model(model_cfg, make_transformer_config(model_cfg, **config_kwargs))
    model.load_state_dict(state if state is not None else model.state_dict())
    model.train()
    loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, model.state_dict()


def _model_path_checks(out):
    """Blocked SDPA and FlexAttention == Megatron's local attention (loss and every gradient), with
    a window that does not divide the sequence and with one that covers it (full causal attention);
    full activation recomputation changes nothing; a recurrent model on packed sequences gives the
    logits of the separate sequences."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from megatron_gdn2.configs import get_model_config
    from megatron_gdn2.models import build_model, make_transformer_config

    recurrent = get_model_config("gdn2_tiny")
    model = build_model(recurrent, make_transformer_config(recurrent))
    lengths = [3, 17, 12]
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, recurrent.vocab_size, (1, sum(lengths)), generator=gen)
    cu = torch.tensor([0, 3, 20, 32], dtype=torch.int32)
    packed = model(tokens, None, None, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=17, max_seqlen_kv=17))
    separate = torch.cat([model(chunk, None, None) for chunk in tokens.split(lengths, dim=1)], dim=1)
    out["model_packed_vs_separate"] = _rel(packed, separate)

    from megatron_gdn2.layers import swa

    fused_split = swa.split_rotary
    splits = []
    swa.split_rotary = lambda *args: splits.append(args[0].shape) or fused_split(*args)
    try:
        _windowed_model_checks(out)
    finally:
        swa.split_rotary = fused_split
    # every SWA layer's forward of the sdpa / flex models (and their recomputation) took our split
    out["fused_split_calls"] = len(splits)


def _windowed_model_checks(out):
    from megatron_gdn2.configs import get_model_config

    for window, variants in ((5, ("sdpa", "flex", "recompute", "selective")), (32, ("sdpa", "flex"))):
        model_cfg = get_model_config("swa_gdn2_tiny", swa_window=window)
        tokens = torch.randint(0, model_cfg.vocab_size, (BATCH, model_cfg.seq_length + 1),
                               generator=torch.Generator().manual_seed(5))
        loss, grads, state = _loss_and_grads(model_cfg, tokens, None, swa_attention_impl="local")
        for name in variants:
            # (the local attention's mask is allocated with device="cuda", which the CPU patches do
            # not rewrite inside a recomputing backward: recompute runs with the blocked SDPA path)
            kwargs = ({"swa_attention_impl": "sdpa", "recompute": name.replace("recompute", "full")}
                      if name in ("recompute", "selective") else {"swa_attention_impl": name})
            with flex_backward_on_cpu():
                other_loss, other_grads, _ = _loss_and_grads(model_cfg, tokens, state, **kwargs)
            key = name if window < model_cfg.seq_length else f"{name}_full"
            out[f"{key}_loss_diff"] = (other_loss - loss).abs().item()
            out[f"{key}_grad_rel_diff"] = max(_rel(other_grads[n], grads[n]) for n in grads)


def _count_checks(out):
    """count_parameters against instantiated models: the tiny configs, and one layer of each type at
    the 1.3B shapes (small vocabulary, no initialisation, to stay cheap)."""
    from megatron_gdn2.configs import count_parameters, get_model_config
    from megatron_gdn2.models import build_model, make_transformer_config

    cases = {name: get_model_config(name) for name in ("gdn2_tiny", "swa_gdn2_tiny")}
    cases["gdn2_1.3B/G"] = get_model_config("gdn2_1.3B", layer_pattern="G", vocab_size=256)
    cases["swa_gdn2_1.3B/GA"] = get_model_config("swa_gdn2_1.3B", layer_pattern="GA", vocab_size=256)
    for name, model_cfg in cases.items():
        config = make_transformer_config(model_cfg, perform_initialization=False)
        model = build_model(model_cfg, config)
        out[f"count/{name}"] = (sum(p.numel() for p in model.parameters()), count_parameters(model_cfg).total)
        del model


def layer_checks():
    torch.manual_seed(0)
    out = {}
    _mixer_checks(out)
    _init_checks(out)
    _model_path_checks(out)
    _count_checks(out)
    return out


@pytest.fixture(scope="module")
def checks():
    (out,) = run_distributed(layer_checks, world_size=1, timeout=600)
    return out


def test_mixer_matches_independent_gdn2_layer(checks):
    assert checks["bias_is_none"]
    assert checks["gdn2_vs_reference"] < 1e-5, checks["gdn2_vs_reference"]


@pytest.mark.parametrize("variant", ["kda", "gdn"])
def test_tied_gates_reproduce_plain_delta_rule_layers(checks, variant):
    assert checks[f"{variant}_vs_reference"] < 1e-5, checks[f"{variant}_vs_reference"]


@pytest.mark.parametrize("level", ["packed", "model_packed"])
def test_packed_sequences_equal_separate_sequences(checks, level):
    assert checks[f"{level}_vs_separate"] < 1e-6, checks[f"{level}_vs_separate"]


def test_paper_initialisation(checks):
    assert 0.99 < checks["in_proj_max_over_bound"] <= 1.0
    assert abs(checks["in_proj_std_over_uniform_std"] - 1) < 0.01
    assert 0.99 < checks["out_proj_max_over_bound"] <= 1.0
    assert 0.99 < checks["decay_down_max_over_bound"] <= 1.0
    low, high = checks["dt_range"]
    assert 1e-3 * 0.999 <= low < 1.1e-3 and 0.09 < high <= 0.1 * 1.001, checks["dt_range"]
    low, high = checks["A_range"]
    assert 1 <= low < high <= 16, checks["A_range"]
    assert checks["gate_bias_abs_max"] == 0
    assert checks["out_norm_weight"] == (1.0, 1.0)
    assert 0.49 < checks["conv_max"] <= 0.5
    assert checks["no_weight_decay"] == ["A_log", "dt_bias"]
    assert all(0.97 < r <= 1.0 for r in checks["role_max_over_bound"]), checks["role_max_over_bound"]


@pytest.mark.parametrize("variant", ["sdpa", "flex", "recompute", "selective", "sdpa_full", "flex_full"])
def test_sdpa_flex_attention_and_recompute_match_local_path(checks, variant):
    assert checks[f"{variant}_loss_diff"] < 1e-6, checks[f"{variant}_loss_diff"]
    assert checks[f"{variant}_grad_rel_diff"] < 1e-5, checks[f"{variant}_grad_rel_diff"]


def test_swa_layers_split_the_projection_with_rope_themselves(checks):
    """RotaryInCoreSelfAttention's one-function split (query/key/value, RoPE, layout) ran in both
    SWA layers of each of the six sdpa / flex / recompute models above, and once more in each
    where full recomputation reruns the forward; the equality checks above are of that path."""
    assert checks["fused_split_calls"] == 6 * 2 + 2, checks["fused_split_calls"]


@pytest.mark.parametrize("case", ["gdn2_tiny", "swa_gdn2_tiny", "gdn2_1.3B/G", "swa_gdn2_1.3B/GA"])
def test_parameter_count_matches_instantiated_model(checks, case):
    instantiated, counted = checks[f"count/{case}"]
    assert instantiated == counted
