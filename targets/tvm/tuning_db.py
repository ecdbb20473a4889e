"""A tuning database (``edgemoe tune``) and the shape dispatch both tuning and compiling build.

Why shapes are specialised: MetaSchedule tunes static shapes only (it extracts no task from a
PrimFunc with a symbolic extent), while every library of a bundle is shape-generic (batch,
sequence and the expert kernels' token count are symbolic). So each library gets static copies
of its ``main`` for the shapes a device typically sees, behind a shape dispatch, and keeps the
generic function for every other shape (:func:`specialise`). The compiler applies a database
with :func:`apply_tuning`; :mod:`.tune` writes one. Both build the same dispatch module, legalize
and fuse it as the Relax CPU pipeline does, so the database's workloads are found again by
structural equality.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ConfigError, TargetError
from ...frontends import GraphPartition

SHAPES_FILE = "edgemoe_tuning.json"
# Tokens per expert call: m3vit-tiny at batch 1 routes 258 (token, slot) pairs over 16 experts
# (16 per expert on average, up to ~60); token LMs at batch 1 route fewer.
DEFAULT_TOKEN_BUCKETS = (16, 64, 256)
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


DEFAULT_SHAPES = TuningShapes()


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
