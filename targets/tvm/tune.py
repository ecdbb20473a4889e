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
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ConfigError, TargetError
from ...frontends import GraphPartition

SHAPES_FILE = "edgemoe_tuning.json"
# Tokens per expert call: m3vit-tiny at batch 1 routes 258 (token, slot) pairs over 16 experts
# (16 per expert on average, up to ~60); token LMs at batch 1 route fewer.
DEFAULT_TOKEN_BUCKETS = (16, 64, 256)
WORKER_TIMEOUT_S = 300.0
DB_FILES = ("database_workload.json", "database_tuning_record.json")


@dataclass(frozen=True)
class TuningShapes:
    """The static shapes libraries are specialised (and tuned) for.

    Attributes:
        token_buckets: Expert kernels: token counts of the static copies, ascending.
        dims: Other dynamic axes, by axis name (``batch``, ``seq``): the size of the one static
            copy of segments, gates and heads. A library with a dynamic axis not named here
            stays generic.
    """

    token_buckets: tuple[int, ...] = DEFAULT_TOKEN_BUCKETS
    dims: dict = field(default_factory=lambda: {"batch": 1})

    def __post_init__(self):
        buckets = tuple(self.token_buckets)
        if (
            not buckets
            or any(not isinstance(b, int) or b < 1 for b in buckets)
            or list(buckets) != sorted(set(buckets))
        ):
            raise ConfigError(f"token buckets must be ascending positive integers, got {list(self.token_buckets)}")
        for name, size in self.dims.items():
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"tuned size of axis '{name}' must be a positive integer, got {size!r}")

    def to_json(self) -> dict:
        return {"token_buckets": list(self.token_buckets), "dims": dict(self.dims)}


