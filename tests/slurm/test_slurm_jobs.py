"""The slurm/ scripts on a real Slurm cluster: two fake nodes on this machine (tests/slurm/local_slurm.sh).

Everything is submitted with ``sbatch`` exactly as a user would, with the CPU override
(DEVICE=cpu, ``--gpus-per-node=0 --ntasks-per-node=1``): preprocessing of real text, a 2-node
TP=2 pretraining job that is pre-empted with USR1, checkpoints, requeues itself and resumes, a
``--dependency=singleton`` job chained behind it that continues at PP=2, and the fail-fast cases.
Needs root (it starts munged/slurmctld/slurmd and may ``apt-get install slurm-wlm munge``).
"""
from __future__ import annotations

import gzip
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.shared_data import SHARED_DATA

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "tests" / "slurm" / "local_slurm.sh"
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
PREPROCESS = REPO / "slurm" / "preprocess.sbatch"
CONVERT = REPO / "slurm" / "convert_hf.sbatch"
WIKI = SHARED_DATA / "corpora" / "wikipedia_vital_summaries" / "enwiki_vital4_summaries.jsonl.gz"
GPT2 = SHARED_DATA / "tokenizers" / "gpt2"

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
CPU_OVERRIDE = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0"]
TRAIN_ITERS = 30
CHAINED_ITERS = 40

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0,
                       reason="needs root: starts munged, slurmctld and slurmd (and apt-get installs "
                              "slurm-wlm + munge when missing)"),
]


def _free_port_run(count: int) -> int:
    """First of `count` consecutive free TCP ports, outside the range the jobs' MASTER_PORT uses."""
    for base in random.sample(range(41000, 49000, count), 200):
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free ports for the Slurm daemons")


@dataclass
class Cluster:
    env: dict[str, str]
    root: Path

    def run(self, *cmd: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 60):
        return subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)

    def sbatch(self, script: Path, *flags: str, args: tuple = (), cwd: Path, env: dict) -> int:
        out = self.run("sbatch", "--parsable", *flags, str(script), *args, cwd=cwd, env=env)
        assert out.returncode == 0, f"sbatch {script.name} failed: {out.stderr}"
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        assert out.returncode == 0, out.stderr
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait(self, job_id: int, timeout: float, log: Path) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in TERMINAL:
                return info
            time.sleep(0.3)
        self.run("scancel", str(job_id))
        pytest.fail(f"job {job_id} still {info['JobState']} after {timeout:.0f} s; its log:\n{_tail(log)}")


def _tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else f"({path} missing)"


@pytest.fixture(scope="module")
def cluster():
    # Short root: the munge socket path must fit in a unix socket address.
    root = Path(tempfile.mkdtemp(prefix="gdn2-slurm-", dir="/tmp"))
    port = _free_port_run(3)
    env = {**os.environ, "SLURM_ROOT": str(root), "NNODES": "2", "CTLD_PORT": str(port),
           "NODE_PORT_BASE": str(port + 1), "SLURM_CONF": str(root / "etc" / "slurm.conf")}
    try:
        up = subprocess.run(["bash", str(LOCAL_SLURM), "up"], env=env, capture_output=True, text=True,
                            timeout=900)
        if up.returncode != 0:
            pytest.fail(f"could not start the local Slurm cluster:\n{up.stdout}\n{up.stderr}")
        # The jobs run this interpreter; one thread per rank on a machine the fake nodes share.
        env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
        yield Cluster(env=env, root=root)
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "down"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="gdn2-slurm-jobs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dataset(cluster, workdir):
    """The first 2,000 Wikipedia summaries, tokenized by slurm/preprocess.sbatch."""
    if not WIKI.exists():
        pytest.fail(f"missing real data {WIKI} (../shared/data)")
    raw = workdir / "raw" / "wiki_2000.jsonl"
    raw.parent.mkdir()
    with gzip.open(WIKI, "rt") as src, raw.open("w") as dst:
        for _, line in zip(range(2000), src):
            dst.write(line)
    prefix = workdir / "data" / "wiki"
    prefix.parent.mkdir()
    env = {"INPUT": str(raw), "OUTPUT_PREFIX": str(prefix), "TOKENIZER": str(GPT2)}
    job = cluster.sbatch(PREPROCESS, "--cpus-per-task=2", cwd=workdir, env=env)
    info = cluster.wait(job, 300, workdir / f"gdn2-preprocess-{job}.out")
    log = (workdir / f"gdn2-preprocess-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "wrote" in log and "2000 documents" in log, log
    return prefix


def _pretrain_env(dataset: Path, ckpt: Path, **overrides) -> dict[str, str]:
    return {"DEVICE": "cpu", "MODEL": "swa_gdn2_tiny", "TP": "2", "PP": "1", "DATA_PATH": str(dataset),
            "TOKENIZER": str(GPT2), "CKPT_DIR": str(ckpt), "SEQ_LENGTH": "64", "MICRO_BATCH_SIZE": "2",
            "GLOBAL_BATCH_SIZE": "4", "SAVE_INTERVAL": "1000",
            "TRITON_CACHE_ROOT": str(ckpt.parent / "triton"), **overrides}


TRAINER_FLAGS = ("--lr-warmup-tokens", "256", "--log-interval", "1", "--eval-interval", "1000",
                 "--eval-iters", "1")
# The first checkpoint saved after the trainer reported the signal.
SAVED_ON_SIGNAL = re.compile(r"received SIGUSR1: saving a checkpoint.*\n(?:.*\n)*?"
                             r".*saved checkpoint \S+/iter_(\d{7})")
RESUMED = re.compile(r"resumed from \S+/iter_(\d{7}): iter (\d+)")
ITER_LINE = re.compile(r"^\[rank \d+\] \S+ iter (\d+)/(\d+) \|.*\| loss (\S+) \|", re.M)


def _iterations(text: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(3))) for m in ITER_LINE.finditer(text)]


