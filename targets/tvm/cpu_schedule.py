"""Default CPU schedules for TVM libraries: what a host or aarch64 build gets without a tuning database.

Without schedules, TVM lowers each legalized operator to the loop nest its compute definition
spells out: one thread, scalar code, the reduction loop innermost. An untuned m3vit-tiny spends
over a second per image that way. These rules give every fused PrimFunc a fixed schedule, as
dlight gives GPU builds theirs, with no search and no measurement:

* **contractions** (matmul, batch matmul, convolution: one reduction block and injective
  epilogues): the output in tiles of ``rows x 2 vectors``, accumulated in a local buffer (in
  registers once the rows are unrolled) with the reduction loops outside the tile, written back
  through the inlined epilogue (bias, activation); the tiles' loop fused and parallel. Axes no
  tile divides (129 tokens, a symbolic token count) are padded with zeros to whole tiles;
* **row reductions** (softmax, layer norm): dlight's CPU ``Reduction`` rule, parallel rows;
* **injective** functions (reshape, transpose, element-wise chains): inlined into their last
  block, whose innermost loop is vectorized and whose other loops are fused and parallel.

Only spatial loops run in parallel and no reduction is reordered, so the results do not depend
on the thread count. Small operators (a decode step's) stay on one thread, where a parallel launch
would cost more than it saves. The vector width comes from the target (AVX-512: 16 fp32 lanes,
NEON: 4), so aarch64 cross builds get the same schedules sized for their cores. A PrimFunc that
no rule fits (or that TVM refuses to schedule) keeps the default lowering.
"""

from __future__ import annotations

import functools
import math

# Output tile of a contraction: COLS_VECTORS vectors wide, rows chosen so the accumulators take
# about half the vector registers (the rest hold the loaded row and the broadcast operands).
COLS_VECTORS = 2
MAX_ROWS = 8
# Loops with less work than this (elements, or multiply-adds of a contraction) stay on one
# thread: a parallel launch costs microseconds, more than it saves on a small operator. Symbolic
# extents count as 1, so an operator over tokens is parallel only if one token is enough work
# (a decode step of a small LM stays serial; an image's 129 x 192 activations do not).
MIN_PARALLEL_ELEMS = 16384
MIN_PARALLEL_MACS = 1 << 17


def _vector_registers(target) -> int:
    """Architectural vector registers of the target's CPU (AVX-512 and NEON: 32, AVX2/SSE: 16)."""
    from tvm.target.codegen import llvm_get_vector_width

    triple = str(target.attrs.get("mtriple", ""))
    if triple.startswith(("aarch64", "arm64")) or llvm_get_vector_width(target) >= 512:
        return 32
    return 16


