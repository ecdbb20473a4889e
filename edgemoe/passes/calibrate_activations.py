"""Stage ``calibrate``: run calibration data through the fp32 bundle and record what quantization needs.

The calibration reader is task-aware: each task's calibration inputs run through that task's
session of the staged fp32 bundle. Recorded per partition: the inputs of every dense graph
(for onnxruntime's static quantizer) and, per expert, the tokens routed to it (for activation
ranges of its matmuls and for measuring each expert's quantization error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from ..config import CompileConfig
from ..runtime import Session
from ..stages import CompileState, Stage
from .measure_accuracy import bundle_bytes

MAX_TOKENS = 4096  # per expert: enough for ranges and error estimates, bounded memory


class CalibrationReader(Protocol):
    """Calibration data per task."""

    def inputs(self, task: str) -> np.ndarray:
        """The calibration batch of ``task``."""
        ...


@dataclass(frozen=True)
class AdapterCalibration:
    """Calibration reader backed by the model adapter's calibration inputs (same for every task)."""

    adapter: object
    samples: int
    seed: int

    def inputs(self, task: str) -> np.ndarray:
        return self.adapter.calibration_inputs(self.samples, self.seed)


@dataclass(frozen=True, eq=False)
class CalibrationSet:
    """What the fp32 bundle saw on calibration data.

    Attributes:
        graph_feeds: Per dense graph name, its recorded feeds (input name → array), one per batch.
        expert_tokens: Per (layer, expert), the tokens routed to it (rows of the gate input).
        layer_tokens: Per layer, tokens entering the MoE layer (for shared experts).
    """

    graph_feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    expert_tokens: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    layer_tokens: dict[int, np.ndarray] = field(default_factory=dict)


def _cap(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if len(rows) <= MAX_TOKENS:
        return rows
    return rows[np.sort(rng.choice(len(rows), MAX_TOKENS, replace=False))]


def calibrate_activations(
    bundle: Path,
    manifest: dict,
    reader: CalibrationReader,
    batch: int = 4,
    progress: Callable[[str], None] = lambda _m: None,
) -> CalibrationSet:
    """Run each task's calibration inputs through the fp32 bundle and record feeds and routed tokens.

    Args:
        bundle: The staged fp32 bundle.
        manifest: Its manifest.
        reader: Calibration inputs per task.
        batch: Inputs per run.
        progress: Step messages.

    Returns:
        The recorded calibration set.
    """
    graphs = manifest["graphs"]
    dense = {name for name, g in graphs.items() if g["kind"] in ("segment", "head")}
    feeds: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in dense}
    per_expert: dict[tuple[int, int], list[np.ndarray]] = {}
    per_layer: dict[int, list[np.ndarray]] = {}
    gate_layer = {name: g["layer"] for name, g in graphs.items() if g["kind"] == "gate"}
    for task in manifest["tasks"]:
        progress(f"calibrate activations of task {task}")
        gate_inputs: dict[int, np.ndarray] = {}

        def record(name: str, inputs: tuple[np.ndarray, ...], gate_inputs=gate_inputs) -> None:
            if name in feeds:
                feeds[name].append(dict(zip(graphs[name]["inputs"], (np.array(a) for a in inputs), strict=True)))
            elif name in gate_layer:
                gate_inputs[gate_layer[name]] = np.array(inputs[0])

        session = Session(bundle, task, recorder=record)
        x = reader.inputs(task)
        for start in range(0, len(x), batch):
            session.run(x[start : start + batch])
            for layer, idx in enumerate(session.last_routing):
                h = gate_inputs[layer].reshape(-1, gate_inputs[layer].shape[-1])
                per_layer.setdefault(layer, []).append(h)
                for e in np.unique(idx):
                    tok = np.nonzero((idx == e).any(-1))[0]
                    per_expert.setdefault((layer, int(e)), []).append(h[tok])
    rng = np.random.default_rng(0)
    return CalibrationSet(
        graph_feeds=feeds,
        expert_tokens={k: _cap(np.concatenate(v), rng) for k, v in per_expert.items()},
        layer_tokens={k: _cap(np.concatenate(v), rng) for k, v in per_layer.items()},
    )


def activation_range(values: np.ndarray, calibrator: str, percentile: float) -> tuple[float, float]:
    """Calibrated (low, high) range of activations, always containing 0.

    ``minmax`` takes the extremes; ``percentile`` clips both tails at the given percentile.
    """
    if values.size == 0:
        return 0.0, 0.0
    if calibrator == "percentile":
        lo, hi = np.percentile(values, [100.0 - percentile, percentile])
    else:
        lo, hi = values.min(), values.max()
    return float(min(lo, 0.0)), float(max(hi, 0.0))


def uint8_qparams(lo: float, hi: float) -> tuple[np.float32, np.uint8]:
    """Asymmetric uint8 scale and zero point for a range containing 0."""
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return np.float32(scale), np.uint8(zp)


def calibrate_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``calibrate`` (quantized bundles): the fp32 bundle's size and its activations on calibration data."""
    fp32_bytes = bundle_bytes(state.staging, state.manifest)
    reader = AdapterCalibration(state.captured.adapter, cfg.calib_samples, cfg.calib_seed)
    calib = calibrate_activations(state.staging, state.manifest, reader, progress=state.progress)
    return dataclasses.replace(state, fp32_bytes=fp32_bytes, calib=calib)


def _summary(state: CompileState) -> dict:
    calib = state.calib
    return {
        "fp32_bytes": state.fp32_bytes,
        "graph_batches": {name: len(feeds) for name, feeds in calib.graph_feeds.items()},
        "expert_tokens": {f"L{layer}_E{e}": len(rows) for (layer, e), rows in sorted(calib.expert_tokens.items())},
        "layer_tokens": {str(layer): len(rows) for layer, rows in sorted(calib.layer_tokens.items())},
    }


STAGE = Stage("calibrate", calibrate_stage, _summary, applies=lambda cfg: cfg.quant.active)
