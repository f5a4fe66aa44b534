"""launch/: the Slurm node-side entry's mapping, address resolution, logs and signals; the
single-node torchrun launcher's logs and exit status. No Slurm cluster needed (see
test_slurm_jobs.py for the real one)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from launch import slurm_entry

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "launch" / "slurm_entry.py"

SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
              "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_STEP_TASKS_PER_NODE": "8(x2)",
              "SLURM_JOB_NODELIST": "gpu[017-018]"}


def _clean_environ() -> dict[str, str]:
    """This process's environment without Slurm's or torch.distributed's variables (tests may run
    inside a Slurm job)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}


def test_tasks_on_node():
    assert [slurm_entry.tasks_on_node("8(x2),4", n) for n in range(3)] == [8, 8, 4]
    assert slurm_entry.tasks_on_node("2", 0) == 2
    with pytest.raises(slurm_entry.LaunchError, match="cannot parse"):
        slurm_entry.tasks_on_node("8x2", 0)
    with pytest.raises(slurm_entry.LaunchError, match="node 3"):
        slurm_entry.tasks_on_node("8(x2)", 3)


def test_dist_env_maps_slurm_variables():
    env = slurm_entry.dist_env({**SLURM_TASK, "MASTER_ADDR": "10.0.0.17", "SLURM_CPUS_PER_TASK": "12"})
    assert env["RANK"] == "9" and env["WORLD_SIZE"] == "16" and env["LOCAL_RANK"] == "1"
    assert env["LOCAL_WORLD_SIZE"] == "8" and env["NODE_RANK"] == env["GROUP_RANK"] == "1"
    assert env["MASTER_ADDR"] == "10.0.0.17"
    assert env["MASTER_PORT"] == str(slurm_entry.master_port(4242, 0)) == "22420"
    assert env["OMP_NUM_THREADS"] == "12"
    with pytest.raises(slurm_entry.LaunchError, match="SLURM_PROCID is not set"):
        slurm_entry.dist_env({k: v for k, v in SLURM_TASK.items() if k != "SLURM_PROCID"})


def test_master_port_differs_between_jobs_and_restarts():
    ports = {slurm_entry.master_port(job, restart) for job in range(5000, 6000) for restart in range(10)}
    assert len(ports) == 10_000 and min(ports) >= 20000 and max(ports) < 30000


@pytest.fixture
def fake_scontrol(tmp_path, monkeypatch):
    """An scontrol that knows two nodes whose NodeAddr is written to tmp_path/nodeaddr."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$1 $2" in
          "show hostnames") echo gpu017; echo gpu018 ;;
          "show node") echo "NodeName=$4 Arch=x86_64 NodeAddr=$(cat {tmp_path}/nodeaddr) NodeHostName=$4" ;;
          *) exit 1 ;;
        esac
        """))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path / "nodeaddr"


def test_master_addr_resolution(fake_scontrol):
    fake_scontrol.write_text("10.1.2.3")
    assert slurm_entry.master_addr("gpu[017-018]", 2) == "10.1.2.3"
    # A name is resolved to an address; one that resolves only to loopback cannot serve other nodes.
    fake_scontrol.write_text("localhost")
    assert slurm_entry.master_addr("gpu017", 1) in ("127.0.0.1", "::1")
    with pytest.raises(slurm_entry.LaunchError, match="only to loopback.*export MASTER_ADDR"):
        slurm_entry.master_addr("gpu[017-018]", 2)
    fake_scontrol.write_text("no-such-host.invalid")
    with pytest.raises(slurm_entry.LaunchError, match="cannot resolve 'no-such-host.invalid'"):
        slurm_entry.master_addr("gpu[017-018]", 2)


def test_entry_logs_per_rank_survives_usr1_and_exits_with_the_command_status(tmp_path):
    # The command gets USR1 like every process of a Slurm step (here sent to the entry, its
    # parent, and to itself), saves, prints and exits 3.
    command = textwrap.dedent("""\
        import os, signal, sys, time
        got = []
        signal.signal(signal.SIGUSR1, lambda *a: got.append(1))
        print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], "at",
              os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], flush=True)
        os.kill(os.getppid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.5)
        print("saved after signal", bool(got), flush=True)
        sys.exit(3)
        """)
    marker = tmp_path / "usr1.marker"
    env = {**_clean_environ(), **SLURM_TASK, "MASTER_ADDR": "10.0.0.17"}
    out = subprocess.run([sys.executable, str(ENTRY), "--log-dir", str(tmp_path / "logs"),
                          "--signal-marker", str(marker), "--", sys.executable, "-c", command],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout.splitlines() == ["[rank 9] rank 9 of 16 at 10.0.0.17 22420",
                                       "[rank 9] saved after signal True"]
    assert marker.exists()
    log = (tmp_path / "logs" / "rank-00009.log").read_text().splitlines()
    assert log[0].startswith("=== ") and "job 4242 restart 0 rank 9/16" in log[0]
    assert log[1:] == ["rank 9 of 16 at 10.0.0.17 22420", "saved after signal True", "=== exit status 3"]

    # --job-log-ranks keeps other ranks out of the job log, not out of their own file.
    out = subprocess.run([sys.executable, str(ENTRY), "--log-dir", str(tmp_path / "logs"),
                          "--job-log-ranks", "0,15", "--", sys.executable, "-c", "print('quiet')"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == ""
    assert "quiet" in (tmp_path / "logs" / "rank-00009.log").read_text()


def test_entry_outside_slurm_fails_clearly():
    out = subprocess.run([sys.executable, str(ENTRY), "--", "true"], env=_clean_environ(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "slurm_entry: error: SLURM_NODEID is not set: run this inside a Slurm job step" in out.stderr


def test_single_node_launcher_writes_rank_logs_and_returns_failure(tmp_path):
    """Two ranks under torchrun that both reject their configuration (TP 3 of 2 ranks)."""
    env = {**os.environ, "NPROC_PER_NODE": "2", "LOG_DIR": str(tmp_path / "logs"), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run(["bash", str(REPO / "launch" / "torchrun.sh"), "--model", "swa_gdn2_tiny",
                          "--tensor-model-parallel-size", "3", "--train-data", str(tmp_path / "none")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    job_log = (tmp_path / "logs" / "job.log").read_text()
    assert "2 processes on" in job_log and "gdn2-pretrain: error:" in job_log
    # every rank gets its own log; torchrun stops the other rank as soon as one has failed, so
    # only the first to fail is sure to have written its error
    logs = [(tmp_path / "logs").glob(f"*/attempt_0/{rank}/stderr.log") for rank in (0, 1)]
    texts = [stderr.read_text() for [stderr] in (list(found) for found in logs)]
    assert any("gdn2-pretrain: error:" in text for text in texts), texts
