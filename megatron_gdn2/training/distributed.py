"""Process group, Megatron parallel state and seeds.

Launch with ``torchrun`` / ``srun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the
environment) or as a plain single process (a one-rank group on a free local port). NCCL on GPUs,
gloo on CPU. A process group or parallel state that already exists (e.g. set up by a test
harness) is reused after checking that its TP/PP sizes match the configuration.
"""
from __future__ import annotations

import logging
import os
import random
import socket

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_gdn2.training.config import ConfigError, ParallelConfig

__all__ = ["device", "init_distributed", "log_rank0", "set_seeds", "shutdown_distributed",
           "world_size_from_env"]

_log = logging.getLogger("megatron_gdn2.training")


def log_rank0(message: str) -> None:
    if dist.get_rank() == 0:
        _log.info(message)


def log_any_rank(message: str) -> None:
    """For what only some ranks know (their own profile); tagged with the rank."""
    _log.info(f"[rank {dist.get_rank()}] {message}")


def world_size_from_env() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(parallel: ParallelConfig) -> bool:
    """Returns True when it created the process group (the caller then tears it down)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        elif world == 1:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
        else:
            raise ConfigError(f"WORLD_SIZE={world} but no MASTER_ADDR: launch with torchrun or srun")
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tp, pp):
            raise ConfigError(f"parallel state already set up with TP={have[0]} PP={have[1]}, "
                              f"but the configuration asks for TP={tp} PP={pp}")
    else:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return created


def shutdown_distributed() -> None:
    ps.destroy_model_parallel()
    dist.destroy_process_group()


def set_seeds(seed: int) -> None:
    """Same seed on every data-parallel replica; Megatron's tracker offsets it per TP rank. The
    pipeline stage is mixed in so that stages do not initialise their layers identically."""
    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
