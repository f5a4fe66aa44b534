"""One pretraining run, collective over all ranks: ``run(PretrainConfig) -> RunResult``.

Order of work: validate the configuration, load the tokenizer, resolve the model config and the
checkpoint to resume from (all cheap, before any process group: bad input fails in seconds), then
set up the process group and parallel state, build the datasets (Megatron's sample indices), the
model, the optimizer and schedule, load the checkpoint, and train (``loop``).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps

from megatron_gdn2.configs import count_parameters
from megatron_gdn2.data.datasets import DataConfig, build_data_loader, build_datasets
from megatron_gdn2.data.tokenizers import load_tokenizer
from megatron_gdn2.training.checkpointing import TrainState, load_checkpoint, resolve_load_path
from megatron_gdn2.training.config import ConfigError, PretrainConfig
from megatron_gdn2.training.cpu_support import enable_megatron_on_cpu
from megatron_gdn2.training.distributed import (
    device,
    init_distributed,
    log_rank0,
    set_seeds,
    shutdown_distributed,
    world_size_from_env,
)
from megatron_gdn2.training.flops import peak_tflops, training_flops_per_token
from megatron_gdn2.training.loop import RunResult, Trainer
from megatron_gdn2.training.metrics import ProgressMeter
from megatron_gdn2.training.model_setup import build_model_bundle, resolve_model_config
from megatron_gdn2.training.optimizer import build_optimizer, build_scheduler
from megatron_gdn2.training.wandb_logger import WandbLogger

__all__ = ["run"]

def _use_bf16(cfg: PretrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def _build_data(cfg: PretrainConfig, tokenizer):
    data_cfg = DataConfig(tokenizer=tokenizer, seq_length=cfg.seq_length, seed=cfg.seed,
                          cache_dir=cfg.data.cache_dir)
    if cfg.data.valid_data:
        data_cfg.train_data_path = cfg.data.train_data
        data_cfg.valid_data_path = cfg.data.valid_data
    else:
        data_cfg.data_path = cfg.data.train_data
        data_cfg.split = cfg.data.split
    samples = [cfg.total_iters * cfg.global_batch_size, cfg.logging.eval_iters * cfg.global_batch_size, 0]
    try:
        train, valid, _ = build_datasets(data_cfg, samples)
    except (ValueError, FileNotFoundError) as e:  # e.g. data tokenized with another tokenizer
        raise ConfigError(f"--train-data/--valid-data: {e}") from e
    if train is None:
        raise ConfigError(f"--split {cfg.data.split} leaves no training data")
    return train, valid


def run(cfg: PretrainConfig) -> RunResult:
    """Train as configured; collective over all ranks. Raises ConfigError on bad input (before any
    distributed work) and DivergenceError after too many non-finite steps."""
    cfg.validate(world_size_from_env())
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except ValueError as e:
        raise ConfigError(f"--tokenizer {cfg.data.tokenizer}: {e}") from e
    load_path = resolve_load_path(cfg)
    saved_model_cfg = (dist_checkpointing.load_common_state_dict(str(load_path))["model_config"]
                       if load_path is not None else None)
    model_cfg = resolve_model_config(cfg, tokenizer.vocab_size, saved_model_cfg)

    if not torch.cuda.is_available():
        enable_megatron_on_cpu()
    created = init_distributed(cfg.parallel)
    try:
        return _train(cfg, tokenizer, model_cfg, load_path)
    finally:
        if created:
            shutdown_distributed()


def _train(cfg: PretrainConfig, tokenizer, model_cfg, load_path) -> RunResult:
    set_seeds(cfg.seed)
    dev = device()
    world = dist.get_world_size()
    bf16 = _use_bf16(cfg)
    log_rank0(f"gdn2-pretrain: world {world} = TP {cfg.parallel.tensor_model_parallel_size} x PP "
              f"{cfg.parallel.pipeline_model_parallel_size} x DP {ps.get_data_parallel_world_size()}; "
              f"{'bf16' if bf16 else 'fp32'} on {dev.type}; model {model_cfg.name} "
              f"({count_parameters(model_cfg).total:,} parameters, vocab {model_cfg.vocab_size}); "
              f"{cfg.total_iters} steps x {cfg.global_batch_size} x {cfg.seq_length} tokens "
              f"= {cfg.total_tokens:,} tokens; micro batch {cfg.micro_batch_size} x "
              f"{cfg.num_microbatches(world)} micro-batches")
    train_ds, valid_ds = _build_data(cfg, tokenizer)

    bundle = build_model_bundle(cfg, model_cfg, bf16=bf16)
    optimizer = build_optimizer(cfg, [bundle.model], bf16=bf16)
    scheduler = build_scheduler(cfg, optimizer)
    state = TrainState()
    if load_path is not None:
        state = load_checkpoint(cfg, load_path, bundle.module, optimizer, scheduler)
        log_rank0(f"resumed from {load_path}: iter {state.iteration}, {state.consumed_samples} samples, "
                  f"{state.consumed_tokens:,} tokens")
    train_loader = build_data_loader(
        train_ds, consumed_samples=state.consumed_samples, micro_batch_size=cfg.micro_batch_size,
        data_parallel_rank=ps.get_data_parallel_rank(), data_parallel_size=ps.get_data_parallel_world_size(),
        num_workers=cfg.data.num_workers, backend=cfg.data.backend,
    )
    model_config = dataclasses.asdict(model_cfg)
    wandb = WandbLogger.start(cfg.logging, config={**cfg.to_dict(), "model_config": model_config},
                              run_id=state.wandb_run_id, is_writer=dist.get_rank() == 0)
    meter = ProgressMeter(total_iters=cfg.total_iters, tokens_per_step=cfg.tokens_per_step,
                          flops_per_token=training_flops_per_token(model_cfg), world_size=world,
                          peak_tflops=peak_tflops(cfg.logging.peak_tflops))
    trainer = Trainer(cfg=cfg, bundle=bundle, model_config=model_config, optimizer=optimizer,
                      scheduler=scheduler, train_loader=train_loader, valid_dataset=valid_ds, state=state,
                      meter=meter, wandb=wandb, device=dev, num_microbatches=cfg.num_microbatches(world))
    try:
        return trainer.run()
    finally:
        wandb.finish()


