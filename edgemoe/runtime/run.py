"""``edgemoe run``: one task of a bundle on one input, with timing and load statistics."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from ..bundle.format import sample_input
from ..errors import InputError
from .inputs import load_input
from .session import Session


def run_bundle(
    bundle: str | Path,
    task: str | None = None,
    input_path: str | Path | None = None,
    output_path: str | Path | None = None,
    repeat: int = 1,
    threads: int = 0,
    png_dir: str | Path | None = None,
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

    Returns:
        The ``edgemoe run --json`` object.
    """
    if repeat < 1:
        raise InputError(f"--repeat must be at least 1, got {repeat}")
    session = Session(bundle, task, threads=threads)
    if input_path is None:
        x = sample_input(session.input_spec, batch=1, seed=0)
    else:
        x = load_input(input_path, session.input_spec)
    y, first_ms = session.timed_run(x)
    times = [first_ms] if repeat == 1 else [session.timed_run(x)[1] for _ in range(repeat)]
    stats = session.stats
    if output_path is not None:
        out = Path(output_path)
        if out.suffix != ".npy":
            raise InputError(f"--output must be a .npy file, got {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, y)
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
    }
