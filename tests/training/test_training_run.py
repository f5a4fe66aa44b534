"""A real pretraining run on real text, exact resume, and resume at other TP / PP / DP layouts.

The reference run trains the tiny hybrid model (GDN-2 + SWA) for 2N steps with the distributed
optimizer and checkpoints at step N. A second run stops at N (--exit-interval) and is resumed in a
new process: its losses must equal the reference to 1e-6 (fp32 on CPU). The step-N checkpoint is
then resumed at TP=2, PP=2 and DP=2 for a few steps: same data, same schedule, so the losses must
match the reference up to the different reduction order.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_gdn2.training.checkpointing import latest_iteration
from tests.harness import run_distributed
from tests.training.common import GLOBAL, SEQ, make_config, train, train_in_layouts

REPO = Path(__file__).resolve().parents[2]

N = 10
LAYOUT_STEPS = 4  # steps run after resuming at another layout
DROP = 1.5  # nats the validation loss must fall by in 2N steps (observed: ~2.4)


def _config(corpus, save, **changes):
    return make_config(corpus, save, iters=2 * N, parallel__use_distributed_optimizer=True,
                       checkpoint__save_interval=N, logging__eval_interval=N, **changes)


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    reference = _config(corpus, root / "reference").to_dict()
    stopped = _config(corpus, root / "stopped", checkpoint__exit_interval=N).to_dict()
    ref, first_half = run_distributed(train, world_size=1, args=([reference, stopped],))[0]
    # a new process resumes the stopped run from its own checkpoint
    continued = _config(corpus, root / "stopped").to_dict()
    (resumed,) = run_distributed(train, world_size=1, args=([continued],))[0]
    return {"root": root, "reference": ref, "first_half": first_half, "resumed": resumed}


def test_validation_loss_falls_on_real_text(runs):
    valid = runs["reference"]["valid"]
    assert sorted(valid) == [0, N, 2 * N]
    assert valid[0] == pytest.approx(math.log(32000), abs=0.2)  # untrained: uniform over the vocabulary
    assert valid[0] > valid[N] > valid[2 * N]
    assert valid[0] - valid[2 * N] >= DROP, valid
    state = runs["reference"]["state"]
    assert state["iteration"] == 2 * N
    assert state["consumed_samples"] == 2 * N * GLOBAL and state["consumed_tokens"] == 2 * N * GLOBAL * SEQ
    assert latest_iteration(runs["root"] / "reference") == 2 * N


def test_exact_resume(runs):
    ref, first, resumed = runs["reference"], runs["first_half"], runs["resumed"]
    assert first["reason"] == "exit-interval" and first["state"]["iteration"] == N
    assert sorted(first["train"]) == list(range(1, N + 1))
    assert sorted(resumed["train"]) == list(range(N + 1, 2 * N + 1))
    for it in range(1, N + 1):
        assert first["train"][it] == pytest.approx(ref["train"][it], abs=1e-6), it
    for it in range(N + 1, 2 * N + 1):
        assert resumed["train"][it] == pytest.approx(ref["train"][it], abs=1e-6), it
    assert resumed["valid"][2 * N] == pytest.approx(ref["valid"][2 * N], abs=1e-6)
    assert resumed["state"] == ref["state"]


# On 2 ranks: TP=2 with sequence parallelism, PP=2 with full activation recomputation, DP=2
# (which reshards the distributed optimizer's state), with and without the gradient reduction and
# the parameter all-gather overlapped with the backward and forward passes.
OVERLAP = {"parallel__overlap_grad_reduce": True, "parallel__overlap_param_gather": True}
LAYOUTS = {
    "tp2-sp": (2, 1, {"parallel__sequence_parallel": True}),
    "pp2-recompute": (1, 2, {"parallel__recompute": "full"}),
    "dp2": (1, 1, {}),
    "dp2-overlap": (1, 1, OVERLAP),
}


def test_resume_at_another_layout(runs, corpus, tmp_path):
    jobs = [(tp, pp, _config(corpus, tmp_path / name, parallel__tensor_model_parallel_size=tp,
                             parallel__pipeline_model_parallel_size=pp,
                             checkpoint__load=str(runs["root"] / "stopped"), checkpoint__load_iteration=N,
                             checkpoint__exit_interval=N + LAYOUT_STEPS, **extra).to_dict())
            for name, (tp, pp, extra) in LAYOUTS.items()]
    per_rank = run_distributed(train_in_layouts, world_size=2, args=(jobs,))
    ref = runs["reference"]
    for rank, results in enumerate(per_rank):  # every rank reports the same global losses
        for name, out in zip(LAYOUTS, results):
            assert out["reason"] == "exit-interval", (name, rank)
            assert sorted(out["train"]) == list(range(N + 1, N + LAYOUT_STEPS + 1)), (name, rank)
            for it, loss in out["train"].items():
                assert loss == pytest.approx(ref["train"][it], abs=2e-5), (name, rank, it)
    for name in LAYOUTS:
        assert latest_iteration(tmp_path / name) == N + LAYOUT_STEPS, name

    # With --overlap-param-gather the last update reaches the parameters only in the next forward;
    # the checkpoint saved right after that step (no evaluation in between) must hold it anyway:
    # one more step from it gives the reference's loss.
    after = N + LAYOUT_STEPS + 1
    cont = _config(corpus, tmp_path / "after-overlap", checkpoint__load=str(tmp_path / "dp2-overlap"),
                   checkpoint__exit_interval=after).to_dict()
    ((out,), _) = run_distributed(train_in_layouts, world_size=2, args=([(1, 1, cont)],))
    assert sorted(out["train"]) == [after]
    assert out["train"][after] == pytest.approx(ref["train"][after], abs=2e-5)


def test_dali_backend_trains_on_the_same_batches(runs, corpus, tmp_path):
    """--data-backend dali feeds the unchanged dataset and sampler through DALI: the losses of the
    first N steps equal the torch backend's reference run exactly."""
    if importlib.util.find_spec("nvidia.dali") is None and not os.environ.get("CI"):
        pytest.skip("NVIDIA DALI is not installed (pip install 'megatron-gdn2[dali]'); CI installs it")
    cfg = _config(corpus, tmp_path / "dali", data__backend="dali", checkpoint__exit_interval=N)
    ((out,),) = run_distributed(train, world_size=1, args=([cfg.to_dict()],))
    assert sorted(out["train"]) == list(range(1, N + 1))
    for it, loss in out["train"].items():
        assert loss == runs["reference"]["train"][it], it


def test_generate_reads_the_final_checkpoint(runs):
    """The quickstart's last step: greedy text from a --save directory (its latest checkpoint)."""
    prompt = "The French Revolution was"
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "megatron_gdn2.training.generate", "--load",
                           str(runs["root"] / "reference"), "--prompt", prompt, "--max-new-tokens", "6"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"iteration {2 * N})" in done.stdout, done.stdout
    text = done.stdout.split(f"--- prompt: {prompt!r}\n", 1)[1].strip()
    assert text.startswith(prompt) and len(text) > len(prompt), text
