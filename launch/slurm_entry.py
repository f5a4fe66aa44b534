"""Node-side entry of a Slurm job step: one task per GPU, started by ``srun``.

    srun ... python3 launch/slurm_entry.py --log-dir DIR -- python3 -m megatron_gdn2.training.pretrain ARGS

Maps Slurm's per-task environment to the variables torch.distributed's ``env://`` rendezvous reads
and runs the command with them:

- ``RANK`` = SLURM_PROCID, ``WORLD_SIZE`` = SLURM_NTASKS, ``LOCAL_RANK`` = SLURM_LOCALID,
  ``LOCAL_WORLD_SIZE`` = this node's share of SLURM_STEP_TASKS_PER_NODE,
  ``NODE_RANK`` = ``GROUP_RANK`` = SLURM_NODEID;
- ``MASTER_ADDR``: the first node of SLURM_JOB_NODELIST (expanded by ``scontrol show hostnames``),
  mapped to the NodeAddr Slurm itself uses for it (``scontrol show node``) and resolved to an IP
  address; a name that resolves only to loopback in a multi-node job is an error, not a hang;
- ``MASTER_PORT``: 20000 + 10 * (SLURM_JOB_ID % 1000) + SLURM_RESTART_COUNT % 10, so that
  concurrent jobs and a requeued job's new run do not meet an old listener.

MASTER_ADDR / MASTER_PORT already in the environment win: slurm/pretrain.sbatch resolves the
address once per job (``--print-master-addr``) so that a thousand tasks do not each query slurmctld.

Logs: the command's stdout and stderr go to ``DIR/rank-NNNNN.log`` (appended, one file per rank,
a header line per run, so a requeued job's runs follow each other) and, prefixed with ``[rank N]``,
to this task's stdout, which srun gathers into the job log. ``--job-log-ranks 0,15`` limits the
job-log copy to those ranks; the per-rank files always get everything.

Signals: Slurm delivers a step's signals (``--signal=USR1@T``, ``scancel --signal``, srun forwarding,
the TERM before a kill) to every process of the step, the trainer included. This entry therefore
only notes them and keeps copying output until the trainer has saved and exited, then exits with
the trainer's status (128 + N when signal N killed it). ``--signal-marker PATH``: on SIGUSR1 (the
pre-emption signal) it creates PATH, which tells the batch script to requeue the job even when
Slurm signalled only the step (``--signal=USR1@T`` without ``B:``) and the trainer exited 0 after
saving; a non-zero exit would make ``srun --kill-on-bad-exit`` kill the ranks still shutting down.

Standard library only: it runs before (and outside) the training environment's imports.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

__all__ = ["dist_env", "master_addr", "master_port", "tasks_on_node"]

FORWARDED_BY_SLURM = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class LaunchError(RuntimeError):
    pass


def _require(env, name: str) -> str:
    value = env.get(name)
    if not value:
        raise LaunchError(f"{name} is not set: run this inside a Slurm job step (srun)")
    return value


def tasks_on_node(spec: str, node_id: int) -> int:
    """Tasks on node ``node_id`` from Slurm's compressed list, e.g. ``"8(x2),4"`` -> 8, 8, 4."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot parse the tasks-per-node list {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchError(f"node {node_id} is not in the tasks-per-node list {spec!r}")
    return counts[node_id]