def read_shapes(db_dir: Path) -> TuningShapes:
    """The shapes a tuning database was made for.

    Raises:
        ConfigError: ``db_dir`` is not a database written by :func:`tune_partitions`.
    """
    db_dir = Path(db_dir)
    missing = [f for f in (SHAPES_FILE, *DB_FILES) if not (db_dir / f).is_file()]
    if missing:
        raise ConfigError(
            f"{db_dir} is not a tuning database (missing {', '.join(missing)}); write one with `edgemoe tune`"
        )
    try:
        data = json.loads((db_dir / SHAPES_FILE).read_text())
        return TuningShapes(tuple(data["token_buckets"]), dict(data["dims"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"garbled {db_dir / SHAPES_FILE}: {exc}") from None


# -- shape dispatch ---------------------------------------------------------------------------


def _dims(ty) -> list:
    return list(ty.shape.values)


def _symbolic_axes(fn, part: GraphPartition) -> dict:
    """Map each symbolic var of ``main``'s parameters to the name of its dynamic axis."""
    from tvm import tirx

    out = {}
    for name, param in zip(part.input_names, fn.params, strict=True):
        for axis, dim in part.dynamic_axes.get(name, {}).items():
            size = _dims(param.ty)[axis]
            if isinstance(size, tirx.Var):
                out[size] = dim
    return out


def _subst(ty, subst: dict):
    """A parameter's tensor type with its symbolic dims replaced as ``subst`` says.

    torch.export gives every dynamic input axis its own symbol, so a parameter's dims are
    symbols or constants (no expressions).
    """
    from tvm import relax

    return relax.TensorType([subst.get(d, d) for d in _dims(ty)], ty.dtype)


class _Seq:
    """Bindings of one branch of the dispatch, typed by the block builder's normaliser."""

    def __init__(self, bb):
        self.bb, self.bindings = bb, []

    def emit(self, expr, name: str):
        from tvm import relax

        expr = self.bb.normalize(expr)
        var = relax.Var(name, expr.ty)
        self.bindings.append(relax.VarBinding(var, expr))
        return var

    def cast(self, expr, ty, name: str):
        from tvm import relax

        var = relax.Var(name, ty)
        self.bindings.append(relax.MatchCast(var, expr, ty))
        return var

    def done(self, result):
        from tvm import relax

        return relax.SeqExpr([relax.BindingBlock(self.bindings)], result)


def specialise(mod, part: GraphPartition, shapes: TuningShapes):
    """Put static copies of ``mod``'s ``main`` for ``shapes`` behind a shape dispatch.

    Returns:
        A module whose public ``main`` has the original signature and computes the same
        values for every shape; ``mod`` itself if the partition has no dynamic axis, or one
        that ``shapes`` does not name.
    """
    from tvm import relax, tirx

    fn = mod["main"]
    axes = _symbolic_axes(fn, part)
    padded = part.kind == "expert_kernel" and len(axes) == 1
    if not axes or (not padded and any(dim not in shapes.dims for dim in axes.values())):
        return mod
    # The wrapper's own symbolic vars (a var is defined by one function only).
    fresh = {v: tirx.Var(v.name, "int64") for v in axes}
    bb = relax.BlockBuilder()
    generic = bb.add_func(_private_copy(fn), "generic")
    params = [relax.Var(p.name, _subst(p.ty, fresh)) for p in fn.params]
    if padded:
        cases = [
            (_padded_case(bb, fn, params, fresh, b, f"tokens_{b}"), tirx.LE(*fresh.values(), tirx.IntImm("int64", b)))
            for b in shapes.token_buckets
        ]
    else:
        sizes = {v: tirx.IntImm("int64", shapes.dims[dim]) for v, dim in axes.items()}
        cond = tirx.all(*[fresh[v] == s for v, s in sizes.items()])
        static = bb.add_func(_private_copy(fn.bind_symbolic_vars(sizes)), "static")
        seq = _Seq(bb)
        args = [seq.cast(p, _subst(fp.ty, sizes), f"{p.name}_s") for p, fp in zip(params, fn.params, strict=True)]
        out = seq.emit(relax.Call(static, args), "out_s")
        cases = [(seq.done(out), cond)]
    seq = _Seq(bb)
    body = seq.done(seq.emit(relax.Call(generic, params), "out_g"))
    for branch, cond in reversed(cases):
        seq = _Seq(bb)
        body = seq.done(seq.emit(relax.If(cond, branch, body), "res"))
    main = relax.Function(params, body, body.body.ty, is_pure=True).with_attr("global_symbol", "main")
    out = bb.finalize()
    out["main"] = main
    return relax.transform.Normalize()(out)


def _private_copy(fn):
    """``fn`` with fresh variables (copies must not share Var objects) and no public symbol."""
    from tvm.relax.utils import copy_with_new_vars

    return copy_with_new_vars(fn).without_attr("global_symbol")


def _padded_case(bb, fn, params, fresh, size: int, name: str):
    """Branch for up to ``size`` tokens: pad the token axis with zero rows, run the static copy, slice."""
    from tvm import relax, tirx

    (var,) = fresh
    n = fresh[var]
    static = bb.add_func(_private_copy(fn.bind_symbolic_vars({var: tirx.IntImm("int64", size)})), name)
    seq = _Seq(bb)
    args = []
    for p, fp in zip(params, fn.params, strict=True):
        dims = _dims(fp.ty)
        axis = next((i for i, d in enumerate(dims) if d.same_as(var)), None)
        if axis is not None:
            pad = [size - n if i == axis else d for i, d in enumerate(_dims(p.ty))]
            zeros = seq.emit(relax.op.zeros(relax.ShapeExpr(pad), fp.ty.dtype), f"{p.name}_pad")
            p = seq.emit(relax.op.concat([p, zeros], axis=axis), f"{p.name}_cat")
        static_ty = _subst(fp.ty, {var: tirx.IntImm("int64", size)})
        args.append(seq.cast(p, static_ty, f"{p.name}_s"))
    out = seq.emit(relax.Call(static, args), "out_s")
    tuple_out = isinstance(fn.ret_ty, relax.TupleType)
    fields = fn.ret_ty.fields if tuple_out else [fn.ret_ty]
    items = []
    for i, f in enumerate(fields):
        item = seq.emit(relax.TupleGetItem(out, i), f"y{i}_s") if tuple_out else out
        axis = next(j for j, d in enumerate(_dims(f)) if d.same_as(var))
        items.append(
            seq.emit(relax.op.strided_slice(item, axes=[axis], begin=[0], end=[n], assume_inbound=True), f"y{i}")
        )
    return seq.done(seq.emit(relax.Tuple(items), "out") if tuple_out else items[0])


# -- tuning and applying a database -----------------------------------------------------------


def legalize_and_fuse(mod, target):
    """Legalize and fuse as the Relax CPU pipeline does: its fused PrimFuncs are the tuning tasks.

    Constant expressions are folded (weight transposes happen once, at build time) unless that
    stores more bytes of constants than the module holds: folding would turn quantized weights
    (int8 with a scale, fp16) into fp32 copies, so those are widened at run time instead.
    """
    import tvm
    from tvm import relax

    def run(fold: bool):
        passes = [
            *relax.backend.cpu_generic.library_dispatch_passes(target),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            *([relax.transform.FoldConstant()] if fold else []),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
        with target, tvm.transform.PassContext(opt_level=3):
            return tvm.transform.Sequential(passes)(mod)

    folded = run(fold=True)
    return folded if constant_bytes(folded) <= constant_bytes(mod) else run(fold=False)


def constant_bytes(mod) -> int:
    """Bytes of the tensor constants in the Relax functions of ``mod``."""
    import tvm
    import tvm_ffi
    from tvm import relax

    found: list = []
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            tvm_ffi.structural_walk(func, (tvm.ir.expr.Constant, found.append), order="post")
    total = 0
    for const in found:
        value = const.value
        if hasattr(value, "shape"):  # a tensor (scalars are PrimValues)
            total += math.prod(value.shape) * tvm.DataType(str(value.dtype)).bits // 8
    return total


def apply_tuning(mod, part: GraphPartition, target: dict, db_dir: str | Path):
    """Specialise a partition's module for the shapes ``db_dir`` was tuned for and apply its schedules.

    Args:
        mod: The partition's Relax module (``import_partition``).
        part: The partition.
        target: The TVM target dict the library is built for (``tvm_target``).
        db_dir: A database folder written by :func:`tune_partitions`.

    Returns:
        The fused module with every PrimFunc the database holds a record for replaced by its
        best schedule (marked ``tirx.is_scheduled``); the rest is left to the default pipeline.

    Raises:
        ConfigError: ``db_dir`` is not a tuning database.
        TargetError: The database was tuned for another CPU, or TVM fails on the module.
    """
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    shapes = read_shapes(db_dir)
    tuned_for = json.loads((db_dir / SHAPES_FILE).read_text()).get("target", {})
    if any(tuned_for.get(k) != target.get(k) for k in ("kind", "mtriple", "mcpu")):
        want = {k: target.get(k) for k in ("kind", "mtriple", "mcpu")}
        raise TargetError(f"tuning database {db_dir} was tuned for {tuned_for}, this build is for {want}")
    database = ms.database.JSONDatabase(work_dir=str(db_dir), allow_missing=False)
    tvm_target = tvm.target.Target(target)
    try:
        mod = legalize_and_fuse(specialise(mod, part, shapes), tvm_target)
        with tvm_target, database:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    except Exception as exc:  # TVM raises its own error types
        lines = [s for s in str(exc).splitlines() if s.strip()]
        raise TargetError(
            f"target tvm: cannot apply tuning database to {part.name}: {lines[-1] if lines else exc}"
        ) from None


def scheduled_functions(mod) -> list[str]:
    """Names of the PrimFuncs of ``mod`` that carry a schedule (from a database)."""
    return sorted(gv.name_hint for gv, f in mod.functions.items() if f.attrs and "tirx.is_scheduled" in f.attrs)


def _is_static(func) -> bool:
    """Whether every parameter of a PrimFunc is a buffer of constant shape (what MetaSchedule can tune)."""
    from tvm import tirx

    try:
        return all(isinstance(d, tirx.IntImm) for p in func.params for d in p.shape)
    except AttributeError:  # a scalar parameter: a symbolic size passed at run time
        return False


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

    from .target import import_partition

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
    shapes: TuningShapes = TuningShapes(),
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
    shapes: TuningShapes = TuningShapes(),
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
    from ...config import CompileConfig
    from ...devices import get_device
    from ...passes.capture_model import capture_model
    from ...passes.partition_model import partition_model
    from ...passes.profile_routing import profile_routing
    from ...passes.prune_experts import prune_experts
    from .target import _runs_here, tvm_target

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
    cfg = CompileConfig(model=model, target="tvm", device=device, weights=weights, prune=False, calib_samples=1)
    progress(f"capture {model}")
    captured = capture_model(cfg)
    plan = partition_model(captured, prune_experts(captured, profile_routing(captured, 1, 0), False, 0.0))
    parts = [p for p in plan.graphs() if p.kind in kinds]
    out = tune_partitions(parts, tvm_target(profile_dev), db_dir, trials, shapes, seed=seed, rpc=rpc, progress=progress)
    return {"model": model, "device": device, "partitions": [p.name for p in parts], **out}
