"""Checkpoints: Megatron-Core dist_checkpointing, written atomically, resumable in any layout.

Directory layout (``--save DIR``)::

    DIR/latest_checkpointed_iteration.txt   newest *complete* checkpoint's iteration (e.g. "200")
    DIR/iter_0000200/                       one dist_checkpointing (torch_dist) checkpoint:
        metadata.json, common.pt, *.distcp    Megatron's files (written last: metadata.json)
        train_state.json                      human-readable copy of the training state
    DIR/iter_0000300.tmp/                   a save in progress; a crash leaves it behind and the
                                            next save deletes it; loading never looks at it

Contents: model weights and optimizer state as sharded tensors (any TP/PP/DP layout can load
them: the plain optimizers shard their state like the parameters; the DistributedOptimizer state
is written in Megatron's ``fully_reshardable`` format by default, gathered per model-parallel
rank onto data-parallel rank 0, loadable at any TP/PP/DP, or with ``--ckpt-optim-format
dp_reshardable`` in fully parallel per-rank shards, faster at scale but loadable only at the same
TP/PP); the scheduler state, the training state
(iteration, consumed samples = data position, consumed tokens, skipped steps, wandb run id), the
layout it was written in, the whole run configuration and the model's ModelConfig (with its
padded vocabulary) as common objects; the Python, NumPy, torch and CUDA-tracker RNG states of
every (PP, TP) rank as a sharded object. RNG states are
restored only when the TP and PP sizes are unchanged (they are per model-parallel rank).

Atomicity: every rank writes into ``iter_N.tmp``; after a barrier rank 0 renames it to
``iter_N`` (one ``rename``), then replaces ``latest_checkpointed_iteration.txt`` through a
temporary file and ``os.replace``, fsyncing file and directory. A crash at any point leaves
``latest`` naming the previous complete checkpoint. Old checkpoints beyond ``keep_last`` are
deleted only after ``latest`` moved on.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_gdn2.training.config import ConfigError, PretrainConfig
from megatron_gdn2.training.distributed import log_rank0

__all__ = [
    "LATEST_FILE",
    "TrainState",
    "checkpoint_path",
    "latest_iteration",
    "load_checkpoint",
    "save_checkpoint",
]

LATEST_FILE = "latest_checkpointed_iteration.txt"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0
    skipped_steps: int = 0
    wandb_run_id: str | None = None


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"iter_{iteration:07d}"


def latest_iteration(directory: str | Path) -> int | None:
    """The iteration named by DIR/latest_checkpointed_iteration.txt, or None if there is none."""
    tracker = Path(directory) / LATEST_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def _layout() -> dict:
    return {
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _rng_state() -> dict:
    version, keys, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "random": [version, list(keys), gauss],
        "numpy": [np_kind, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    version, keys, gauss = state["random"]
    random.setstate((version, tuple(keys), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np.asarray(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict | None) -> ShardedObject:
    return ShardedObject(
        "rng_state", state,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh DistributedOptimizer holds no Adam state, and building its sharded state dict for
    loading reads the step counter from that state. Take one step with zero gradients at lr 0 and
    weight decay 0 (the weights do not move); the load then overwrites the state."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(opt, DistributedOptimizer) or opt.optimizer.state:
            continue
        groups = opt.optimizer.param_groups
        kept = [(g["lr"], g["weight_decay"]) for g in groups]
        for g in groups:
            g["lr"], g["weight_decay"] = 0.0, 0.0
        opt._init_optimizer_states_with_dummy_values()
        for g, (lr, wd) in zip(groups, kept):
            g["lr"], g["weight_decay"] = lr, wd
        if isinstance(opt.optimizer, torch.optim.Optimizer):
            _accept_missing_step(opt)


def _accept_missing_step(opt: DistributedOptimizer) -> None:
    """torch.optim.AdamW (used when neither Transformer Engine nor Apex is installed) keeps a
    per-parameter "step" tensor; Megatron's fully_reshardable loader restores "step" from the
    param groups but then copies every state key of each parameter from the checkpoint shard,
    which has none ("KeyError: 'step'" in _set_main_param_and_optimizer_states, megatron-core
    0.16.1 and 0.19.2). Hand it the step it already restored."""
    original = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            step = opt.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step.clone()}
        original(model_param, tensors)

    opt._set_main_param_and_optimizer_states = set_states


def _unshare_step_counters(optimizer) -> None:
    """DistributedOptimizer.load_state_dict gives every parameter of a torch AdamW the *same*
    "step" tensor; AdamW's foreach update increments each parameter's step in place, so a shared
    one advances once per parameter and the bias correction goes wrong from the first step after
    resuming. Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and isinstance(opt.optimizer, torch.optim.Optimizer):
            for state in opt.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()


