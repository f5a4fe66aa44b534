"""gdn2-convert on real training checkpoints (see conftest.py for how they are made)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_gdn2.convert.from_hf import import_from_hf
from megatron_gdn2.convert.mapping import ConversionError
from megatron_gdn2.convert.megatron_checkpoint import MegatronCheckpoint
from megatron_gdn2.convert.to_hf import export_to_hf
from megatron_gdn2.convert.tokenizer import hf_tokenizer
from tests.hf.conftest import FAMILIES, MISTRAL, SHARED_DATA, WIKITEXT, run_cli


def load_hf(directory: Path):
    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_logits_match_megatron(converted, name):
    model = load_hf(converted.hf_dir(name))
    assert type(model).__name__ == "GDN2ForCausalLM"
    with torch.no_grad():
        logits = model(converted.tokens).logits
    expected = converted.megatron_logits[name]
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-4


def test_hybrid_greedy_generation_with_cache_equals_recomputation(converted):
    model = load_hf(converted.hf_dir("swa_gdn2_tiny"))
    assert model.config.sliding_window < converted.tokens.shape[1]
    prompt = converted.tokens[:1]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        recomputed = model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                                    use_cache=False)
    assert cached.shape[1] == prompt.shape[1] + 64
    assert torch.equal(cached, recomputed)


def test_exported_tokenizer_and_generation_config(converted):
    directory = converted.hf_dir("gdn2_tiny")
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=True)
    ids = tokenizer(WIKITEXT.read_text()[:20000])["input_ids"]
    assert ids[:converted.tokens.numel()] == converted.tokens.flatten().tolist()
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == 2
    config = json.loads((directory / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gdn2.GDN2ForCausalLM"
    assert config["layer_types"] == ["linear_attention"] * 4


@pytest.mark.parametrize("name", FAMILIES)
def test_tp2_pp2_checkpoint_exports_the_same_files(converted, name):
    one, four = converted.hf_dir(name), converted.hf_dir(name, "_tp2pp2")
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in four.iterdir())
    for filename in files:
        assert (one / filename).read_bytes() == (four / filename).read_bytes(), filename


@pytest.mark.parametrize("name", FAMILIES)
def test_megatron_hf_megatron_is_bit_exact(converted, name):
    original = MegatronCheckpoint(converted.checkpoint(name))
    imported = MegatronCheckpoint(converted.checkpoint(name, "_imported"))
    model_keys = sorted(k for k in original.shapes if not k.startswith("optimizer."))
    assert model_keys == sorted(imported.shapes)
    # Read as the TP=1 tensors the keys hold (per role for the fused GDN-2 weights).
    import torch.distributed.checkpoint as dcp

    for key in model_keys:
        a, b = torch.empty(original.shapes[key]), torch.empty(imported.shapes[key])
        dcp.load({key: a}, checkpoint_id=str(original.path), no_dist=True)
        dcp.load({key: b}, checkpoint_id=str(imported.path), no_dist=True)
        assert torch.equal(a, b), key
    assert imported.common["model_config"] == original.common["model_config"]
    assert imported.common["layout"]["tensor_model_parallel_size"] == 2
    assert imported.common["weights_only"] is True


def test_imported_checkpoint_loads_at_tp2_pp2_through_the_training_loader(converted):
    assert len(converted.imported_check) == 4
    assert sorted(r["rank"] for r in converted.imported_check) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for result in converted.imported_check:
        assert result["mismatched"] == {name: [] for name in FAMILIES}, result


def _isolated_pythonpath(directory: Path) -> str:
    """A directory of links to torch, transformers and every distribution they require (their
    packages and metadata, and nothing else of this environment: not gdn2_kernels, megatron_gdn2 or
    Megatron)."""
    import importlib.metadata as md
    import re

    from packaging.requirements import Requirement

    def normal(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    site = Path(torch.__file__).resolve().parents[1]
    installed = {normal(d.metadata["Name"]): d for d in md.distributions(path=[str(site)])}
    needed, todo = set(), ["torch", "transformers"]
    while todo:
        name = normal(todo.pop())
        if name in needed or name not in installed:
            continue
        needed.add(name)
        for requirement in installed[name].requires or []:
            req = Requirement(requirement)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    forbidden = {"gdn2_kernels", "megatron_gdn2", "megatron", "kernels", "triton"}
    tops = set()
    for name in needed:
        for file in installed[name].files or []:
            top = file.parts[0]
            if top not in forbidden and top != "__pycache__" and not top.startswith(".."):
                tops.add(top)
    for top in tops:
        if (site / top).exists():
            (directory / top).symlink_to(site / top)
    return str(directory)


FRESH_ENV_SCRIPT = """
import sys, torch
try:
    import gdn2_kernels
