"""`benchmarks/train_throughput.py --quick` end to end on a CPU: every grid point trains with the
training package's model, optimizer and step, the real-data point reads ../shared/data, and the
markdown table has one row per point with positive measurements."""
import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gdn2.configs import get_model_config
from tests.shared_data import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"
MODELS = ("swa_gdn2_tiny", "gdn2_tiny", "full_attn_tiny")
SHAPES = ("32 x 8", "64 x 4", "128 x 2", "256 x 1")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through it
    spec.loader.exec_module(module)
    return module


def _table_rows(markdown: str) -> dict[tuple[str, str, str], list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        rows[(cells["model"], cells["seq x batch"], cells["data"])] = cells
    return rows


def _number(text: str) -> float:
    return float(text.replace(",", "").split()[0])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not (SHARED_DATA / "corpora").is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the real-data point needs the shared corpus and tokenizer")
    out = tmp_path_factory.mktemp("out")
    env = dict(os.environ, OUT=str(out), TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout, (out / "throughput.md").read_text()


def test_table_has_every_point_with_positive_numbers(quick_run):
    stdout, markdown = quick_run
    rows = _table_rows(markdown)
    expected = {(m, s, "synthetic") for m in MODELS for s in SHAPES} | {("swa_gdn2_tiny", "64 x 4", "real")}
    assert set(rows) == expected
    for key, cells in rows.items():
        for column in ("tokens/s", "step ms", "TFLOP/s", "GFLOP/token", "setup + 1st step s",
                       "peak mem GB (alloc / reserved)"):
            assert _number(cells[column]) > 0, (key, column, cells[column])
        assert math.isfinite(_number(cells["loss"])) and _number(cells["loss"]) > 0, (key, cells["loss"])
    # Random tokens over a 128-token vocabulary (synthetic) vs real text over 32,000 tokens: the
    # first losses sit near ln(vocabulary).
    assert abs(_number(rows[("gdn2_tiny", "64 x 4", "synthetic")]["loss"]) - math.log(128)) < 0.5
    assert abs(_number(rows[("swa_gdn2_tiny", "64 x 4", "real")]["loss"]) - math.log(32000)) < 1.0
    assert "Errors:\n- none" in markdown
    assert markdown in stdout  # the same report went to stdout


def test_report_has_time_to_first_step_loader_and_environment(quick_run):
    stdout, markdown = quick_run
    first = re.search(r"this process, first grid point: ([0-9.]+) s", markdown)
    fresh = re.search(r"fresh process after the grid \(warm Triton cache\): ([0-9.]+) s", markdown)
    assert first and float(first.group(1)) > 0
    assert fresh and float(fresh.group(1)) > 0
    loader = re.search(r"the loader alone delivers ([0-9,]+) tokens/s", markdown)
    assert loader and _number(loader.group(1)) > 0
    for key in ("torch:", "triton:", "megatron-core:", "device:"):
        assert f"- {key}" in markdown
    assert re.search(r"\[13/13\] full_attn_tiny 256 x 1 synthetic \| elapsed \S+ \| ETA \S+", stdout)


def test_full_attention_baseline_matches_the_hybrid_parameter_count():
    from megatron_gdn2.configs import count_parameters

    script = _load_script()
    for size, seq in (("1.3B", 4096), ("tiny", 64)):
        baseline = script.model_config(f"full_attn_{size}", seq)
        hybrid = script.model_config(f"swa_gdn2_{size}", seq)
        assert set(baseline.layers) == {"A"} and baseline.num_layers == hybrid.num_layers
        assert baseline.swa_window == seq and baseline.hidden_size == hybrid.hidden_size
        ratio = count_parameters(baseline).blocks / count_parameters(hybrid).blocks
        assert abs(ratio - 1) < 0.02, (size, ratio)
    with pytest.raises(ValueError, match="full_attn_<size>"):
        script.model_config("no_such_model", 64)


def test_profile_splits_the_forward_by_module(tmp_path):
    """--profile on the quick point: the summary has the forward time of each module type of the
    hybrid model (the ranges come from forward hooks on the real model)."""
    env = dict(os.environ, OUT=str(tmp_path), TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--profile"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = (tmp_path / "profile.txt").read_text()
    row = re.compile(r"^\| ([\w ]+) \| ([0-9.]+) \| ([0-9.]+) \|$", re.MULTILINE)
    rows = {m[1]: (float(m[2]), float(m[3])) for m in row.finditer(text)}
    layers = get_model_config("swa_gdn2_tiny").layers  # the quick profile point's model
    assert rows["GatedDeltaNet2"][0] == layers.count("G") and rows["SelfAttention"][0] == layers.count("A")
    assert rows["MLP"][0] == len(layers) and rows["RMSNorm"][0] == 2 * len(layers) + 1, rows
    assert rows["output layer"][0] == 1 and rows["LanguageModelEmbedding"][0] == 1, rows
    assert all(ms > 0 for _, ms in rows.values()), rows


POISONED_RUN = """
import sys, torch
sys.argv[0] = {script!r}
spec = __import__("importlib.util").util.spec_from_file_location("train_throughput", {script!r})
module = __import__("importlib.util").util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
real_build = module.build_trainer

def poisoned(*args, **kwargs):
    trainer = real_build(*args, **kwargs)
    with torch.no_grad():
        next(trainer.bundle.module.parameters()).fill_(float("nan"))
    return trainer

module.build_trainer = poisoned
sys.exit(module.main(["--quick", "--models", "gdn2_tiny", "--grid", "32x8", "--no-real-data",
                      "--no-ttfs-probe"]))
"""


def test_steps_with_non_finite_gradients_fail_the_point(tmp_path):
    """A NaN loss makes the optimizer skip every step, which then runs faster than a real one (run 16
    on the H200): the point must be reported as an error and the script must fail."""
    env = dict(os.environ, OUT=str(tmp_path), TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, "-c", POISONED_RUN.format(script=str(SCRIPT))], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-3000:]
    errors = (tmp_path / "throughput.md").read_text().split("Errors:")[1]
    assert "gdn2_tiny 32 x 8 (synthetic): error: FloatingPointError" in errors, errors
    assert "non-finite gradients" in errors
