"""``edgemoe bench``: per-graph and whole-task timings of a bundle, here or on a remote device.

One run of each task records the inputs every graph sees (a graph's timing uses the inputs of
its first call in that run: the expert kernel's token count is that of the first expert routed).
Graph timings come from the executor's own graph timer where its backend has one (TVM's
``time_evaluator`` on the device that runs the graph, local or over RPC: no transfers counted),
else from wall-clock calls. Task timings
are wall-clock :meth:`Session.run` calls on this host; over RPC they include every graph's input
and output transfers and each expert's weights (the expert cache stays on the host).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..bundle.format import read_manifest, sample_input
from ..errors import InputError
from .executor import Timing, executor_class, get_executor
from .session import Session

# Where ``edgemoe bench`` finds a remote device when ``--rpc`` is not given.
REMOTE_ENV = "EDGEMOE_RPC"


def _timing(times_ms: list[float], number: int = 1) -> Timing:
    t = np.asarray(times_ms, dtype=np.float64)
    return Timing(float(np.median(t)), float(t.mean()), float(t.min()), float(t.max()), len(t), number)


def _wall(fn, repeat: int) -> Timing:
    fn()  # warm-up (first-touch allocations, lazy expert loads)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _timing(times)


def bench_bundle(
    bundle: str | Path,
    task: str | None = None,
    rpc: str | None = None,
    repeat: int = 10,
    batch: int = 1,
    timeout: float = 60.0,
    use_env: bool = True,
) -> dict:
    """Time every graph of each task (median over ``repeat``) and each whole task.

    Args:
        bundle: Bundle folder.
        task: One task (default: every task of the bundle).
        rpc: Remote device address (for TVM: ``HOST:PORT``, ``tracker:HOST:PORT:KEY`` or ``local``);
            None: ``$EDGEMOE_RPC`` when ``use_env``, else this host. Remote runs need a backend with
            remote execution.
        repeat: Timed repeats per graph and timed runs per task.
        batch: Batch size of the deterministic sample input.
        timeout: Deadline in seconds for each remote call.
        use_env: Read ``$EDGEMOE_RPC`` when ``rpc`` is None.

    Returns:
        The ``edgemoe bench --json`` object.

    Raises:
        RemoteError: The remote cannot be reached, fails or stops answering.
        BundleError: A remote run of a bundle whose backend has no remote execution, or a graph the
            remote rejects.
        TaskError: Unknown task.
        InputError: ``repeat`` or ``batch`` below 1.
    """
    if repeat < 1 or batch < 1:
        raise InputError(f"--repeat and --batch must be at least 1, got {repeat} and {batch}")
    root = Path(bundle)
    m = read_manifest(root)
    address = rpc if rpc is not None else (os.environ.get(REMOTE_ENV, "").strip() or None) if use_env else None
    cls = executor_class(m["target"]["executor"])
    remote = cls.remote(address, timeout) if address is not None else None
    # Local graphs are timed the way remote ones are where the backend has a timer (TVM: an in-process RPC session).
    timer = remote or cls.graph_timer(timeout)
    try:
        tasks = {}
        for name in [task] if task else list(m["tasks"]):
            tasks.update(_bench_task(root, m, name, remote, timer, repeat, batch))
    finally:
        for ex in {id(e): e for e in (remote, timer) if e is not None}.values():
            ex.close()
    return {
        "bundle": str(root),
        "target": m["target"]["name"],
        "remote": str(remote.address) if remote is not None else None,
        "device": cls.device_kind(m),
        "repeat": repeat,
        "batch": batch,
        "graph_timer": "time_evaluator" if timer is not None else "wall",
        "tasks": tasks,
    }


def _bench_task(root: Path, m: dict, task: str, remote, timer, repeat: int, batch: int) -> dict:
    calls: dict[str, list[tuple[np.ndarray, ...]]] = {}

    def record(name: str, inputs: tuple[np.ndarray, ...]) -> None:
        # Expert weights the executor placed on the device stay there (they do not change while loaded).
        calls.setdefault(name, []).append(
            tuple(np.array(x, copy=True) if isinstance(x, np.ndarray) else x for x in inputs)
        )

    session = Session(root, task, executor=remote)
    x = sample_input(session.input_spec, batch=batch, seed=0)
    whole = _wall(lambda: session.run(x), repeat)
    # A separate session records one run's graph inputs (the timed one runs unwrapped graphs).
    Session(root, session.task, executor=remote, recorder=record).run(x)
    graphs = {}
    for name, seen in calls.items():
        record_ = m["graphs"][name]
        inputs = seen[0]
        if timer is not None:
            timing = timer.load(root, record_).time(*inputs, repeat=repeat)
        else:
            graph = get_executor(m["target"]["executor"]).load(root, record_)
            timing = _wall(lambda g=graph, i=inputs: g.run(*i), repeat)
        graphs[name] = {"calls": len(seen), **timing.to_json()}
    return {
        session.task: {
            "task_ms": whole.to_json(),
            "graph_sum_ms": sum(g["calls"] * g["median_ms"] for g in graphs.values()),
            "graphs": graphs,
        }
    }