except ImportError:
    pass
else:
    sys.exit("gdn2_kernels is importable in the isolated environment")
for forbidden in ("megatron_gdn2", "megatron"):
    try:
        __import__(forbidden)
    except ImportError:
        continue
    sys.exit(forbidden + " is importable in the isolated environment")
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
modeling = sys.modules[type(model).__module__]
assert not modeling.kernels_available()
tokens = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(tokens).logits
    generated = model.generate(tokens[:1], max_new_tokens=12, do_sample=False)
torch.save({"logits": logits, "generated": generated}, sys.argv[3])
"""


def test_exported_model_runs_with_only_torch_and_transformers(converted, tmp_path):
    name = "swa_gdn2_tiny"  # GDN-2 and sliding-window layers
    links = tmp_path / "site"
    links.mkdir()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": _isolated_pythonpath(links),
           "HF_HOME": str(tmp_path / "hf_home"), "TORCHDYNAMO_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    torch.save(converted.tokens, tmp_path / "tokens.pt")
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_ENV_SCRIPT)
    result = subprocess.run([sys.executable, "-S", "-s", str(script), str(converted.hf_dir(name)),
                             str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    isolated = torch.load(tmp_path / "out.pt")

    model = load_hf(converted.hf_dir(name))
    assert type(model).__module__ != "megatron_gdn2.hf.modeling_gdn2"
    modeling = sys.modules[type(model).__module__]
    assert modeling.kernels_available()
    with torch.no_grad():
        logits = model(converted.tokens).logits
        generated = model.generate(converted.tokens[:1], max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(isolated["logits"], logits, atol=1e-5, rtol=0)
    assert torch.equal(isolated["generated"], generated)


def test_to_hf_rejects_a_checkpoint_of_another_model(converted, tmp_path):
    checkpoint = converted.checkpoint("gdn2_tiny")
    missing = r"decoder\.layers\.1\.self_attention\.linear_qkv\.weight is missing"
    with pytest.raises(ConversionError, match=missing):
        export_to_hf(checkpoint, tmp_path / "out", tokenizer=MISTRAL, model="swa_gdn2_tiny")
    wrong_shape = r"embedding\.word_embeddings\.weight has shape \(32000, 32\), expected \(128, 32\)"
    with pytest.raises(ConversionError, match=wrong_shape):
        export_to_hf(checkpoint, tmp_path / "out", tokenizer=MISTRAL, model="gdn2_tiny")
    assert not (tmp_path / "out").exists()


def test_to_hf_rejects_a_missing_checkpoint_and_a_non_empty_output(converted, tmp_path):
    result = run_cli("to-hf", str(tmp_path / "nowhere"), str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and "nowhere does not exist" in result.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match="not empty"):
        export_to_hf(converted.checkpoint("gdn2_tiny"), tmp_path / "busy", tokenizer=MISTRAL)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"


def _copy_hf_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _edit_weights(directory: Path, edit) -> None:
    shard = directory / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_from_hf_names_a_mismatched_config(converted, tmp_path):
    hf = _copy_hf_dir(converted.hf_dir("swa_gdn2_tiny"), tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    config["num_heads"] = 2  # the tensors hold 4 GDN-2 heads
    (hf / "config.json").write_text(json.dumps(config))
    result = run_cli("from-hf", str(hf), str(tmp_path / "out"), check=False)
    assert result.returncode == 2
    assert "model.layers.0.mixer.A_log has shape (4,), expected (2,)" in result.stderr
    config["conv_bias"] = True
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="conv_bias=True"):
        import_from_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_hf_records_an_unregistered_architecture_as_model_overrides(converted):
    from megatron_gdn2.configs import get_model_config
    from megatron_gdn2.convert.mapping import hf_config_for, model_config_for
    from megatron_gdn2.hf import GDN2Config

    config = GDN2Config.from_pretrained(converted.hf_dir("swa_gdn2_tiny"))
    registered = get_model_config("swa_gdn2_tiny", vocab_size=32000, seq_length=40)
    assert model_config_for(config) == (registered, [])
    config.sliding_window, config.head_k_dim = 16, 4
    model_cfg, overrides = model_config_for(config)
    assert model_cfg.name == "swa_gdn2_tiny" and sorted(overrides) == ["head_k_dim=4", "swa_window=16"]
    back = hf_config_for(model_cfg)
    assert (back.sliding_window, back.head_k_dim, back.layer_types) == (16, 4, config.layer_types)


def test_from_hf_names_a_missing_tensor_and_a_wrong_shape(converted, tmp_path):
    from megatron_gdn2.convert.from_hf import HFWeights, check_hf_weights
    from megatron_gdn2.convert.mapping import model_config_for
    from megatron_gdn2.hf import GDN2Config

    hf = _copy_hf_dir(converted.hf_dir("gdn2_tiny"), tmp_path / "missing")
    model_cfg, _ = model_config_for(GDN2Config.from_pretrained(hf))
    _edit_weights(hf, lambda t: t.pop("model.layers.2.mixer.dt_bias"))
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mixer\.dt_bias is missing"):
        check_hf_weights(HFWeights(hf), model_cfg)

    hf = _copy_hf_dir(converted.hf_dir("gdn2_tiny"), tmp_path / "shape")
    _edit_weights(hf, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(63, 32)}))
    wrong_shape = r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(63, 32\), expected \(64, 32\)"
    with pytest.raises(ConversionError, match=wrong_shape):
        import_from_hf(hf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_from_hf_rejects_a_layout_the_model_cannot_split_into(converted, tmp_path):
    with pytest.raises(ValueError, match="tensor_model_parallel_size=3"):
        import_from_hf(converted.hf_dir("gdn2_tiny"), tmp_path / "out", tensor_parallel=3)
    with pytest.raises(ConversionError, match="--pipeline-model-parallel-size 3"):
        import_from_hf(converted.hf_dir("gdn2_tiny"), tmp_path / "out", pipeline_parallel=3)
    with pytest.raises(ConversionError, match="--dtype must be auto, bf16, fp32; got 'fp16'"):
        import_from_hf(converted.hf_dir("gdn2_tiny"), tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokenizer", [
    "mistral_v1/tokenizer.model", "gpt2", "neox20b/tokenizer.json",
])
def test_exported_tokenizer_encodes_like_the_training_tokenizer(tmp_path, tokenizer):
    hf, source = hf_tokenizer(SHARED_DATA / "tokenizers" / tokenizer)
    hf.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    lines = WIKITEXT.read_text().splitlines()[:300] + ["  two leading spaces", "tab\tand ünïcödé 日本 🙂", ""]
    for line in lines:
        assert reloaded(line)["input_ids"] == source.encode(line), line
        ids = source.encode(line)
        assert reloaded.decode(ids) == source.decode(ids), line
    assert reloaded.eos_token_id == source.eod