@dataclass
class Job:
    info: dict[str, str]
    log: str


def _signal_after(cluster: Cluster, job_id: int, log: Path, iteration: int, *scancel_flags: str) -> None:
    """USR1 to the job once its log shows `iteration`, as Slurm sends it before the time limit."""
    deadline = time.monotonic() + 240
    pattern = re.compile(rf"\] \S+ iter {iteration}/")
    while not (log.exists() and pattern.search(log.read_text())):
        if time.monotonic() > deadline or cluster.job(job_id)["JobState"] in TERMINAL:
            pytest.fail(f"job {job_id} never reached iteration {iteration}:\n{_tail(log)}")
        time.sleep(0.2)
    out = cluster.run("scancel", "--signal=USR1", *scancel_flags, str(job_id))
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def preempted_runs(cluster, dataset, workdir):
    """Job A trains TRAIN_ITERS steps at TP=2; USR1 reaches its batch shell early on (as with
    #SBATCH --signal=B:USR1@T). Job B, submitted at the same time with --dependency=singleton,
    starts when A has finished, continues A's checkpoint at PP=2, and gets USR1 in its job step
    only (as with --signal=USR1@T). Both must save, requeue themselves and resume."""
    name = "gdn2-chain"
    ckpt = workdir / "ckpt"
    a = cluster.sbatch(PRETRAIN, *CPU_OVERRIDE, f"--job-name={name}", args=TRAINER_FLAGS, cwd=workdir,
                       env=_pretrain_env(dataset, ckpt, TRAIN_ITERS=str(TRAIN_ITERS)))
    b = cluster.sbatch(PRETRAIN, *CPU_OVERRIDE, f"--job-name={name}", "--dependency=singleton",
                       args=TRAINER_FLAGS, cwd=workdir,
                       env=_pretrain_env(dataset, ckpt, TP="1", PP="2", TRAIN_ITERS=str(CHAINED_ITERS)))
    log_a, log_b = workdir / f"{name}-{a}.out", workdir / f"{name}-{b}.out"
    _signal_after(cluster, a, log_a, 2, "--batch")
    info_a = cluster.wait(a, 300, log_a)
    _signal_after(cluster, b, log_b, TRAIN_ITERS + 2)
    info_b = cluster.wait(b, 300, log_b)
    return {"a": Job(info_a, log_a.read_text()), "b": Job(info_b, log_b.read_text()),
            "ckpt": ckpt, "rank_logs": workdir / "logs" / f"{name}-{a}"}


def _check_requeued(job: Job, first_iter: int, last_iter: int) -> int:
    """The job completed after one requeue, its second run resuming at the step its first saved;
    returns that step."""
    log = job.log
    assert job.info["JobState"] == "COMPLETED" and job.info["ExitCode"] == "0:0", log
    assert job.info["Restarts"] == "1", log
    assert "pre-empted: requeueing job" in log and "(restart 1) on 2 nodes" in log
    saved = SAVED_ON_SIGNAL.search(log)
    assert saved, log
    step = int(saved.group(1))
    assert first_iter <= step < last_iter, log
    resumed = list(RESUMED.finditer(log))[-1]
    assert int(resumed.group(1)) == step and int(resumed.group(2)) == step, log
    before, after = log[:resumed.start()], log[resumed.end():]
    assert [i for i, _ in _iterations(before)] == list(range(first_iter, step + 1))
    assert [i for i, _ in _iterations(after)] == list(range(step + 1, last_iter + 1))
    assert log.rstrip().endswith(f"srun exited with status 0; latest checkpoint: {last_iter}"), log[-2000:]
    return step


