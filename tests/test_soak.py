"""Soak (issue 17): thousands of runs of one live session under a tiny expert budget with prefetch.

The expert cache evicts and reloads on nearly every layer, the prefetcher's loader thread runs
throughout and the session switches task every hundred runs; memory, threads and open files must
stay flat after a warm-up, and every output must equal, bit for bit, that task's first output.
"""

import os
import threading
from pathlib import Path

import pytest

from edgemoe.bundle.format import sample_input
from edgemoe.runtime import Session

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc"),
    pytest.mark.filterwarnings("ignore::edgemoe.swap.budget.ThrashWarning"),  # the tiny budget is the point
]

RUNS = 1200
WARMUP = 400
SWITCH_EVERY = 100
# RSS may move by allocator noise (a few hundred KiB measured); a leak of a buffer per run or per
# switch (an expert, a graph session) would pass this within a few hundred runs.
MAX_GROWTH = 6 << 20


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_long_session_stays_flat_and_exact(bundle_factory, one_torch_thread):
    bundle = bundle_factory("m3vit-micro")
    session = Session(bundle, "semseg", memory_budget="10%", prefetch="pregate")
    inputs = [sample_input(session.input_spec, seed=seed) for seed in range(2)]
    reference = {}
    for task in ("depth", "semseg"):
        session.switch_task(task)
        reference[task] = [session.run(x).tobytes() for x in inputs]
    baseline = None
    for i in range(RUNS):
        if i % SWITCH_EVERY == SWITCH_EVERY - 1:
            session.switch_task("depth" if session.task == "semseg" else "semseg")
        y = session.run(inputs[i % 2])
        assert y.tobytes() == reference[session.task][i % 2], f"run {i} ({session.task}) gave other bits"
        if i == WARMUP:
            session.wait_prefetch(10)
            baseline = (_rss(), threading.active_count(), _open_files())
    session.wait_prefetch(10)
    rss, threads, files = _rss(), threading.active_count(), _open_files()
    stats = session.stats
    assert stats.evictions > RUNS and stats.prefetch_issued > RUNS  # the budget was tiny: the cache churned
    assert stats.task_switches == RUNS // SWITCH_EVERY + 2
    assert (threads, files) == baseline[1:], (baseline, threads, files)
    assert rss - baseline[0] < MAX_GROWTH, f"RSS grew {(rss - baseline[0]) / 2**20:.1f} MiB after warm-up"
    session.close()
