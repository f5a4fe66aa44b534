"""Learning-rate schedule in tokens, weight-decay groups, the FLOPs formula and the log line."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_gdn2.configs import (
    GDN2_BLOCK,
    SWA_BLOCK,
    count_parameters,
    gdn2_mixer_parameters,
    get_model_config,
    swa_parameters,
)
from megatron_gdn2.training.config import PretrainConfig
from megatron_gdn2.training.flops import (
    forward_flops_per_token,
    layer_forward_flops,
    mean_attended_keys,
    peak_tflops,
    training_flops_per_token,
)
from megatron_gdn2.training.metrics import ProgressMeter, format_duration
from megatron_gdn2.training.optimizer import build_scheduler, uses_weight_decay
from tests.harness import run_distributed


def test_recipe_schedule_is_in_tokens():
    """Paper recipe: peak 4e-4, 1B warm-up tokens, cosine to 10% at 100B tokens, wd 0.1."""
    cfg = PretrainConfig(seq_length=4096, global_batch_size=128, train_tokens=100_000_000_000)
    assert cfg.tokens_per_step == 524_288
    params = [torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1], "wd_mult": 1.0}, {"params": params[1:], "wd_mult": 0.0}])
    sched = build_scheduler(cfg, opt)
    peak, floor, warmup, total = 4e-4, 4e-5, 1_000_000_000, cfg.lr_decay_tokens

    def at(tokens):
        sched.step(increment=tokens - sched.num_steps)
        return opt.param_groups[0]["lr"]

    assert at(0) == 0.0
    assert at(warmup // 2) == pytest.approx(peak / 2)
    assert at(warmup) == pytest.approx(peak)
    halfway = warmup + (total - warmup) // 2
    assert at(halfway) == pytest.approx(floor + (peak - floor) * 0.5, rel=1e-6)
    quarter = warmup + (total - warmup) // 4
    assert at(quarter) == pytest.approx(floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4)), rel=1e-6)
    assert at(total) == pytest.approx(floor)
    assert at(total + 10**9) == pytest.approx(floor)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("name,shape,decays", [
    ("decoder.layers.0.self_attention.in_proj.weight", (80, 32), True),
    ("decoder.layers.0.self_attention.conv_weight", (48, 4), True),
    ("decoder.layers.1.self_attention.linear_qkv.weight", (64, 32), True),
    ("embedding.word_embeddings.weight", (128, 32), True),
    ("decoder.layers.0.self_attention.A_log", (4,), False),
    ("decoder.layers.0.self_attention.dt_bias", (32,), False),
    ("decoder.layers.0.self_attention.gate_proj.up_bias", (32,), False),
    ("decoder.layers.0.self_attention.out_norm.weight", (8,), False),
    ("decoder.layers.0.input_layernorm.weight", (32,), False),
    ("decoder.final_layernorm.weight", (32,), False),
    ("decoder.layers.0.mlp.linear_fc1.bias", (128,), False),
])
def test_weight_decay_predicate(name, shape, decays):
    assert uses_weight_decay("module." + name, torch.empty(shape)) is decays


def optimizer_groups(cfg_dict: dict) -> dict:
    from megatron_gdn2.configs import get_model_config
    from megatron_gdn2.training.config import PretrainConfig
    from megatron_gdn2.training.model_setup import build_model_bundle
    from megatron_gdn2.training.optimizer import build_optimizer

    cfg = PretrainConfig.from_dict(cfg_dict)
    bundle = build_model_bundle(cfg, get_model_config(cfg.model, vocab_size=256), bf16=False)
    optimizer = build_optimizer(cfg, [bundle.model], bf16=False)
    name_of = {p: n for n, p in bundle.model.named_parameters()}
    groups = {"decay": [], "no_decay": []}
    for group in optimizer.param_groups:
        key = "decay" if group["wd_mult"] == 1.0 else "no_decay"
        groups[key] += [name_of[p] for p in group["params"]]
    return groups


def test_weight_decay_groups_of_the_real_model():
    cfg = PretrainConfig(model="swa_gdn2_tiny", seq_length=32, global_batch_size=2, train_iters=2)
    (groups,) = run_distributed(optimizer_groups, world_size=1, args=(cfg.to_dict(),))
    no_decay = groups["no_decay"]
    for suffix in ("A_log", "dt_bias", "gate_proj.up_bias", "out_norm.weight", "input_layernorm.weight",
                   "pre_mlp_layernorm.weight", "final_layernorm.weight"):
        assert any(n.endswith(suffix) for n in no_decay), suffix
    assert all(n.endswith(("bias", "A_log")) or "norm" in n for n in no_decay), no_decay
    for suffix in ("in_proj.weight", "out_proj.weight", "linear_qkv.weight", "linear_fc1.weight",
                   "word_embeddings.weight", "output_layer.weight"):
        assert any(n.endswith(suffix) for n in groups["decay"]), suffix
    assert not set(groups["decay"]) & set(no_decay)


def test_flops_dense_part_is_twice_the_matmul_weights():
    """Cross-check against the independently written parameter counts of megatron_gdn2.configs:
    projections + MLP = 2 FLOPs per matmul weight per token."""
    cfg = get_model_config("swa_gdn2_1.3B")
    key_dim, value_dim = cfg.num_heads * cfg.head_k_dim, cfg.num_v_heads * cfg.head_v_dim
    not_matmul = ((2 * key_dim + value_dim) * cfg.conv_kernel + cfg.num_heads + key_dim + value_dim
                  + cfg.head_v_dim)
    mlp = 3 * cfg.hidden_size * cfg.ffn_hidden_size
    c, dk, dv = 64, cfg.head_k_dim, cfg.head_v_dim
    recurrence = 2 * cfg.num_v_heads * (c * (3 * dk + 2 * dv) + c * c / 6 + 3 * dk * dv)
    conv = 2 * cfg.conv_kernel * (2 * key_dim + value_dim)
    assert layer_forward_flops(cfg, GDN2_BLOCK) == pytest.approx(
        2 * (gdn2_mixer_parameters(cfg) - not_matmul + mlp) + recurrence + conv)
    attention = 4 * cfg.swa_num_heads * cfg.swa_head_dim * mean_attended_keys(cfg.seq_length, cfg.swa_window)
    assert layer_forward_flops(cfg, SWA_BLOCK) == pytest.approx(2 * (swa_parameters(cfg) + mlp) + attention)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    assert forward_flops_per_token(cfg) == pytest.approx(
        9 * (layer_forward_flops(cfg, GDN2_BLOCK) + layer_forward_flops(cfg, SWA_BLOCK)) + head)
    # the familiar 6N rule: within a few % of it, attention and recurrence on top
    n = count_parameters(cfg).non_embedding + count_parameters(cfg).output_layer
    assert 6 * n < training_flops_per_token(cfg) < 6 * n * 1.15


@pytest.mark.parametrize("seq,window", [(1, 1), (10, 3), (64, 8), (4096, 2048), (100, 500)])
def test_mean_attended_keys(seq, window):
    brute_force = sum(min(t, window) for t in range(1, seq + 1)) / seq
    assert mean_attended_keys(seq, window) == pytest.approx(brute_force)


def test_log_line_fields_and_rates():
    meter = ProgressMeter(total_iters=100, tokens_per_step=1000, flops_per_token=6e9, world_size=2,
                          peak_tflops=100.0)
    for _ in range(4):
        meter.record(0.5, loss=2.0, grad_norm=0.25)
    stats = meter.summarize(iteration=40, consumed_tokens=40_000, lr=3e-4, skipped=1)
    assert stats.tokens_per_s == pytest.approx(2000)
    assert stats.tflops_per_device == pytest.approx(2000 * 6e9 / 2 / 1e12)
    assert stats.mfu == pytest.approx(0.06)
    assert stats.eta_s == pytest.approx(30)
    line = stats.line()
    for part in ("iter 40/100", "loss 2.0000", "lr 3.000e-04", "grad norm 0.250", "2K tok/s",
                 "6.00 TFLOP/s/dev", "MFU 6.0%", "mem ", "skipped 1", "ETA 0m30s"):
        assert part in line, (part, line)
    assert format_duration(3 * 86400 + 7200) == "3d02h" and format_duration(3725) == "1h02m"


def test_peak_flops():
    assert peak_tflops(123.0) == 123.0
    if not torch.cuda.is_available():
        assert peak_tflops() is None