def test_batch_signal_checkpoints_requeues_and_resumes(preempted_runs):
    job = preempted_runs["a"]
    _check_requeued(job, 1, TRAIN_ITERS)
    assert "USR1: asking the step to save a checkpoint and stop" in job.log


def test_step_signal_checkpoints_requeues_and_resumes(preempted_runs):
    job = preempted_runs["b"]
    _check_requeued(job, TRAIN_ITERS + 1, CHAINED_ITERS)
    assert "USR1: asking the step" not in job.log  # only the step got it: the entry's marker requeued


def test_singleton_job_runs_after_and_resumes_at_another_layout(preempted_runs):
    first, chained = preempted_runs["a"], preempted_runs["b"]
    assert chained.info["StartTime"] >= first.info["EndTime"]
    assert "TP 1 x PP 2 x DP 1" in chained.log, chained.log
    resumed = RESUMED.search(chained.log)
    assert resumed and resumed.groups() == (f"{TRAIN_ITERS:07d}", str(TRAIN_ITERS)), chained.log


def test_loss_log(preempted_runs):
    runs = ((preempted_runs["a"], TRAIN_ITERS), (preempted_runs["b"], CHAINED_ITERS - TRAIN_ITERS))
    for job, steps in runs:
        losses = [loss for _, loss in _iterations(job.log)]
        assert len(losses) == steps
        assert all(math.isfinite(x) for x in losses)
        # A tiny model over GPT-2's 50k vocabulary starts near ln(50257) = 10.8.
        assert all(9.0 < x < 11.5 for x in losses), losses


def test_checkpoints_and_rank_logs(preempted_runs):
    ckpt = preempted_runs["ckpt"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(CHAINED_ITERS)
    for step in (TRAIN_ITERS, CHAINED_ITERS):
        assert (ckpt / f"iter_{step:07d}" / "metadata.json").is_file()
    assert not list(ckpt.glob("*.tmp"))
    for rank in (0, 1):
        text = (preempted_runs["rank_logs"] / f"rank-{rank:05d}.log").read_text()
        headers = re.findall(r"^=== \S+ job \d+ restart (\d+) rank (\d+)/2 ", text, re.M)
        assert headers == [("0", str(rank)), ("1", str(rank))], text[:2000]
        assert text.count("=== exit status 0") == 2


def test_convert_to_hf(cluster, preempted_runs, workdir):
    hf_dir = workdir / "hf"
    job = cluster.sbatch(CONVERT, "--cpus-per-task=2", args=("--dtype", "fp32"), cwd=workdir,
                         env={"CKPT_DIR": str(preempted_runs["ckpt"]), "HF_DIR": str(hf_dir)})
    log_path = workdir / f"gdn2-convert-{job}.out"
    info = cluster.wait(job, 240, log_path)
    log = log_path.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert f"exported {preempted_runs['ckpt']}/iter_{CHAINED_ITERS:07d}" in log, log
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize("case", ["not-divisible", "missing-data", "missing-ckpt-parent", "missing-load-dir"])
def test_fail_fast(cluster, dataset, workdir, case):
    base = workdir / f"failfast-{case}"
    base.mkdir()
    env = _pretrain_env(dataset, base / "ckpt")
    flags = list(CPU_OVERRIDE)
    if case == "not-divisible":
        # The script's own header: 2 nodes x 8 GPUs = 16 ranks, not divisible by TP 3.
        env.update(DEVICE="gpu", TP="3")
        flags = []
        expected = "2 nodes x 8 GPUs = 16 ranks is not divisible by TP x PP = 3 x 1 = 3"
    elif case == "missing-data":
        env["DATA_PATH"] = str(base / "no_such_corpus")
        expected = f"DATA_PATH: dataset {base}/no_such_corpus.bin / {base}/no_such_corpus.idx not found"
    elif case == "missing-ckpt-parent":
        env["CKPT_DIR"] = str(base / "no_such_dir" / "ckpt")
        expected = f"CKPT_DIR={base}/no_such_dir/ckpt: its parent directory {base}/no_such_dir does not exist"
    else:
        env["LOAD_DIR"] = str(base / "no_such_checkpoint")
        expected = f"LOAD_DIR={base}/no_such_checkpoint: no such directory"
    job = cluster.sbatch(PRETRAIN, *flags, "--job-name=failfast", args=TRAINER_FLAGS, cwd=base, env=env)
    log_path = base / f"failfast-{job}.out"
    info = cluster.wait(job, 60, log_path)
    log = log_path.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log
    assert f"ERROR: {expected}" in log
    assert "stopped before starting any task" in log
    assert "[rank" not in log
    run_time = info["RunTime"]  # [D-]HH:MM:SS
    assert re.fullmatch(r"00:00:0\d", run_time), f"took {run_time}"