def _vector_lanes(target, bits: int = 32) -> int:
    """Lanes of a ``bits``-wide type in one vector register of the target (at least 4)."""
    from tvm.target.codegen import llvm_get_vector_width

    width = llvm_get_vector_width(target)
    return max(4, (width if width > 0 else 128) // bits)


def _extent(sch, loop) -> int | None:
    """A loop's extent if it is a constant, else None."""
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _static_part(sch, loops) -> int:
    """Product of the constant extents among ``loops`` (the work at size 1 of the symbolic ones)."""
    return math.prod(e for e in (_extent(sch, lp) for lp in loops) if e is not None)


def _schedule_spatial(sch, block, lanes: int) -> None:
    """Vectorize a spatial block's innermost loop where a vector width divides it; the rest fused, parallel if big.

    The innermost loop keeps its own index (not a fused one): a vector of it is a ramp, so
    contiguous accesses stay plain vector loads and no lane computes a division.
    """
    loops = sch.get_loops(block)
    if not loops:
        return
    big = _static_part(sch, loops) >= MIN_PARALLEL_ELEMS
    inner = _extent(sch, loops[-1])
    outer = list(loops[:-1])
    vec = next((v for v in (lanes, lanes // 2, 4) if inner is not None and inner >= v and inner % v == 0), None)
    if vec is not None:
        rest, lanes_loop = sch.split(loops[-1], factors=[None, vec])
        sch.vectorize(lanes_loop)
        outer.append(rest)
    else:
        outer.append(loops[-1])
    if big and outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


def _read_vars(stmt) -> list[set]:
    """The block iter vars each read of a block's body indexes with."""
    from tvm.s_tir.dlight.analysis.common_analysis import collect_vars_used_in_prim_expr

    out = []
    for read in stmt.reads:
        used = set()
        for rg in read.region:
            used |= collect_vars_used_in_prim_expr(rg.min)
        out.append(used)
    return out


def _tile_axes(sch, red, n_s) -> tuple[int | None, int]:
    """Which spatial iters of a contraction become the tile's rows and (vector) columns.

    The columns are the innermost spatial iter (the output's contiguous axis). The rows are the
    innermost spatial iter that the operands indexed by the columns do not use: a vector loaded
    from them serves every row of the tile (matmul: the rows of A; convolution: the output
    channels).
    """
    iters = [it.var for it in red.iters]
    j = n_s - 1
    vector_reads = [r for r in _read_vars(sch.get(red.block_rv)) if iters[j] in r]
    used = {k for k in range(n_s) for r in vector_reads if iters[k] in r}
    rows = [k for k in range(j) if k not in used]
    return (rows[-1] if rows else (j - 1 if j >= 1 else None)), j


def _col_tile(n_cols: int | None, lanes: int) -> tuple[int, bool]:
    """Columns of the tile (two vectors where they divide) and whether the axis must be padded to it.

    ``n_cols`` is None for a symbolic axis (attention scores over a sequence): one vector, padded.
    """
    if n_cols is None:
        return lanes, True
    for cols in (COLS_VECTORS * lanes, lanes):
        if n_cols % cols == 0:
            return cols, False
    if n_cols < lanes:
        return n_cols, False
    return lanes, True


def _row_tile(n_rows: int | None, max_rows: int) -> tuple[int, bool]:
    """Rows of the tile and whether the axis must be padded to it (symbolic, or no divisor near ``max_rows``)."""
    if n_rows is None:
        return max_rows, True
    div = max(d for d in range(1, min(max_rows, n_rows) + 1) if n_rows % d == 0)
    if div * 2 >= min(max_rows, n_rows):
        return div, False
    return max_rows, True


@functools.cache
def _rules() -> tuple:
    """The rules, in the order they are tried (built on first use: TVM is imported only to build)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight import cpu as dl_cpu
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import try_inline
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Contraction(CPUScheduleRule):
        """Matmul, batch matmul and convolution: register-tiled, vectorized, parallel outer loops."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            found = _contraction(sch)
            if found is None:
                return None
            red, n_s = found
            dtype = sch.get(red.block_rv).writes[0].source.dtype
            if not str(dtype).startswith("float"):
                return None  # integer accumulation (quantized graphs) keeps the default lowering
            lanes = _vector_lanes(target, dtype.bits)
            i, j = _tile_axes(sch, red, n_s)
            cols, pad_cols = _col_tile(_extent(sch, red.iters[j].loop_rv), lanes)
            max_rows = max(1, min(MAX_ROWS, _vector_registers(target) // 2 // max(1, math.ceil(cols / lanes))))
            rows, pad_rows = _row_tile(None if i is None else _extent(sch, red.iters[i].loop_rv), max_rows)
            # Multiply-adds for the smallest size of the symbolic axes (a symbolic row axis is
            # padded to a whole tile).
            symbolic_rows = i is not None and _extent(sch, red.iters[i].loop_rv) is None
            macs = _static_part(sch, [it.loop_rv for it in red.iters]) * (rows if symbolic_rows else 1)
            if pad_cols or pad_rows:
                # A tile that does not divide its axis leaves a predicate in the tile: on the
                # columns TVM scalarizes the vector loop, on the rows the accumulators stay in
                # memory. Padding the iteration space (zero-filled copies of the operands, the
                # extra outputs dropped) keeps every tile whole.
                padding = [1] * len(red.iters)
                padding[j] = cols if pad_cols else 1
                if i is not None:
                    padding[i] = rows if pad_rows else 1
                try:
                    sch.pad_einsum(red.block_rv, padding)
                except Exception:  # not an einsum (a convolution's strided reads): keep the predicates
                    sch = s_tir.Schedule(func)
                found = _contraction(sch)
                if found is None:
                    return None
                red, n_s = found
            _tile_contraction(sch, red, n_s, i, j, rows, cols, lanes, parallel=macs >= MIN_PARALLEL_MACS)
            return sch

    def _contraction(sch):
        """The one reduction block of a contraction (``S..SR..R``, the rest injective), and its spatial count."""
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        red = [b for b in infos if not b.is_injective()]
        if len(red) != 1 or not red[0].is_reduction():
            return None
        kinds = red[0].dom_kind()
        n_s = len(kinds) - len(kinds.lstrip("S"))
        if n_s < 1 or set(kinds[n_s:]) != {"R"}:
            return None
        return red[0], n_s

    def _tile_contraction(sch, red, n_s, i, j, rows, cols, lanes, parallel: bool):
        """Tile the reduction block ``red`` (rows ``i`` x vector columns ``j``), inline its epilogue, order the rest."""
        infos = normalize_prim_func(sch)
        at = next(k for k, b in enumerate(infos) if b.name == red.name)
        prologues, epilogues = infos[:at], try_inline(sch, list(infos[at + 1 :]))
        if len(epilogues) > 1:
            raise ValueError("more than one epilogue")
        block = red.block_rv
        loops = sch.get_loops(block)
        spatial, reduce = loops[:n_s], loops[n_s:]
        jo, ji = sch.split(spatial[j], factors=[None, cols])
        outer, inner = [lp for k, lp in enumerate(spatial) if k not in (i, j)] + [jo], [ji]
        if i is not None:
            io, ii = sch.split(spatial[i], factors=[None, rows])
            outer.append(io)
            inner.insert(0, ii)
        sch.reorder(*outer, *reduce, *inner)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]

        # Accumulate the tile in a local buffer (registers, once unrolled) and write it back
        # through the epilogue (bias, activation) while it is in cache.
        write_back = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(write_back, fused, preserve_unit_loops=True)
        if epilogues:
            try:
                sch.reverse_compute_inline(epilogues[0].block_rv)
            except Exception:  # not a plain element-wise consumer (or a padded one): run it per tile
                sch.reverse_compute_at(epilogues[0].block_rv, fused, preserve_unit_loops=True)
                _vectorize_inner(sch, epilogues[0].block_rv, cols)
        _vectorize_inner(sch, write_back, cols)
        # Vectorize and parallelize while the block is still a reduction (with its init):
        # afterwards its update block is neither complete nor a reduction, and TVM refuses.
        if cols % lanes == 0 or cols <= lanes:
            sch.vectorize(ji)
        if i is not None:
            sch.unroll(ii)
        if parallel and _extent(sch, fused) != 1:
            sch.parallel(fused)
        init = sch.decompose_reduction(block, reduce[0])
        _vectorize_inner(sch, init, cols)
        # Prologues (padding, layout copies) run on their own, element-wise.
        for pro in prologues:
            try:
                _schedule_spatial(sch, pro.block_rv, lanes)
            except Exception:  # an unscheduled prologue is still correct
                continue

    class Injective(CPUScheduleRule):
        """Element-wise and layout functions: inline into the last block, fuse, vectorize, parallel."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or not all(b.is_injective() for b in infos):
                return None
            remaining = try_inline(sch, list(infos))
            bits = 32
            for b in remaining:
                writes = sch.get(b.block_rv).writes
                if writes:
                    bits = max(8, writes[0].source.dtype.bits)
                _schedule_spatial(sch, b.block_rv, _vector_lanes(target, bits))
            return sch

    class RowReduction(dl_cpu.Reduction):
        """dlight's CPU reduction rule (softmax, norms: parallel rows, vector lanes), for operators worth a launch.

        Smaller ones (a decode step's norm over one token) keep the default lowering, which
        costs less than a parallel launch.
        """

        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc):
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos or max(_static_part(sch, b.get_loops()) for b in infos) < MIN_PARALLEL_ELEMS:
                return None
            return super().apply(func, target, tunable)

    return Contraction(), RowReduction(), Injective()


def _vectorize_inner(sch, block, width: int) -> None:
    """Vectorize a block's innermost loop if its extent is at most ``width`` (a tile's columns)."""
    loops = sch.get_loops(block)
    if loops:
        ext = _extent(sch, loops[-1])
        if ext is not None and 2 <= ext <= width:
            sch.vectorize(loops[-1])


def schedule_module(mod, target):
    """Give every unscheduled PrimFunc of a legalized, fused module its default CPU schedule.

    Args:
        mod: A Relax module after legalization and fusion (``tuning_db.legalize_and_fuse``); PrimFuncs that
            already carry a schedule (``tirx.is_scheduled``, e.g. from a tuning database) are
            kept.
        target: The ``tvm.target.Target`` (``llvm``) the library is built for.

    Returns:
        The module, each PrimFunc a rule fits replaced by its scheduled form (marked
        ``tirx.is_scheduled``); the others as they were.
    """
    from tvm import tirx

    rules = _rules()
    out = mod.clone()
    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or (func.attrs and func.attrs.get("tirx.is_scheduled")):
            continue
        for rule in rules:
            try:
                sch = rule.apply(func, target, False)
            except Exception:  # TVM refused a step: the next rule, or no schedule
                continue
            if sch is not None:
                out[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                break
    return out


def default_schedules(mod, target: dict, *, legalized: bool = False):
    """Legalize and fuse a partition's Relax module as the CPU pipeline does, then schedule it.

    Args:
        mod: The partition's Relax module (``import_partition``), or with ``legalized`` the fused
            module a tuning database was applied to (``tuning_db.apply_tuning``).
        target: The ``llvm`` target dict the library is built for (``tvm_target``).
        legalized: ``mod`` is already legalized and fused.

    Returns:
        The fused module with default schedules (:func:`schedule_module`); ``tvm.compile`` runs
        its remaining passes unchanged (legalization finds nothing left to do).
    """
    import tvm

    from .tuning_db import legalize_and_fuse

    tvm_target = tvm.target.Target(target)
    if not legalized:
        mod = legalize_and_fuse(mod, tvm_target)
    with tvm_target:
        return schedule_module(mod, tvm_target)
