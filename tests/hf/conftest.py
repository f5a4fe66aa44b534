"""Real training checkpoints of both model families, exported once per session.

`converted` (session fixture) runs, in order:
1. in one gloo rank (TP=1), for gdn2_tiny and swa_gdn2_tiny with the Mistral tokenizer's
   32,000-token vocabulary: build the model the way gdn2-pretrain does, perturb every parameter (so
   zero biases and unit norms cannot hide a mapping error), save a training checkpoint with the
   training code's save_checkpoint (with its RNG state and run config), record the Megatron logits
   on WikiText tokens, export it (to-hf, fp32) and import the export again (from-hf, for
   TP=2 x PP=2); the rank is a one-process world, as `gdn2-convert from-hf` runs;
2. in four gloo ranks (TP=2 x PP=2): load each TP=1 training checkpoint with the training code's
   load_checkpoint and save it again (a TP=2 x PP=2 checkpoint of the same weights); then load the
   from-hf checkpoint (weights only: the loader skips optimizer and RNG state) into the same model
   and check that every local parameter equals the one loaded from the training checkpoint;
3. to-hf of the TP=2 x PP=2 checkpoints, in this process.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.shared_data import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
WIKITEXT = SHARED_DATA / "eval" / "wikitext2_raw_test.lf.txt"
LAMBADA = SHARED_DATA / "eval" / "lambada_openai.jsonl"
MISTRAL = SHARED_DATA / "tokenizers" / "mistral_v1" / "tokenizer.model"
VOCAB = 32000
FAMILIES = ("gdn2_tiny", "swa_gdn2_tiny")
BATCH, LENGTH = 2, 40  # swa_gdn2_tiny's window is 8 tokens: the context exceeds it


def text_tokens(batch=BATCH, length=LENGTH) -> torch.Tensor:
    from megatron_gdn2.data.tokenizers import load_tokenizer

    ids = load_tokenizer(MISTRAL).encode(WIKITEXT.read_text()[:20000])
    return torch.tensor(ids[: batch * length]).view(batch, length)


def _run_config(name: str, tp: int, pp: int, save=None, load=None, fresh_start=False):
    from megatron_gdn2.training.config import (
        CheckpointConfig,
        DataSettings,
        OptimizerSettings,
        ParallelConfig,
        PretrainConfig,
    )

    return PretrainConfig(
        model=name, seq_length=LENGTH, micro_batch_size=1, global_batch_size=1, train_iters=10,
        precision="fp32",
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp),
        data=DataSettings(tokenizer=str(MISTRAL)), optim=OptimizerSettings(warmup_tokens=0),
        checkpoint=CheckpointConfig(save=save, load=load, no_load_optim=fresh_start, no_load_rng=fresh_start),
    )


def _model(name: str, cfg):
    from megatron_gdn2.configs import get_model_config
    from megatron_gdn2.training.model_setup import build_model_bundle
    from megatron_gdn2.training.optimizer import build_optimizer, build_scheduler

    model_cfg = get_model_config(name, vocab_size=VOCAB, seq_length=LENGTH)
    bundle = build_model_bundle(cfg, model_cfg, bf16=False)
    optimizer = build_optimizer(cfg, [bundle.model], bf16=False)
    return model_cfg, bundle.module, optimizer, build_scheduler(cfg, optimizer)


def make_tp1_checkpoints(directory: str, tokens: torch.Tensor) -> dict:
    """Rank function (TP=1): see the module docstring, step 1; returns the Megatron logits."""
    from megatron_gdn2.convert.from_hf import import_from_hf
    from megatron_gdn2.convert.to_hf import export_to_hf
    from megatron_gdn2.training.checkpointing import TrainState, save_checkpoint

    logits = {}
    for index, name in enumerate(FAMILIES):
        cfg = _run_config(name, 1, 1, save=f"{directory}/{name}")
        model_cfg, module, optimizer, scheduler = _model(name, cfg)
        gen = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for param in module.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        module.eval()
        with torch.no_grad():
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits[name] = module(tokens, positions, None).float()
        save_checkpoint(cfg, TrainState(iteration=7, consumed_samples=7), module, optimizer, scheduler,
                        dataclasses.asdict(model_cfg))
    for name in FAMILIES:
        export_to_hf(f"{directory}/{name}", f"{directory}/{name}_hf", tokenizer=MISTRAL, dtype="fp32")
        import_from_hf(f"{directory}/{name}_hf", f"{directory}/{name}_imported", tensor_parallel=2,
                       pipeline_parallel=2)
    return logits


def reshard_and_load_imported(directory: str) -> dict:
    """Rank function (TP=2 x PP=2): see the module docstring, step 4."""
    from megatron.core import parallel_state as ps

    from megatron_gdn2.training.checkpointing import checkpoint_path, load_checkpoint, save_checkpoint

    mismatched = {}
    for name in FAMILIES:
        # The TP=1 run never stepped its optimizer (no moments to load): a weights-only start.
        cfg = _run_config(name, 2, 2, save=f"{directory}/{name}_tp2pp2", fresh_start=True)
        model_cfg, module, optimizer, scheduler = _model(name, cfg)
        state = load_checkpoint(cfg, checkpoint_path(f"{directory}/{name}", 7), module, optimizer, scheduler)
        expected = {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
        save_checkpoint(cfg, state, module, optimizer, scheduler, dataclasses.asdict(model_cfg))
        with torch.no_grad():
            for param in module.parameters():
                param.zero_()
        imported = f"{directory}/{name}_imported"
        # No --no-load-optim/--no-load-rng: a weights-only (from-hf) checkpoint needs none.
        fresh = _run_config(name, 2, 2, load=imported)
        load_checkpoint(fresh, checkpoint_path(imported, 0), module, optimizer, scheduler)
        loaded = module.state_dict()
        mismatched[name] = sorted(k for k, v in expected.items() if not torch.equal(v, loaded[k]))
    rank = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return {"rank": rank, "mismatched": mismatched}


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """These models are tiny: on a shared 2-core machine two OpenMP threads spin against each other
    (10x slower under load). One intra-op thread for the tests of this package, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class Converted:
    root: Path
    tokens: torch.Tensor
    megatron_logits: dict
    imported_check: list

    def checkpoint(self, name: str, layout: str = "") -> Path:
        return self.root / (name + layout)

    def hf_dir(self, name: str, layout: str = "") -> Path:
        return self.root / f"{name}{layout}_hf"


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    script = shutil.which("gdn2-convert")
    command = [script] if script else [sys.executable, "-m", "megatron_gdn2.convert.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"gdn2-convert {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> Converted:
    from megatron_gdn2.convert.to_hf import export_to_hf
    from tests.harness import run_distributed

    root = tmp_path_factory.mktemp("convert")
    tokens = text_tokens()
    (logits,) = run_distributed(make_tp1_checkpoints, 1, args=(str(root), tokens), timeout=600)
    imported = run_distributed(reshard_and_load_imported, 4, tp=2, pp=2, args=(str(root),), timeout=900)
    for name in FAMILIES:
        export_to_hf(root / f"{name}_tp2pp2", root / f"{name}_tp2pp2_hf", tokenizer=MISTRAL, dtype="fp32")
    return Converted(root=root, tokens=tokens, megatron_logits=logits, imported_check=imported)
