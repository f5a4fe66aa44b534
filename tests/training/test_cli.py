"""The gdn2-pretrain command line: the reference release's flags, bad input, and pre-emption.

The end-to-end test runs the real console entry point in a subprocess, as a user or Slurm would:
reference-style flags with wandb in offline mode, SIGUSR1 mid-run (checkpoint at the next step
boundary, exit 0), the same command again (resumes and finishes), and once more (nothing left to
do: exits 0 at once, so requeueing is always safe).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_gdn2.training.arguments import config_from_args, parse_train_config
from megatron_gdn2.training.checkpointing import checkpoint_path, latest_iteration
from megatron_gdn2.training.pretrain import EXIT_BAD_INPUT, main
from tests.training.common import make_config

REPO = Path(__file__).resolve().parents[2]


def test_train_config_names():
    assert parse_train_config("tsz512x4k_20B") == (512, 4096, 20_000_000_000)
    assert parse_train_config("tsz128x16k_100B") == (128, 16384, 100_000_000_000)
    assert parse_train_config("tsz8x64_5K") == (8, 64, 5000)


def test_reference_command_line_meanings(corpus, tmp_path):
    cfg = config_from_args([
        "--train_data_dir", str(corpus.directory), "--val_data_dir", str(corpus.directory),
        "--output_root", str(tmp_path), "--exp_name", "run1", "--model_name", "swa_gdn2_1.3B",
        "--train_config", "tsz512x4k_20B", "--eval_iters", "7", "--learning_rate", "3e-4",
        "--micro_batch_size", "0", "--interactive_job", "--debug", "--tokenizer_path", corpus.tokenizer,
    ], world_size=16)
    assert (cfg.global_batch_size, cfg.seq_length, cfg.train_tokens) == (512, 4096, 20_000_000_000)
    assert cfg.total_iters == 20_000_000_000 // (512 * 4096) + 1
    assert cfg.optim.lr == 3e-4 and cfg.optim.min_lr_ratio == 0.1
    assert cfg.optim.warmup_tokens == 200_000_000  # the release: 1% of the tokens
    assert (cfg.optim.adam_beta1, cfg.optim.adam_beta2, cfg.optim.weight_decay, cfg.optim.clip_grad) == \
        (0.9, 0.95, 0.1, 1.0)
    assert cfg.micro_batch_size == 4  # 512 / 16 ranks = 32 per rank; at most 4 for 1.3B models
    assert cfg.logging.eval_iters == 7
    assert cfg.data.train_data == [corpus.prefix] and cfg.data.valid_data == [corpus.prefix]
    assert cfg.checkpoint.save == str(tmp_path / "outputs" / "tsz512x4k_20B_run1")
    assert cfg.logging.wandb_dir == str(tmp_path / "wandb" / "tsz512x4k_20B_run1")
    assert cfg.logging.wandb_mode == "disabled" and cfg.logging.log_interval == 1  # --debug
    cfg.validate(world_size=16)


def _run_main(argv, capsys, env=None, monkeypatch=None):
    if env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    code = main(argv)
    err = capsys.readouterr().err
    assert not dist.is_initialized(), "bad input must be caught before any process group exists"
    return code, err


def _native_args(corpus, tmp_path, **flags):
    args = {"--model": "swa_gdn2_tiny", "--tokenizer": corpus.tokenizer, "--train-data": corpus.prefix,
            "--seq-length": "64", "--micro-batch-size": "2", "--global-batch-size": "8",
            "--train-iters": "4", "--lr-warmup-tokens": "512", "--save": str(tmp_path / "ckpt")}
    args.update(flags)
    return [x for k, v in args.items() for x in (k, v)]


@pytest.mark.parametrize("flags,env,message", [
    ({"--train-data": "/nonexistent/corpus"}, {}, "--train-data: /nonexistent/corpus.bin does not exist"),
    ({"--tokenizer": "/nonexistent/tok.model"}, {}, "--tokenizer: /nonexistent/tok.model does not exist"),
    ({"--model": "gdn2_huge"}, {}, "unknown model config 'gdn2_huge'"),
    ({"--global-batch-size": "7"}, {}, "--global-batch-size 7 is not divisible by --micro-batch-size 2"),
    ({"--tensor-model-parallel-size": "2"}, {"WORLD_SIZE": "3"},
     "world size 3 is not divisible by --tensor-model-parallel-size 2"),
    ({"--train-iters": "1"}, {}, "--lr-warmup-tokens 512 must be >= 0 and smaller than the decay length 512"),
], ids=["missing-data", "missing-tokenizer", "unknown-model", "batch-split", "world-split", "warmup"])
def test_bad_input_fails_fast_with_a_clear_message(corpus, tmp_path, capsys, monkeypatch, flags, env,
                                                   message):
    start = time.monotonic()
    code, err = _run_main(_native_args(corpus, tmp_path, **flags), capsys, env, monkeypatch)
    assert code == EXIT_BAD_INPUT
    assert message in err, err
    assert time.monotonic() - start < 60
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("extra,message", [
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "3"],
     "--profile-step-start 5 and --profile-step-end 3 must satisfy 1 <= start <= end"),
], ids=["overlap-param-gather", "profile-window"])
def test_bad_flag_combinations(corpus, tmp_path, capsys, extra, message):
    code, err = _run_main(_native_args(corpus, tmp_path) + extra, capsys)
    assert code == EXIT_BAD_INPUT
    assert message in err, err
    assert not (tmp_path / "ckpt").exists()


def test_bad_tokenizer_file_and_bad_train_config(corpus, tmp_path, capsys, monkeypatch):
    not_a_tokenizer = tmp_path / "tokenizer.json"
    not_a_tokenizer.write_text("{ this is not json")
    code, err = _run_main(_native_args(corpus, tmp_path, **{"--tokenizer": str(not_a_tokenizer)}), capsys)
    assert code == EXIT_BAD_INPUT and f"--tokenizer {not_a_tokenizer}" in err, err
    code, err = _run_main(["--train_data_dir", str(corpus.directory), "--output_root", str(tmp_path),
                           "--exp_name", "x", "--train_config", "tsz512_20B"], capsys)
    assert code == EXIT_BAD_INPUT and "--train_config 'tsz512_20B'" in err, err
    code, err = _run_main(["--train_data_dir", str(tmp_path), "--output_root", str(tmp_path),
                           "--exp_name", "x", "--train_config", "tsz8x64_5K"], capsys)
    assert code == EXIT_BAD_INPUT and "no preprocessed dataset" in err, err


def test_resuming_with_another_model_is_refused(corpus, tmp_path, capsys):
    from tests.harness import run_distributed
    from tests.training.common import train

    ckpt = tmp_path / "ckpt"
    cfg = make_config(corpus, ckpt, iters=2, logging__eval_iters=0, optim__warmup_tokens=0)
    run_distributed(train, world_size=1, args=([cfg.to_dict()],))
    bigger_mlp = _native_args(corpus, tmp_path, **{"--model-override": "ffn_hidden_size=128"})
    code, err = _run_main(bigger_mlp, capsys)
    assert code == EXIT_BAD_INPUT
    assert "the checkpoint was written by a different model: ffn_hidden_size 64 (checkpoint) vs 128" in err


def _launch(argv, log):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "megatron_gdn2.training.pretrain", *argv], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _wait_for(log_path: Path, text: str, proc, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log_path.read_text():
        assert proc.poll() is None, f"exited {proc.returncode} before {text!r}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout}s:\n{log_path.read_text()}"
        time.sleep(0.2)


def test_reference_cli_sigusr1_saves_and_a_rerun_resumes(corpus, tmp_path):
    reference = ["--train_data_dir", str(corpus.directory), "--val_data_dir", str(corpus.directory),
                 "--output_root", str(tmp_path), "--exp_name", "smoke", "--model_name", "swa_gdn2_tiny",
                 "--train_config", "tsz8x64_5K", "--eval_iters", "1", "--learning_rate", "3e-3",
                 "--micro_batch_size", "0", "--interactive_job", "--tokenizer_path", corpus.tokenizer,
                 "--data-cache-dir", corpus.cache_dir]
    run_dir = tmp_path / "outputs" / "tsz8x64_5K_smoke"
    total = 10  # ceil(5000 / (8 x 64))

    log1 = tmp_path / "first.log"
    with log1.open("w") as fh:
        proc = _launch([*reference, "--log-interval", "1", "--wandb-project", "gdn2-tests",
                        "--wandb-mode", "offline"], fh)
        _wait_for(log1, f"iter 2/{total}", proc)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=240) == 0, log1.read_text()
    text = log1.read_text()
    assert "received SIGUSR1: saving a checkpoint and stopping" in text, text
    stopped_at = latest_iteration(run_dir)
    assert stopped_at is not None and 2 <= stopped_at < total, text
    state = json.loads((checkpoint_path(run_dir, stopped_at) / "train_state.json").read_text())
    assert state["train_state"]["consumed_samples"] == 8 * stopped_at
    run_id = state["train_state"]["wandb_run_id"]
    offline_runs = list((tmp_path / "wandb" / "tsz8x64_5K_smoke" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert run_id and len(offline_runs) == 1, "wandb offline run missing"

    log2 = tmp_path / "second.log"
    with log2.open("w") as fh:
        assert _launch([*reference, "--debug"], fh).wait(timeout=300) == 0, log2.read_text()
    text = log2.read_text()
    assert f"resumed from {checkpoint_path(run_dir, stopped_at)}" in text, text
    assert f"iter {stopped_at + 1}/{total}" in text and f"iter {total}/{total}" in text
    assert f"iter {stopped_at}/{total}" not in text
    assert "validation at iter 10" in text and latest_iteration(run_dir) == total

    log3 = tmp_path / "third.log"
    with log3.open("w") as fh:
        assert _launch([*reference, "--debug"], fh).wait(timeout=300) == 0, log3.read_text()
    text = log3.read_text()
    assert f"training finished at iter {total}" in text and "iter 1/" not in text, text


def test_gradient_accumulation_fusion_flag(corpus, tmp_path):
    """On by default (used where the GPU allows it); Megatron-LM's flag turns it off."""
    assert config_from_args(_native_args(corpus, tmp_path), world_size=1).gradient_accumulation_fusion
    off = config_from_args(_native_args(corpus, tmp_path) + ["--no-gradient-accumulation-fusion"],
                           world_size=1)
    assert off.gradient_accumulation_fusion is False
