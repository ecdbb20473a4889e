"""Stage 2: run calibration inputs per task and record routing traces."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ..config import CompileConfig
from ..stages import CompileState, Stage
from .capture_model import CapturedModel


@dataclass(frozen=True, eq=False)
class LayerTrace:
    """Routing of one MoE layer for one task over all calibration tokens.

    Attributes:
        layer: MoE layer index.
        experts: Chosen experts per token, shape (tokens, top_k).
        scores: Their gate scores, shape (tokens, top_k).
    """

    layer: int
    experts: np.ndarray
    scores: np.ndarray

    def counts(self, num_experts: int) -> np.ndarray:
        """How many tokens chose each expert."""
        return np.bincount(self.experts.reshape(-1), minlength=num_experts)


@dataclass(frozen=True, eq=False)
class RoutingProfile:
    """Routing traces of every task on the calibration data.

    Attributes:
        samples: Calibration inputs per task.
        seed: Seed the calibration inputs were drawn with.
        traces: Per task, one :class:`LayerTrace` per MoE layer.
    """

    samples: int
    seed: int
    traces: dict[str, tuple[LayerTrace, ...]] = field(default_factory=dict)

    def activated(self, task: str, layer: int, num_experts: int, min_share: float = 0.0) -> tuple[int, ...]:
        """Experts the task selected in ``layer``: at least once, and in >= ``min_share`` of its assignments."""
        counts = self.traces[task][layer].counts(num_experts)
        keep = (counts > 0) & (counts >= min_share * max(int(counts.sum()), 1))
        return tuple(int(e) for e in np.flatnonzero(keep))


def profile_routing(captured: CapturedModel, samples: int, seed: int, batch: int = 8) -> RoutingProfile:
    """Record which experts each task routes to on calibration inputs.

    Args:
        captured: The captured model.
        samples: Calibration inputs per task.
        seed: Seed of the calibration inputs.
        batch: Inputs per forward pass (bounds memory on large models).

    Returns:
        The routing profile of every task being built.
    """
    x = captured.adapter.calibration_inputs(samples, seed)
    traces = {}
    for task in captured.tasks:
        per_layer: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in captured.ir.moe_layers]
        for start in range(0, samples, batch):
            for li, (idx, scores) in enumerate(captured.adapter.route(x[start : start + batch], task)):
                per_layer[li].append((idx, scores))
        traces[task] = tuple(
            LayerTrace(li, np.concatenate([i for i, _ in recs]), np.concatenate([s for _, s in recs]))
            for li, recs in enumerate(per_layer)
        )
    return RoutingProfile(samples=samples, seed=seed, traces=traces)


def profile_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``profile``: routing traces on ``cfg.calib_samples`` inputs per task."""
    captured = state.captured
    state.progress(f"profile routing on {cfg.calib_samples} calibration inputs x {len(captured.tasks)} tasks")
    return dataclasses.replace(state, profile=profile_routing(captured, cfg.calib_samples, cfg.calib_seed))


def _summary(state: CompileState) -> dict:
    layers = state.captured.ir.moe_layers
    return {
        "samples": state.profile.samples,
        "seed": state.profile.seed,
        "expert_counts": {
            task: [[int(c) for c in traces[layer.index].counts(layer.num_experts)] for layer in layers]
            for task, traces in state.profile.traces.items()
        },
    }


STAGE = Stage("profile", profile_stage, _summary)
