"""`benchmarks/multi_gpu.py layouts --cpu` end to end: a TP=1 checkpoint written by gdn2-pretrain
under torchrun, loaded at TP=1, TP=2 and DP=2 (gloo, fp32, 2 ranks, 3 steps); the markdown table
has a row per layout and the losses of every layout equal TP=1's within 1e-4."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.shared_data import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "multi_gpu.py"


def _rows(markdown: str) -> dict[str, dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells["layout"]: cells for cells in
            (dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:])}


def _losses(workdir: Path, name: str) -> list[float]:
    text = (workdir / f"{name}.log").read_text()
    return [float(line.split("| loss ")[1].split()[0]) for line in text.splitlines() if "| loss " in line]


def test_layouts_cpu_smoke(tmp_path):
    if not (SHARED_DATA / "corpora").is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the layouts run trains on the shared corpus")
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, OUT=str(out), TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "layouts", "--cpu", "--workdir", str(work)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    markdown = (out / "multi_gpu.md").read_text()
    assert "## Parallel layouts: swa_gdn2_tiny, fp32 on CPU (gloo)" in markdown
    rows = _rows(markdown)
    assert set(rows) == {"TP=1", "TP=2", "DP=2"}, rows
    assert rows["TP=1"]["result"] == "reference"
    for name in ("TP=2", "DP=2"):
        assert rows[name]["result"] == "ok" and rows[name]["steps"] == "3", rows[name]
        assert float(rows[name]["max abs(loss - TP=1)"]) <= 1e-4, rows[name]
    reference = _losses(work / "layouts", "TP_1")
    assert len(reference) == 3 and reference[0] > reference[-1], reference  # it trained
    for name in ("TP_2", "DP_2"):
        losses = _losses(work / "layouts", name)
        assert len(losses) == 3
        assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-4 + 1e-9, (name, losses, reference)


def test_scaling_job_profile_is_read_back(tmp_path):
    """A scaling job as multi_gpu.py builds it (with --profile over its last two steps), run for
    real by its launcher on CPU: the profile summary line and the per-interval rates are read back
    from the log, and the profiled last interval is left out of the steady rate."""
    if not (SHARED_DATA / "corpora").is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the run trains on the shared corpus")
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import multi_gpu as mg
    finally:
        sys.path.remove(str(SCRIPT.parent))
    work = tmp_path / "work"
    work.mkdir()
    args = mg.parse_args(["layouts", "--cpu", "--workdir", str(work), "--seq", "64", "--throughput-steps",
                          "4", "--throughput-log-interval", "1", "--corpus-docs", "200"])
    job = mg.throughput_job(args, mg.data_flags(args, work), "scaling 1 rank", 1, "swa_gdn2_tiny", 2, 2,
                            mg.profile_flags(args, work, "profile 1"))
    mg.Launcher(args, work, deadline=time.monotonic() + 200).run([job])
    assert job.error is None, mg.failure_excerpt(job.log)
    assert job.profile == "no GPU kernels recorded", job.log.read_text()[-2000:]  # CPU: no GPU kernels
    assert (work / "profile_1" / "trace_rank0.json.gz").is_file()
    assert len(job.tokens_per_s) == 4
    assert mg.steady_rate(job) == pytest.approx(sum(job.tokens_per_s[1:3]) / 2)
