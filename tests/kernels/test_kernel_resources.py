"""Every chunk-kernel launch of the Hopper configuration fits the H200's shared memory: each launch
of a forward and backward (bf16 and fp32, K and V from 64 to 256, few to many sequence-heads, with
and without states) compiled offline for sm_90 by benchmarks/kernel_resources.py, which needs no
GPU. A launch that does not fit fails on the GPU with OutOfResources (run 33 spent device time on
one); here it fails on the CPU."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _kernel_resources(*args):
    # the interpreter has no compiler: a fresh process without it
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = str(ROOT / "benchmarks" / "kernel_resources.py")
    return subprocess.run([sys.executable, script, "--arch", "9", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)


def test_hopper_launches_fit_in_shared_memory():
    result = _kernel_resources()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 over the limit" in result.stdout
    # every kernel of the forward and the backward was compiled
    for name in ("cumsum", "scores", "solve", "wy_fwd", "state_fwd", "state_bwd", "wy_bwd", "state_grads",
                 "intra_bwd"):
        assert f"chunk_{name}_kernel " in result.stdout, name


def test_a_launch_over_the_limit_is_reported():
    """Three pipeline stages in the 64-wide state kernels: 237,696 B on the H200 (run 29)."""
    result = _kernel_resources("--cases", "bf16:128:128", "--kernel-config", "state_stages=3")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    assert "OVER THE LIMIT" in result.stdout and "chunk_state_fwd_kernel" in result.stdout
