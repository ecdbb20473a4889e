"""Stage ``measure-accuracy``: the accuracy report of a quantized bundle against fp32, per task, on held-out data."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..bundle.format import MANIFEST, graph_bytes
from ..config import CompileConfig
from ..runtime import Session
from ..stages import CompileState, Stage


def bundle_bytes(root: Path, manifest: dict) -> int:
    """Bytes of every file of the bundle (manifest included as currently on disk, if any)."""
    files = [graph_bytes(g) for g in manifest["graphs"].values()]
    for layer in manifest["moe_layers"]:
        files += [e["bytes"] for e in (*layer["experts"], *layer.get("shared", []))]
    path = root / MANIFEST
    return sum(files) + (path.stat().st_size if path.exists() else 0)


def measure_accuracy(
    bundle: Path,
    manifest: dict,
    adapter,
    samples: int,
    seed: int = 99,
    fp32_bytes: int | None = None,
    batch: int = 4,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Each task's metric for the bundle and for the fp32 framework model on held-out data.

    Args:
        bundle: Bundle folder (staged).
        manifest: Its manifest.
        adapter: The model adapter (evaluation data, fp32 reference, task metric).
        samples: Held-out inputs.
        seed: Seed of the held-out inputs (disjoint from calibration).
        fp32_bytes: Bytes of the fp32 bundle, for the size ratio.
        batch: Inputs per run.
        progress: Step messages.

    Returns:
        The manifest's ``accuracy`` section.
    """
    x, targets = adapter.evaluation_data(samples, seed)
    tasks = {}
    for task, spec in manifest["tasks"].items():
        progress(f"accuracy of task {task} on {len(x)} held-out inputs")
        session = Session(bundle, task)
        keep = {li: tuple(s) for li, s in enumerate(spec["experts"])}
        pred = np.concatenate([session.run(x[i : i + batch]) for i in range(0, len(x), batch)])
        ref = np.concatenate([adapter.reference(x[i : i + batch], task, keep) for i in range(0, len(x), batch)])
        target = None if targets is None else targets.get(task)
        name, value, higher = adapter.task_metric(task, pred, target, ref)
        _, value_fp32, _ = adapter.task_metric(task, ref, target, ref)
        tasks[task] = {
            "metric_name": name,
            "metric": value,
            "metric_fp32": value_fp32,
            "higher_is_better": higher,
            "max_abs_error_vs_fp32": float(np.abs(pred.astype(np.float64) - ref).max()),
        }
    size = bundle_bytes(bundle, manifest)
    return {
        "samples": len(x),
        "seed": seed,
        "tasks": tasks,
        "bundle_bytes": size,
        "bundle_bytes_fp32": fp32_bytes,
        "size_ratio": None if not fp32_bytes else size / fp32_bytes,
    }


def measure_accuracy_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``measure-accuracy`` (quantized bundles): the manifest's ``accuracy`` report against fp32."""
    accuracy = measure_accuracy(
        state.staging,
        state.manifest,
        state.captured.adapter,
        cfg.quant.eval_samples,
        fp32_bytes=state.fp32_bytes,
        progress=state.progress,
    )
    return dataclasses.replace(state, manifest={**state.manifest, "accuracy": accuracy})


STAGE = Stage(
    "measure-accuracy",
    measure_accuracy_stage,
    lambda s: s.manifest["accuracy"],
    applies=lambda cfg: cfg.quant.active,
)
