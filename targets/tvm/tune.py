"""MetaSchedule tuning of the TVM target's libraries: tune once into a database, apply it when compiling.

Why shapes are specialised: MetaSchedule tunes static shapes only (it extracts no task from a
PrimFunc with a symbolic extent), while every library of a bundle is shape-generic (batch,
sequence and the expert kernels' token count are symbolic). Untuned, each fused operator gets
the fixed default schedule of :mod:`.cpu_schedule` (so do the operators a database has no
record for); tuning searches for better ones. So each library gets static copies of its ``main``
for the shapes a device typically sees, behind a shape dispatch, and keeps the generic
function for every other shape:

* expert kernels (rows are independent): one static copy per token *bucket*
  (:data:`DEFAULT_TOKEN_BUCKETS`); ``n`` tokens run in the smallest bucket ``>= n``, padded with
  zero rows that are sliced off again (at most 4x the work of ``n`` rows, in a tuned kernel);
  more tokens than the largest bucket run the generic kernel;
* trunk segments, gates and heads: one static copy at the tuned batch (and sequence length),
  taken only on an exact match, since padding would change attention and normalisation.

Both tuning and compiling build the same dispatch module, legalize and fuse it as the Relax
CPU pipeline does, so the database's workloads are found again by structural equality
(weights are Relax constants, not part of the PrimFuncs: blocks of equal shape share records).
The shapes a database was tuned for are stored next to it (:data:`SHAPES_FILE`) and the
compile reads them from there.

Search: random schedule sampling (``replay-trace``) scored by measurement only (cost model
``random``). With the small budgets this is meant for (tens of trials per task), an
evolutionary search guided by a learned cost model (``xgb``, which needs ``xgboost``) has too
few measurements to train on; ``search="evolutionary"`` with ``cost_model="xgb"`` is available
for long runs where xgboost is installed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from ...frontends import GraphPartition
from .target import _runs_here, import_partition, tvm_target
from .tuning_db import DEFAULT_SHAPES, SHAPES_FILE, TuningShapes, _is_static, legalize_and_fuse, read_shapes, specialise

WORKER_TIMEOUT_S = 300.0


def _in_process_builder():
    """A MetaSchedule builder that compiles candidates in this process.

    MetaSchedule's LocalBuilder starts a fresh pool of worker processes for every batch, each
    importing tvm and torch (seconds per batch; tens under load), which dominated small budgets.
    Candidates are schedules of one PrimFunc built by LLVM, so building them here is safe;
    measuring still happens in the LocalRunner's worker.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(bi.mod, bi.target, None)), None))
                except Exception as exc:  # a candidate LLVM rejects is a failed trial, not a failed tune
                    results.append(BuilderResult(None, f"in-process build failed: {exc}"))
            return results

    return InProcessBuilder()


def tuning_target(target: dict):
    """``target`` plus the ``num-cores`` MetaSchedule's parallel rules need (physical cores of this machine)."""
    import psutil
    import tvm

    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return tvm.target.Target({**target, "num-cores": int(cores)})


@dataclass(frozen=True)
class TuneTask:
    """One static PrimFunc to tune, with the partitions it was found in."""

    name: str
    mod: object
    partitions: tuple[str, ...]


def extract_static_tasks(parts: list[GraphPartition], target, shapes: TuningShapes, progress=lambda _m: None):
    """The distinct static PrimFuncs of the partitions' specialised modules (symbolic ones cannot be tuned).

    Raises:
        TargetError: torch.export or Relax fails on a partition.
    """
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    tasks: list[TuneTask] = []
    for part in parts:
        progress(f"import {part.name}")
        mod = legalize_and_fuse(specialise(import_partition(part), part, shapes), target)
        for task in ms.relax_integration.extract_tasks(mod, target):
            func_mod = task.dispatched[0]
            if not _is_static(func_mod["main"]):
                continue
            same = next((i for i, t in enumerate(tasks) if tvm_ffi.structural_equal(t.mod, func_mod)), None)
            if same is None:
                tasks.append(TuneTask(f"{part.name}.{task.task_name}", func_mod, (part.name,)))
            elif part.name not in tasks[same].partitions:
                t = tasks[same]
                tasks[same] = TuneTask(t.name, t.mod, (*t.partitions, part.name))
    return tasks


