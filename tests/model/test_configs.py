"""The config registry: the paper's parameter counts, the layer-pattern grammar, and bad input that
must fail at construction with a message naming the problem. (Counts against instantiated models:
test_gdn2_layers.py.)"""
import re
import subprocess
import sys

import pytest
import torch

from megatron_gdn2.configs import (
    MODEL_CONFIGS,
    ModelConfig,
    count_parameters,
    expand_layer_pattern,
    get_model_config,
)


@pytest.mark.parametrize("name, published", [("gdn2_1.3B", 1_302_638_112), ("swa_gdn2_1.3B", 1_300_314_384)])
def test_paper_models_match_published_counts(name, published):
    cfg = get_model_config(name)
    assert cfg.vocab_size == 32000 and cfg.published_params == published
    # Exact: the counting convention (configs.py docstring) reproduces both figures to the parameter,
    # so a 1% band would hide a missing bias or norm weight.
    assert count_parameters(cfg).blocks == published


@pytest.mark.parametrize("name, target", [("gdn2_370M", 370e6), ("swa_gdn2_370M", 370e6),
                                          ("gdn2_2.7B", 2.7e9), ("swa_gdn2_2.7B", 2.7e9),
                                          ("gdn2_7B", 7e9), ("swa_gdn2_7B", 7e9),
                                          ("gdn2_14B", 14e9), ("swa_gdn2_14B", 14e9)])
def test_named_configs_are_their_size(name, target):
    cfg = get_model_config(name)
    assert abs(count_parameters(cfg).blocks - target) / target < 0.01
    if "7B" in name or "14B" in name or "2.7B" in name:
        assert cfg.head_k_dim == cfg.head_v_dim == 128


def test_families():
    assert get_model_config("gdn2_1.3B").layers == "G" * 18
    assert get_model_config("swa_gdn2_1.3B").layers == "GA" * 9
    assert {cfg.family for cfg in MODEL_CONFIGS.values()} == {"recurrent", "hybrid"}
    assert get_model_config("swa_gdn2_tiny", layer_pattern="(GGGA)*2").family == "custom"


@pytest.mark.parametrize("pattern, layers", [("G*3", "GGG"), ("(GA)*2", "GAGA"), ("(GGGA)*2 G", "GGGAGGGAG"),
                                             ("G(A*2G)*2", "GAAGAAG")])
def test_layer_pattern_grammar(pattern, layers):
    assert expand_layer_pattern(pattern) == layers


@pytest.mark.parametrize("pattern, message", [
    ("GXA", "unknown block 'X' at position 1"), ("(GA", "missing ')'"), ("GA)", "unmatched ')'"),
    ("G*0", "positive integer"), ("", "empty pattern"), ("()", "empty group")])
def test_bad_layer_pattern_fails_at_construction(pattern, message):
    with pytest.raises(ValueError, match=r"layer_pattern .*" + re.escape(message)):
        get_model_config("gdn2_tiny", layer_pattern=pattern)


def test_unknown_config_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model config 'gdn2_13B'; valid names: gdn2_tiny, "):
        get_model_config("gdn2_13B")


def test_window_larger_than_sequence_fails():
    with pytest.raises(ValueError, match="swa_window=64 is larger than seq_length=32"):
        get_model_config("swa_gdn2_tiny", swa_window=64)


def test_grouped_value_heads_must_divide():
    with pytest.raises(ValueError, match="num_v_heads=3 must be a multiple of num_heads=2"):
        ModelConfig(name="bad", layer_pattern="G", hidden_size=8, ffn_hidden_size=8, num_heads=2,
                    num_v_heads=3)


def test_heads_not_divisible_by_tensor_parallel_size():
    from megatron_gdn2.models import make_transformer_config

    with pytest.raises(ValueError, match="num_heads=2 is not divisible by tensor_model_parallel_size=4"):
        make_transformer_config(get_model_config("gdn2_tiny"), tensor_model_parallel_size=4)
    with pytest.raises(ValueError, match="swa_num_kv_groups=2 is not divisible by tensor_model_parallel"):
        make_transformer_config(get_model_config("swa_gdn2_tiny"), tensor_model_parallel_size=4)
    # The config class itself checks too, when built around make_transformer_config.
    with pytest.raises(ValueError, match="gdn2_num_heads=3 is not divisible by tensor_model_parallel_size=2"):
        make_transformer_config(get_model_config("gdn2_tiny", num_heads=4, num_v_heads=4),
                                tensor_model_parallel_size=2, gdn2_num_heads=3, gdn2_num_v_heads=3)


def test_bad_recompute_attention_and_kernel_choice():
    from megatron_gdn2.models import make_transformer_config

    with pytest.raises(ValueError, match="recompute must be one of"):
        make_transformer_config(get_model_config("gdn2_tiny"), recompute="some")
    with pytest.raises(ValueError, match="swa_attention_impl must be one of"):
        make_transformer_config(get_model_config("swa_gdn2_tiny"), swa_attention_impl="flash2")
    with pytest.raises(ValueError, match="gdn2_kernel_backend must be one of"):
        make_transformer_config(get_model_config("gdn2_tiny"), kernel_backend="cuda")


def test_cli_lists_every_config_with_counts():
    out = subprocess.run([sys.executable, "-m", "megatron_gdn2.configs"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    for name, cfg in MODEL_CONFIGS.items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert f"{count_parameters(cfg).blocks:,}" in line and f"{count_parameters(cfg).total:,}" in line
    assert "1,302,638,112" in out and "1,300,314,384" in out


def test_config_defaults_are_float32_local_on_cpu():
    from megatron_gdn2.models import make_transformer_config

    config = make_transformer_config(get_model_config("swa_gdn2_tiny"), recompute="full")
    assert config.params_dtype == torch.float32 and config.window_size == (7, 0)
    assert config.recompute_granularity == "full" and config.layer_pattern == "GAGA"
    if not torch.cuda.is_available():
        assert config.transformer_impl == "local"
