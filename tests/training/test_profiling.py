"""--profile: the overlap arithmetic, and a real profiled CPU run writing its Chrome trace."""
from __future__ import annotations

import gzip
import json

import pytest

from megatron_gdn2.training.profiling import covered_time
from tests.harness import run_distributed
from tests.training.common import make_config, train


@pytest.mark.parametrize("intervals, cover, expected", [
    ([(0, 10)], [], 0),
    ([(0, 10)], [(20, 30)], 0),                    # disjoint
    ([(0, 10)], [(2, 4), (6, 7)], 3),              # two pieces inside
    ([(0, 10)], [(-5, 3), (2, 6), (8, 20)], 8),    # overlapping cover counted once: [0, 6] + [8, 10]
    ([(0, 4), (2, 6)], [(3, 5)], 3),               # overlapping intervals each counted
])
def test_covered_time(intervals, cover, expected):
    assert covered_time(intervals, cover) == pytest.approx(expected)


def test_profiled_run_writes_a_trace(corpus, tmp_path):
    cfg = make_config(corpus, tmp_path / "run", iters=3, logging__profile=True, logging__profile_step_start=2,
                      logging__profile_step_end=3, logging__eval_iters=0)
    ((out,),) = run_distributed(train, world_size=1, args=([cfg.to_dict()],))
    assert sorted(out["train"]) == [1, 2, 3]
    with gzip.open(tmp_path / "run" / "profile" / "trace_rank0.json.gz", "rt") as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(name.startswith("aten::mm") for name in names), sorted(names)[:20]