def _sharded_state_dict(model, optimizer, *, is_loading: bool, optim_format: str | None) -> dict:
    """Model (and, unless optim_format is None, optimizer) sharded state dict."""
    state = {"model": model.sharded_state_dict()}
    if optim_format is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state["model"], is_loading=is_loading, metadata={"distrib_optim_sharding_type": optim_format})
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _prune(directory: Path, keep_last: int, keep: int) -> None:
    if keep_last <= 0:
        return
    complete = sorted(
        int(p.name[len("iter_"):]) for p in directory.glob("iter_*")
        if p.is_dir() and p.name[len("iter_"):].isdigit())
    for iteration in complete[:-keep_last]:
        if iteration != keep:
            shutil.rmtree(checkpoint_path(directory, iteration), ignore_errors=True)


def save_checkpoint(cfg: PretrainConfig, state: TrainState, model, optimizer, scheduler,
                    model_config: dict) -> Path:
    """Collective: every rank calls it. `model` is the unwrapped GPTModel of this stage and
    `model_config` the ModelConfig as a dict. Returns the checkpoint directory."""
    directory = Path(cfg.checkpoint.save)
    final = checkpoint_path(directory, state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = dist.get_rank() == 0
    if rank0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("iter_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()

    sharded = _sharded_state_dict(model, optimizer, is_loading=False,
                                  optim_format=cfg.checkpoint.optim_format)
    sharded["rng_state"] = _rng_sharded_object(_rng_state())
    sharded["scheduler"] = scheduler.state_dict()
    sharded["train_state"] = asdict(state)
    sharded["layout"] = _layout()
    sharded["config"] = cfg.to_dict()
    sharded["model_config"] = model_config
    dist_checkpointing.save(sharded, str(tmp))
    dist.barrier()

    if rank0:
        info = {"train_state": asdict(state), "layout": _layout(), "config": cfg.to_dict(),
                "model_config": model_config}
        (tmp / "train_state.json").write_text(json.dumps(info, indent=2) + "\n")
        previous = None
        if final.exists():  # the same iteration saved again (a resumed run): replace it
            previous = final.with_name(final.name + ".old")
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
        tmp.rename(final)
        _fsync_dir(directory)
        _write_atomically(directory / LATEST_FILE, f"{state.iteration}\n")
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        _prune(directory, cfg.checkpoint.keep_last, keep=state.iteration)
    dist.barrier()
    return final


def resolve_load_path(cfg: PretrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start. Cheap: checks files only."""
    c = cfg.checkpoint
    directory = c.load or c.save
    if directory is None:
        return None
    if c.load_iteration is not None:
        iteration = c.load_iteration
    else:
        iteration = latest_iteration(directory)
        if iteration is None:
            if c.load is not None:
                raise ConfigError(f"--load {c.load}: no {LATEST_FILE} there (no complete checkpoint)")
            return None
    path = checkpoint_path(directory, iteration)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(path)):
        raise ConfigError(f"checkpoint {path} is missing or incomplete (no metadata.json)")
    return path


def load_checkpoint(cfg: PretrainConfig, path: Path, model, optimizer, scheduler) -> TrainState:
    """Collective. Loads `path` into model/optimizer/scheduler (in place) and restores RNG states
    when the TP/PP layout matches; returns the training state stored with it."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    saved_layout = common["layout"]
    layout = _layout()
    same_mp = all(saved_layout[k] == layout[k]
                  for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
    # A checkpoint converted from Hugging Face holds weights only: nothing else to restore.
    weights_only = bool(common.get("weights_only", False))
    if weights_only:
        log_rank0(f"{path} holds weights only (converted from Hugging Face): the optimizer and RNG "
                  "states start afresh")
    with_optimizer = not (cfg.checkpoint.no_load_optim or weights_only)
    saved = common["config"]
    saved_dist_opt = saved["parallel"]["use_distributed_optimizer"]
    if with_optimizer and saved_dist_opt != cfg.parallel.use_distributed_optimizer:
        raise ConfigError(
            f"{path} holds {'distributed' if saved_dist_opt else 'plain'} optimizer state; resume "
            f"with{'' if saved_dist_opt else 'out'} --use-distributed-optimizer, or pass --no-load-optim")
    optim_format = saved["checkpoint"]["optim_format"]
    if with_optimizer and saved_dist_opt and optim_format == "dp_reshardable" and not same_mp:
        raise ConfigError(f"{path} holds dp_reshardable optimizer state, which loads only at TP "
                          f"{saved_layout['tensor_model_parallel_size']} x PP "
                          f"{saved_layout['pipeline_model_parallel_size']}; pass --no-load-optim to "
                          "start the optimizer afresh at another layout")
    if with_optimizer:
        _materialize_optimizer_state(optimizer)
    sharded = _sharded_state_dict(model, optimizer, is_loading=True,
                                  optim_format=optim_format if with_optimizer else None)
    load_rng = same_mp and not (cfg.checkpoint.no_load_rng or weights_only)
    if load_rng:
        sharded["rng_state"] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(sharded, str(path))

    model.load_state_dict(loaded["model"], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_step_counters(optimizer)
        scheduler.load_state_dict(common["scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    elif not (cfg.checkpoint.no_load_rng or weights_only):
        log_rank0(f"checkpoint layout {saved_layout} differs from {layout}: RNG states not restored")
    state = TrainState(**common["train_state"])
    if not with_optimizer:
        scheduler.step(increment=state.consumed_tokens)
    return state