def tune_partitions(
    parts: list[GraphPartition],
    target,
    db_dir: str | Path,
    trials: int,
    shapes: TuningShapes = DEFAULT_SHAPES,
    *,
    search: str = "replay-trace",
    cost_model: str = "random",
    seed: int = 0,
    rpc: str | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Tune the static PrimFuncs of partitions with MetaSchedule into a JSON database folder.

    Args:
        parts: Partitions to tune (specialised for ``shapes``).
        target: The TVM target dict the libraries are built for (``tvm_target``; ``num-cores`` is
            added for tuning).
        db_dir: Database folder (created; records already there are kept and added to).
        trials: Measured candidates in all, split evenly over the tasks (at least one each).
        shapes: Shapes to specialise for; written next to the database.
        search: MetaSchedule search strategy (``replay-trace``: random sampling; ``evolutionary``).
        cost_model: ``random`` (measurements only) or ``xgb`` (needs xgboost).
        seed: Seed of the search.
        rpc: ``tracker:HOST:PORT:KEY``: measure candidates on the boards registered with that TVM
            RPC tracker under KEY (built here as object files; the board's RPC server links and
            runs them). None: measure on this machine.
        progress: Called with one message per step.

    Returns:
        Summary: tasks (name, partitions, best measured ms), trials, seconds, where it measured.

    Raises:
        ConfigError: ``trials`` < 1, or ``db_dir`` holds a database tuned for other shapes.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    if trials < 1:
        raise ConfigError(f"tuning needs at least one trial, got {trials}")
    runner = _runner(rpc)  # a bad address fails before minutes of work
    db_dir = Path(db_dir)
    if (db_dir / SHAPES_FILE).exists() and read_shapes(db_dir) != shapes:
        raise ConfigError(f"{db_dir} was tuned for {read_shapes(db_dir).to_json()}, not {shapes.to_json()}")
    db_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tasks = extract_static_tasks(parts, tvm.target.Target(target), shapes, progress)
    if not tasks:
        raise ConfigError("no static operator to tune: the partitions have no dynamic axis the shapes name")
    per_task = max(1, trials // len(tasks))
    progress(f"tune {len(tasks)} tasks x {per_task} trials ({search}, cost model {cost_model})")
    ttarget = tuning_target(target)
    cores = int(ttarget.attrs["num-cores"])
    progress("load TVM's tensor intrinsics")
    _import_tensor_intrinsics()
    # MetaSchedule's logging setup re-declares its logger's handlers by name and fails on one
    # without a name (a log-capture handler a harness attached); dictConfig would drop it anyway.
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    for handler in [h for h in ms_logger.handlers if h.get_name() is None]:
        ms_logger.removeHandler(handler)
    loggers = get_loggers_from_work_dir(str(db_dir), [t.name for t in tasks])
    contexts = [
        ms.TuneContext(
            mod=t.mod,
            target=ttarget,
            space_generator="post-order-apply",
            search_strategy=search,
            task_name=t.name,
            logger=logger,
            rand_state=rand,
            num_threads=cores,
        ).clone()
        for t, logger, rand in zip(tasks, loggers, fork_seed(seed, len(tasks)), strict=True)
    ]
    database = ms.database.JSONDatabase(work_dir=str(db_dir))
    ms.tune_tasks(
        tasks=contexts,
        task_weights=[1.0] * len(contexts),
        work_dir=str(db_dir),
        max_trials_global=per_task * len(tasks),
        max_trials_per_task=per_task,
        num_trials_per_iter=min(per_task, 64),
        # The runner's one worker process imports tvm (and torch, through tvm_ffi) once; on a
        # loaded machine that alone can pass MetaSchedule's 30 s default.
        builder=_in_process_builder(),
        runner=runner,
        database=database,
        cost_model=cost_model,
        task_scheduler="round-robin",
    )
    meta = {**shapes.to_json(), "target": {**target, "num-cores": cores}}
    (db_dir / SHAPES_FILE).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    summary = []
    for t in tasks:
        best = database.get_top_k(database.commit_workload(t.mod), 1)
        secs = [float(s) for s in best[0].run_secs] if best and best[0].run_secs else []
        ok = [s for s in secs if math.isfinite(s) and s < 1e9]
        summary.append({"task": t.name, "partitions": list(t.partitions), "best_ms": min(ok) * 1e3 if ok else None})
    tuned = sum(1 for s in summary if s["best_ms"] is not None)
    progress(f"{tuned}/{len(tasks)} tasks have a working schedule ({time.perf_counter() - start:.0f} s)")
    return {
        "database": str(db_dir),
        "shapes": shapes.to_json(),
        "target": str(ttarget),
        "search": search,
        "cost_model": cost_model,
        "trials_per_task": per_task,
        "measured_on": rpc or "this machine",
        "tasks": summary,
        "seconds": time.perf_counter() - start,
        "tvm": tvm.__version__,
    }


def _import_tensor_intrinsics() -> None:
    """Import TVM's tensor intrinsics (MetaSchedule's TuneContext does) in a third of the time.

    They are hundreds of TVMScript functions, each calling ``inspect.stack()`` while its module
    imports; for each importlib frame on that stack (a file named ``<frozen importlib._bootstrap>``,
    not on disk) ``inspect.getmodule`` scans all of ``sys.modules``: 29 s of the import with torch
    loaded here, 9 s once inspect's file cache names those two files' modules. The lookups answer
    the same (neither module's source is available).
    """
    import importlib._bootstrap
    import importlib._bootstrap_external
    import inspect

    for module in (importlib._bootstrap, importlib._bootstrap_external):
        inspect.modulesbyfile.setdefault(f"<frozen {module.__name__}>", module.__name__)
    import tvm.s_tir.tensor_intrin  # noqa: F401


def _runner(rpc: str | None):
    """MetaSchedule's runner: a local worker, or the boards behind a TVM RPC tracker.

    Raises:
        ConfigError: ``rpc`` is not a tracker address (MetaSchedule asks a tracker for boards).
    """
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=20)
    if rpc is None:
        return ms.runner.LocalRunner(timeout_sec=WORKER_TIMEOUT_S, evaluator_config=evaluator)
    from ...errors import RemoteError
    from .remote import parse_address

    try:
        address = parse_address(rpc)
    except RemoteError as exc:
        raise ConfigError(str(exc)) from None
    if address.kind != "tracker":
        raise ConfigError(f"tuning on remote boards goes through a TVM RPC tracker: tracker:HOST:PORT:KEY, not '{rpc}'")
    config = ms.runner.RPCConfig(
        tracker_host=address.host,
        tracker_port=address.port,
        tracker_key=address.key,
        session_timeout_sec=WORKER_TIMEOUT_S,
    )
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=1)


