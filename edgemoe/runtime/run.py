"""``edgemoe run``: one task of a bundle on one input, with timing and load statistics."""

from __future__ import annotations

import contextlib
import os
import statistics
from pathlib import Path

import numpy as np

from ..bundle.format import sample_input
from ..errors import InputError, OutputPathError
from .inputs import load_input
from .session import BUNDLE, Session


def run_bundle(
    bundle: str | Path,
    task: str | None = None,
    input_path: str | Path | None = None,
    output_path: str | Path | None = None,
    repeat: int = 1,
    threads: int = 0,
    png_dir: str | Path | None = None,
    memory_budget: int | str | None = BUNDLE,
    policy: str = BUNDLE,
    prefetch: str | None = BUNDLE,
    storage_gbs: float = 0.0,
    providers: tuple[str, ...] = (),
) -> dict:
    """Run a task of a bundle and report latency and what was loaded.

    Args:
        bundle: Bundle folder.
        task: Task name (optional for single-task bundles).
        input_path: ``.npy`` or image file; None runs a deterministic sample input.
        output_path: Where to save the output as ``.npy`` (optional).
        repeat: Timed runs; the latency reported is their median (the first run, which
            loads experts, is included when ``repeat`` is 1).
        threads: Executor intra-op threads (0: default).
        png_dir: Folder for ``input.png`` and ``<task>.png`` pictures (optional; see ``images``).
        memory_budget: Expert memory (bytes, ``25%``, ``6MB`` or ``none``); default: the bundle's schedule's.
        policy: Eviction policy; default: the schedule's (else ``lru``).
        prefetch: Prefetch predictor (``none`` or None: off); default: the schedule's plan.
        storage_gbs: Throttle expert loads to this bandwidth (GB/s; 0: unthrottled).
        providers: Executor providers (onnxruntime), in order of preference; default: the executor's.

    Returns:
        The ``edgemoe run --json`` object.
    """
    if repeat < 1:
        raise InputError(f"--repeat must be at least 1, got {repeat}")
    if output_path is not None and Path(output_path).suffix != ".npy":
        raise InputError(f"--output must be a .npy file, got {output_path}")
    if prefetch in ("none", "off"):
        prefetch = None
    session = Session(
        bundle,
        task,
        threads=threads,
        providers=tuple(providers),
        memory_budget=memory_budget,
        policy=policy,
        prefetch=prefetch,
        storage_gbs=storage_gbs,
    )
    if input_path is None:
        x = sample_input(session.input_spec, batch=1, seed=0)
    else:
        x = load_input(input_path, session.input_spec)
    y, first_ms = session.timed_run(x)
    times = [first_ms] if repeat == 1 else [session.timed_run(x)[1] for _ in range(repeat)]
    stats = session.stats
    if output_path is not None:
        save_output(Path(output_path), y)
    pngs = None
    if png_dir is not None:
        from .images import write_pngs

        pngs = write_pngs(png_dir, x, y, session.input_spec, session.task)
    return {
        "task": session.task,
        "input": str(input_path) if input_path is not None else "sample",
        "output_shape": list(y.shape),
        "output_file": str(output_path) if output_path is not None else None,
        "latency_ms": statistics.median(times),
        "first_run_ms": first_ms,
        "runs": len(times),
        "experts_loaded": stats.experts_loaded,
        "experts_task": stats.experts_task,
        "experts_total": stats.experts_total,
        "expert_bytes_loaded": stats.expert_bytes_loaded,
        "expert_bytes_task": stats.expert_bytes_task,
        "expert_bytes_total": stats.expert_bytes_total,
        "graph_bytes": stats.graph_bytes,
        "png_files": pngs,
        "executor": session.executor.name,
        "driver": getattr(getattr(session.executor, "driver", None), "name", None),
        "providers": {
            "requested": list(getattr(session.executor, "requested", ()) or ()),
            "used": list(getattr(session.executor, "providers_used", ()) or ()),
        },
        "cache": cache_report(session),
    }


def save_output(out: Path, y: np.ndarray) -> None:
    """Write ``y`` to the ``.npy`` file ``out`` whole or not at all: a hidden file beside it, renamed into place.

    Raises:
        OutputPathError: The file or its folder cannot be written (read-only, disk full, a folder in the way).
    """
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, y)
        os.replace(tmp, out)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputPathError(f"cannot write the output {out}: {exc.strerror or exc}") from None


def cache_report(session: Session) -> dict:
    """The expert cache's settings and counters, as ``run --json`` and ``generate --json`` report them."""
    stats = session.stats
    return {
        "budget_bytes": session.settings["memory_budget"],
        "capacity_bytes": session.cache_capacity,
        "shared_bytes": stats.shared_expert_bytes,
        "policy": session.settings["policy"],
        "prefetch": session.settings["prefetch"],
        "from_schedule": session.settings["schedule"],
        "peak_expert_bytes": stats.peak_expert_bytes,
        "hits": stats.cache_hits,
        "misses": stats.cache_misses,
        "evictions": stats.evictions,
        "prefetched": stats.prefetch_issued,
        "prefetch_hits": stats.prefetch_used,
        "stall_ms": stats.stall_ms,
        "bytes_read": stats.expert_bytes_loaded + stats.shared_expert_bytes,
    }
