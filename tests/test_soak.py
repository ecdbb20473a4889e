"""Soak (issue 17): thousands of runs of one live session under a tiny expert budget with prefetch.

The expert cache evicts and reloads on nearly every layer, the prefetcher's loader thread runs
throughout and the session switches task every hundred runs; memory, threads and open files must
stay flat after a warm-up, and every output must equal, bit for bit, that task's first output.

The session runs in a process of its own that imports only the runtime (as on a device): the RSS
of the pytest process would also count what other tests' leftovers (threads, caches) allocate.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc"),
]

RUNS = 1200
WARMUP = 400
SWITCH_EVERY = 100
# RSS may move by allocator noise (a few hundred KiB measured); a leak of a buffer per run or per
# switch (an expert, a graph session) would pass this within a few hundred runs.
MAX_GROWTH = 6 << 20

CHILD = textwrap.dedent(
    """
    import json, os, sys, threading, warnings
    from edgemoe.bundle.format import sample_input
    from edgemoe.runtime import Session

    warnings.simplefilter("ignore")  # the tiny budget thrashes on purpose (ThrashWarning)
    bundle, runs, warmup, every = sys.argv[1], *map(int, sys.argv[2:])

    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def state():
        return [rss(), threading.active_count(), len(os.listdir("/proc/self/fd"))]

    session = Session(bundle, "semseg", memory_budget="10%", prefetch="pregate", threads=1)
    inputs = [sample_input(session.input_spec, seed=seed) for seed in range(2)]
    reference = {}
    for task in ("depth", "semseg"):
        session.switch_task(task)
        reference[task] = [session.run(x).tobytes() for x in inputs]
    baseline, differing = None, []
    for i in range(runs):
        if i % every == every - 1:
            session.switch_task("depth" if session.task == "semseg" else "semseg")
        y = session.run(inputs[i % 2])
        if y.tobytes() != reference[session.task][i % 2]:
            differing.append(i)
        if i == warmup:
            session.wait_prefetch(10)
            baseline = state()
    session.wait_prefetch(10)
    end, stats = state(), session.stats
    session.close()
    print(json.dumps({"baseline": baseline, "end": end, "differing": differing, "evictions": stats.evictions,
                      "prefetch_issued": stats.prefetch_issued, "task_switches": stats.task_switches,
                      "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnx"))}))
    """
)


def test_a_long_session_stays_flat_and_exact(bundle_factory):
    bundle = bundle_factory("m3vit-micro")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(bundle), str(RUNS), str(WARMUP), str(SWITCH_EVERY)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout)
    assert res["differing"] == [], "runs that gave other bits than the task's first output"
    assert res["evictions"] > RUNS and res["prefetch_issued"] > RUNS  # the budget was tiny: the cache churned
    assert res["task_switches"] == RUNS // SWITCH_EVERY + 2
    assert res["modules"] == []  # the runtime alone: no torch, no onnx in the process
    (rss0, threads0, files0), (rss, threads, files) = res["baseline"], res["end"]
    assert (threads, files) == (threads0, files0), res
    assert rss - rss0 < MAX_GROWTH, f"RSS grew {(rss - rss0) / 2**20:.1f} MiB after warm-up"