TUNED_KINDS = ("expert_kernel", "segment")


def tune_model(
    model: str,
    db_dir: str | Path,
    trials: int,
    *,
    device: str = "host",
    shapes: TuningShapes = DEFAULT_SHAPES,
    kinds: tuple[str, ...] = TUNED_KINDS,
    weights: str | None = None,
    seed: int = 0,
    rpc: str | None = None,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Tune a model's TVM libraries (by default its expert kernels and trunk segments) for ``device``.

    The partitions are those ``edgemoe compile --target tvm`` builds (unpruned: pruning masks
    gates and drops expert weights, neither of which changes a kernel or a segment).

    Candidates are measured on this machine, or with ``rpc`` (``tracker:HOST:PORT:KEY``) on the
    boards of a TVM RPC tracker, e.g. ``--device raspberry-pi-5`` measured on Raspberry Pis.

    Raises:
        ConfigError: Unknown partition kind, ``trials`` < 1, a CUDA device, or a device that is not
            this CPU without ``rpc``.
    """
    from ...compiler import run_stages
    from ...config import CompileConfig
    from ...devices import get_device
    from ...stages import CompileState

    unknown = set(kinds) - {"expert_kernel", "segment", "gate", "head"}
    if unknown:
        raise ConfigError(f"unknown partition kinds {sorted(unknown)} (expert_kernel, segment, gate, head)")
    profile_dev = get_device(device)
    if profile_dev.cuda_arch:
        raise ConfigError(f"tuning CUDA libraries ({device}, {profile_dev.cuda_arch}) is not supported yet")
    if not _runs_here(profile_dev) and rpc is None:
        raise ConfigError(
            f"device {device} is not this CPU: measure on the board with --rpc tracker:HOST:PORT:KEY, or --device host"
        )
    # The compiler's own stages up to the partition plan: the partitions tuned are the ones compiled.
    cfg = CompileConfig(
        model=model, target="tvm", device=device, weights=weights, prune=False, calib_samples=1, calib_seed=0
    )
    plan = run_stages(cfg, CompileState(None, progress), until="partition").plan
    parts = [p for p in plan.graphs() if p.kind in kinds]
    out = tune_partitions(parts, tvm_target(profile_dev), db_dir, trials, shapes, seed=seed, rpc=rpc, progress=progress)
    return {"model": model, "device": device, "partitions": [p.name for p in parts], **out}
