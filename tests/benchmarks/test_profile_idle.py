"""train_throughput's idle table: gaps between kernels on the profile's timeline, counted once
when kernels overlap and named by the kernels on either side."""
from dataclasses import dataclass

from torch.autograd import DeviceType

from tests.benchmarks.test_train_throughput_quick import _load_script


@dataclass
class _Range:
    start: float
    end: float

    def elapsed_us(self) -> float:
        return self.end - self.start


@dataclass
class _Event:
    name: str
    start: float
    end: float
    device_type: DeviceType = DeviceType.CUDA

    @property
    def key(self) -> str:
        return self.name

    @property
    def time_range(self) -> _Range:
        return _Range(self.start, self.end)


def test_idle_gaps_are_summed_per_kernel_pair():
    script = _load_script()
    events = [
        _Event("gemm", 0, 100),
        _Event("host_op", 10, 400, DeviceType.CPU),  # not a kernel: no effect on the gaps
        _Event("copy", 50, 80),       # inside gemm: no gap, and gemm stays the kernel before
        _Event("attention", 130, 200),  # 30 us after gemm
        _Event("gemm", 1200, 1300),     # 1000 us after attention
        _Event("attention", 1330, 1400),  # 30 us after gemm again
    ]
    lines = script.idle_table(events, steps=2)
    assert lines[0].startswith("GPU idle between the first and last kernel: 0.53 ms/step of 0.7")
    rows = [line for line in lines if line.startswith("| 0.")]
    assert rows == ["| 0.500 | 0.5 | `attention` | `gemm` |", "| 0.030 | 1 | `gemm` | `attention` |"]
