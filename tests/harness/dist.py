"""Run a function on N gloo ranks with Megatron-Core's parallel state set up (CPU tests).

`run_distributed(fn, world_size, tp=2, pp=2)` spawns `world_size` processes (not daemonic:
Megatron's checkpoint writer starts its own); each enables Megatron-Core's CPU mode, joins a gloo
process group, calls `parallel_state.initialize_model_parallel(tp, pp)` and
`model_parallel_cuda_manual_seed(seed)`, then runs `fn(*args, **kwargs)`. `fn` must be a
module-level function (spawned processes import it by name). The per-rank return values come back
in rank order. A rank that raises makes the whole call raise `DistributedTestError` carrying that
rank's traceback; a rank that dies or a run that outlives `timeout` raises too, and every
process is killed, so a broken collective fails the test instead of hanging CI.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback


class DistributedTestError(RuntimeError):
    pass


def _worker(rank, world_size, init_file, tp, pp, seed, mp_kwargs, fn, args, kwargs, results):
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    # 2-core machines: one thread per rank keeps N ranks from oversubscribing the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        # The library's CPU runtime (it also serves the quickstart and CPU conversion jobs).
        from megatron_gdn2.training.cpu_support import enable_megatron_on_cpu

        enable_megatron_on_cpu()
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, **mp_kwargs)
        model_parallel_cuda_manual_seed(seed)
        out = fn(*args, **kwargs)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - everything a rank raises must reach the parent
        results.put((rank, "error", traceback.format_exc()))
        return
    try:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown after a successful result must not mask it
        pass


def run_distributed(fn, world_size: int, tp: int = 1, pp: int = 1, args=(), kwargs=None,
                    timeout: float = 600.0, seed: int = 1234, mp_kwargs=None):
    if world_size % (tp * pp):
        raise ValueError(f"world_size={world_size} is not divisible by tp*pp={tp * pp}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="gloo_init_") as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_worker, args=(
                r, world_size, init_file, tp, pp, seed, dict(mp_kwargs or {}), fn, tuple(args),
                dict(kwargs or {}), results))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        outputs: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(outputs) < world_size:
                try:
                    rank, status, payload = results.get(timeout=1.0)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if r not in outputs and p.exitcode not in (None, 0)]
                    if dead:
                        raise DistributedTestError(
                            f"rank(s) {dead} died with exit code(s) "
                            f"{[procs[r].exitcode for r in dead]} without reporting") from None
                    if time.monotonic() > deadline:
                        missing = sorted(set(range(world_size)) - set(outputs))
                        raise DistributedTestError(
                            f"timed out after {timeout:.0f}s waiting for rank(s) {missing} "
                            f"(tp={tp}, pp={pp}, fn={fn.__module__}.{fn.__qualname__})") from None
                    continue
                if status == "error":
                    raise DistributedTestError(
                        f"rank {rank} of {world_size} (tp={tp}, pp={pp}) failed in "
                        f"{fn.__module__}.{fn.__qualname__}:\n{payload}")
                outputs[rank] = payload
            for p in procs:
                p.join(timeout=30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=10)
    return [outputs[r] for r in range(world_size)]
