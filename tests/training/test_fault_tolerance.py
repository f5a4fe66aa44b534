"""Non-finite steps, and a crash in the middle of writing a checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_gdn2.training.checkpointing import checkpoint_path, latest_iteration
from tests.harness import run_distributed
from tests.training.common import GLOBAL, MICRO, make_config, summarize


def _poison_iterations(real, bad: set[int], microbatches: int, grads_only: bool = False) -> None:
    """Replaces the loss with `real`'s, made NaN (and so its gradients) in every micro-batch of
    the given training iterations, as an overflow would; with grads_only the loss stays finite and
    only the gradients turn non-finite (an overflow in the backward)."""
    from megatron_gdn2.training import forward_step

    calls = {"n": 0}

    def poisoned(loss_mask, output_tensor):
        loss_sum, num_tokens, report = real(loss_mask, output_tensor)
        iteration = calls["n"] // microbatches + 1
        calls["n"] += 1
        if iteration in bad and grads_only:
            output_tensor.register_hook(lambda grad: grad * math.inf)
        elif iteration in bad:
            loss_sum = loss_sum * math.nan
            report = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach().float()])}
        return loss_sum, num_tokens, report

    forward_step.masked_token_loss = poisoned


def nonfinite_runs(recovering: dict, diverging: dict) -> dict:
    from megatron_gdn2.training.config import PretrainConfig
    from megatron_gdn2.training.forward_step import masked_token_loss
    from megatron_gdn2.training.loop import DivergenceError
    from megatron_gdn2.training.runner import run

    microbatches = GLOBAL // MICRO
    _poison_iterations(masked_token_loss, {3}, microbatches, grads_only=True)
    out = {"recovering": summarize(run(PretrainConfig.from_dict(recovering)))}
    _poison_iterations(masked_token_loss, {2, 3}, microbatches)
    try:
        run(PretrainConfig.from_dict(diverging))
    except DivergenceError as e:
        out["diverged"] = str(e)
    return out


def _model_tensors(directory, iteration, tmp_path):
    out = tmp_path / f"model_{iteration}.pt"
    dcp_to_torch_save(str(checkpoint_path(directory, iteration)), str(out))
    state = torch.load(out, weights_only=False)  # our own file, just written
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}


def _same(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys() and a
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_are_skipped_and_k_in_a_row_stop_the_run(corpus, tmp_path):
    recovering = make_config(corpus, tmp_path / "recovering", iters=4, max_nonfinite_steps=2,
                             checkpoint__save_interval=1, checkpoint__keep_last=0, logging__eval_iters=0)
    diverging = make_config(corpus, tmp_path / "diverging", iters=3, max_nonfinite_steps=2,
                            checkpoint__save_interval=1, checkpoint__keep_last=0, logging__eval_iters=0)
    (out,) = run_distributed(nonfinite_runs, world_size=1, args=(recovering.to_dict(), diverging.to_dict()))

    rec = out["recovering"]
    assert rec["reason"] == "finished" and rec["state"]["iteration"] == 4
    assert rec["state"]["skipped_steps"] == 1
    assert math.isnan(rec["train"][3]) and all(math.isfinite(rec["train"][i]) for i in (1, 2, 4))
    models = {i: _model_tensors(tmp_path / "recovering", i, tmp_path) for i in (2, 3, 4)}
    assert _same(models[2], models[3]), "a skipped step changed the weights"
    assert not _same(models[3], models[4]), "training did not go on after the skipped step"

    message = out["diverged"]
    assert "2 non-finite steps in a row (iterations 2-3)" in message
    assert "state after iteration 1" in message and "iter_0000003" in message
    assert latest_iteration(tmp_path / "diverging") == 3
    last_good = _model_tensors(tmp_path / "diverging", 1, tmp_path)
    assert _same(last_good, _model_tensors(tmp_path / "diverging", 3, tmp_path))


def crash_then_resume(straight: dict, crashing: dict) -> dict:
    from megatron.core import dist_checkpointing

    from megatron_gdn2.training.config import PretrainConfig
    from megatron_gdn2.training.runner import run

    out = {"straight": summarize(run(PretrainConfig.from_dict(straight)))}
    real_save, calls = dist_checkpointing.save, {"n": 0}

    def crash_on_second_save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # half a checkpoint on disk, then the process "dies"
            with open(f"{checkpoint_dir}/__0_0.distcp", "wb") as fh:
                fh.write(b"\0" * 4096)
            raise RuntimeError("simulated crash while writing a checkpoint")
        return real_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    dist_checkpointing.save = crash_on_second_save
    try:
        run(PretrainConfig.from_dict(crashing))
    except RuntimeError as e:
        out["crash"] = str(e)
    finally:
        dist_checkpointing.save = real_save
    save_dir = Path(crashing["checkpoint"]["save"])
    out["after_crash"] = {"latest": latest_iteration(save_dir),
                          "dirs": sorted(p.name for p in save_dir.iterdir() if p.name.startswith("iter_"))}
    out["resumed"] = summarize(run(PretrainConfig.from_dict(crashing)))
    return out


def test_crash_during_save_leaves_latest_on_the_previous_checkpoint(corpus, tmp_path):
    ckpt = tmp_path / "ckpt"
    straight = make_config(corpus, tmp_path / "straight", iters=4, logging__eval_iters=0)
    crashing = make_config(corpus, ckpt, iters=4, checkpoint__save_interval=2, checkpoint__keep_last=1,
                           logging__eval_iters=0)

    (out,) = run_distributed(crash_then_resume, world_size=1, args=(straight.to_dict(), crashing.to_dict()))
    assert out["crash"] == "simulated crash while writing a checkpoint"
    # what the crash left behind: latest still names the complete checkpoint
    assert out["after_crash"] == {"latest": 2, "dirs": ["iter_0000002", "iter_0000004.tmp"]}
    resumed = out["resumed"]
    assert sorted(resumed["train"]) == [3, 4], "the resumed run did not start from iteration 2"
    for it in (3, 4):  # plain (non-distributed) optimizer: exact continuation as well
        assert resumed["train"][it] == pytest.approx(out["straight"]["train"][it], abs=1e-6)
    assert latest_iteration(ckpt) == 4
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == ["iter_0000004"]