def _scontrol(*args: str) -> str:
    try:
        out = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"scontrol {' '.join(args)} failed: {e}") from None
    if out.returncode != 0:
        raise LaunchError(f"scontrol {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def _resolve(name: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchError(f"cannot resolve {name!r}: {e}") from None
    # IPv4 first: it is what the rendezvous store and gloo bind to on most clusters.
    return sorted({info[4][0] for info in infos}, key=lambda a: (":" in a, a))


def master_addr(nodelist: str, num_nodes: int) -> str:
    """The IP address of the job's first node (see the module docstring)."""
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if not hosts:
        raise LaunchError(f"scontrol show hostnames {nodelist!r} returned no host")
    first = hosts[0]
    m = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", first))
    address = m.group(1) if m else first
    try:
        # An address the administrator configured as NodeAddr is authoritative (even loopback,
        # as on a one-machine test cluster).
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    candidates = _resolve(address)
    routable = [a for a in candidates if not ipaddress.ip_address(a).is_loopback]
    if routable:
        return routable[0]
    if num_nodes > 1:
        raise LaunchError(
            f"the first node {first} (NodeAddr {address}) resolves only to loopback {candidates} "
            "here, which the other nodes cannot reach: export MASTER_ADDR=<its IP address>")
    return candidates[0]


def master_port(job_id: int, restart_count: int) -> int:
    return 20000 + 10 * (job_id % 1000) + restart_count % 10


def _job_master_addr(env) -> str:
    nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return master_addr(_require(env, "SLURM_JOB_NODELIST"), nodes)


def dist_env(env) -> dict[str, str]:
    """torch.distributed variables for this task, from Slurm's environment ``env``."""
    node_id = int(_require(env, "SLURM_NODEID"))
    tasks_spec = env.get("SLURM_STEP_TASKS_PER_NODE") or _require(env, "SLURM_TASKS_PER_NODE")
    out = {
        "RANK": _require(env, "SLURM_PROCID"),
        "WORLD_SIZE": _require(env, "SLURM_NTASKS"),
        "LOCAL_RANK": _require(env, "SLURM_LOCALID"),
        "LOCAL_WORLD_SIZE": str(tasks_on_node(tasks_spec, node_id)),
        "NODE_RANK": str(node_id),
        "GROUP_RANK": str(node_id),
        "MASTER_ADDR": env.get("MASTER_ADDR") or _job_master_addr(env),
        "MASTER_PORT": env.get("MASTER_PORT") or str(
            master_port(int(_require(env, "SLURM_JOB_ID")), int(env.get("SLURM_RESTART_COUNT") or 0))),
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or env.get("SLURM_CPUS_PER_TASK") or "1",
        "PYTHONUNBUFFERED": "1",
    }
    cache = env.get("TRITON_CACHE_DIR")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
    return out


def _rank_set(text: str | None) -> set[int] | None:
    if not text:
        return None
    try:
        return {int(r) for r in text.split(",") if r.strip()}
    except ValueError:
        raise LaunchError(f"--job-log-ranks {text!r}: expected comma-separated ranks, e.g. 0,15") from None


def run(command: list[str], log_dir: Path | None, job_log_ranks: set[int] | None,
        signal_marker: Path | None = None) -> int:
    env = dict(os.environ)
    env.update(dist_env(env))
    rank = int(env["RANK"])
    # A no-op handler rather than SIG_IGN: exec resets handlers (not ignores) to the default, so
    # the trainer starts with default dispositions and installs its own.
    for sig in FORWARDED_BY_SLURM:
        signal.signal(sig, functools.partial(_note_signal, signal_marker))
    rank_log = None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        rank_log = open(log_dir / f"rank-{rank:05d}.log", "ab")
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        rank_log.write(
            f"=== {stamp} job {env.get('SLURM_JOB_ID')} restart {env.get('SLURM_RESTART_COUNT', '0')} "
            f"rank {rank}/{env['WORLD_SIZE']} on {socket.gethostname()} "
            f"(node {env['NODE_RANK']}, local {env['LOCAL_RANK']}), master "
            f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}: {shlex.join(command)!r}\n".encode())
        rank_log.flush()
    to_job_log = job_log_ranks is None or rank in job_log_ranks
    prefix = f"[rank {rank}] ".encode()
    try:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as e:
        raise LaunchError(f"cannot start {command[0]!r}: {e}") from None
    try:
        for line in iter(proc.stdout.readline, b""):
            if rank_log is not None:
                rank_log.write(line)
                rank_log.flush()
            if to_job_log:
                sys.stdout.buffer.write(prefix + line)
                sys.stdout.buffer.flush()
    finally:
        rc = proc.wait()
        if rank_log is not None:
            rank_log.write(f"=== exit status {rc}\n".encode())
            rank_log.close()
    return 128 - rc if rc < 0 else rc


def _note_signal(marker: Path | None, signum, frame) -> None:
    """The trainer got the same signal from Slurm and acts on it; here it is only recorded."""
    if signum == signal.SIGUSR1 and marker is not None:
        marker.touch()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--log-dir", type=Path, default=None, help="per-rank log files go here")
    p.add_argument("--job-log-ranks", default=None,
                   help="only these ranks' output goes to the job log (default: all)")
    p.add_argument("--signal-marker", type=Path, default=None,
                   help="create this file when SIGUSR1 (pre-emption) arrives")
    p.add_argument("--print-master-addr", action="store_true",
                   help="print the resolved MASTER_ADDR for this job and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.print_master_addr:
            print(_job_master_addr(os.environ))
            return 0
        if not command:
            p.error("no command given after --")
        return run(command, args.log_dir, _rank_set(args.job_log_ranks), args.signal_marker)
    except LaunchError as e:
        print(f"slurm_entry: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
