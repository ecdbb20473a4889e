"""Routing traces of a bundle: which experts each layer needs, step by step.

A trace is recorded by running the bundle's own runtime :class:`~edgemoe.runtime.Session` on
inputs (one input per run) and reading ``session.last_routing``; pre-gating predictions (layer
``l+1``'s gate graph applied to layer ``l``'s MoE input) are recorded beside it. Calibration
traces (the compile's calibration inputs) are for planning; held-out traces (the adapter's
evaluation inputs) are for scoring: a plan is never scored on the trace it was built from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.format import read_manifest, sample_input
from ..errors import ConfigError

GRANULARITIES = ("run", "token")


@dataclass(frozen=True)
class Step:
    """One layer of one unit (a whole run, or one token) and the experts it needs.

    Attributes:
        unit: Index of the run or token the step belongs to.
        layer: MoE layer.
        experts: Distinct experts needed, ascending (the runtime's order).
        tokens: Tokens routed to each of ``experts``.
        pregate: Experts that layer's gate picks from the previous layer's MoE input (None on layer 0).
    """

    unit: int
    layer: int
    experts: tuple[int, ...]
    tokens: tuple[int, ...]
    pregate: tuple[int, ...] | None


@dataclass(frozen=True, eq=False)
class Trace:
    """A task's routing, in execution order.

    Attributes:
        task: Task name.
        granularity: ``run`` (a step per layer per input batch, as the runtime executes) or
            ``token`` (a step per layer per token, as decoding executes).
        num_layers: MoE layers.
        num_experts: Routed experts per layer.
        steps: The steps, in order.
        source: Where the inputs came from (``calibration`` or ``held-out``).
    """

    task: str
    granularity: str
    num_layers: int
    num_experts: tuple[int, ...]
    steps: tuple[Step, ...]
    source: str = ""

    def keys(self, i: int) -> tuple[tuple[int, int], ...]:
        """Cache keys ``(layer, expert)`` of step ``i``, in access order."""
        s = self.steps[i]
        return tuple((s.layer, e) for e in s.experts)

    def probabilities(self) -> list[list[float]]:
        """Per layer, per expert: fraction of that layer's steps that use the expert."""
        counts = [np.zeros(n) for n in self.num_experts]
        visits = np.zeros(self.num_layers)
        for s in self.steps:
            visits[s.layer] += 1
            counts[s.layer][list(s.experts)] += 1
        return [(c / max(v, 1)).tolist() for c, v in zip(counts, visits, strict=True)]

    def usage(self) -> np.ndarray:
        """Tokens routed to each expert, shape (layers, max experts), for heatmaps."""
        out = np.zeros((self.num_layers, max(self.num_experts)))
        for s in self.steps:
            out[s.layer, list(s.experts)] += s.tokens
        return out


def _unique(idx: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    experts, counts = np.unique(idx, return_counts=True)
    return tuple(int(e) for e in experts), tuple(int(c) for c in counts)


def record_trace(
    bundle: str | Path, task: str, inputs: np.ndarray, granularity: str = "run", source: str = ""
) -> Trace:
    """Run ``inputs`` (one per run) through the bundle's runtime and record the routing.

    Args:
        bundle: Bundle folder.
        task: Task to trace.
        inputs: Input batch; each item is one run.
        granularity: ``run`` or ``token`` (see :class:`Trace`).
        source: Label of where the inputs came from.

    Returns:
        The trace, with pre-gating predictions.

    Raises:
        ConfigError: Unknown granularity.
    """
    from ..runtime import Session

    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown trace granularity '{granularity}' (known: {', '.join(GRANULARITIES)})")
    session = Session(bundle, task)
    session.record_pregate = True  # the next layer's gate on each MoE input: pre-gating predictions
    layers = len(session.layers)
    num_experts = tuple(int(layer["num_experts"]) for layer in session.layers)
    steps: list[Step] = []
    unit = 0
    for i in range(len(inputs)):
        session.run(inputs[i : i + 1])
        routing = [r.reshape(-1, r.shape[-1]) for r in session.last_routing]
        pre = session.last_pregate
        if granularity == "run":
            for li in range(layers):
                experts, tokens = _unique(routing[li])
                steps.append(Step(unit, li, experts, tokens, None if pre[li] is None else _unique(pre[li])[0]))
            unit += 1
        else:
            for t in range(routing[0].shape[0]):
                for li in range(layers):
                    experts, tokens = _unique(routing[li][t])
                    steps.append(Step(unit, li, experts, tokens, None if pre[li] is None else _unique(pre[li][t])[0]))
                unit += 1
    return Trace(task, granularity, layers, num_experts, tuple(steps), source)


def trace_inputs(bundle: str | Path, heldout: int = 8) -> tuple[np.ndarray, np.ndarray, str]:
    """Calibration and held-out inputs of a bundle.

    Rebuilds the source model's adapter (needs the compiler extra) to draw the compile's very
    calibration inputs (seed and count from the manifest) and its held-out evaluation inputs;
    without torch, falls back to deterministic sample inputs with the calibration seed and a
    disjoint one.

    Returns:
        (calibration inputs, held-out inputs, where they came from in words).
    """
    manifest = read_manifest(bundle)
    calib = manifest.get("calibration", {})
    samples, seed = int(calib.get("samples", 8)), int(calib.get("seed", 1234))
    try:
        from ..passes.capture_model import capture_bundle_source

        captured = capture_bundle_source(manifest)
    except (ImportError, KeyError):
        x = sample_input(manifest["input"], batch=samples + heldout, seed=seed)
        return x[:samples], sample_input(manifest["input"], batch=heldout, seed=seed + 7919), "sample inputs"
    adapter = captured.adapter
    return adapter.calibration_inputs(samples, seed), adapter.evaluation_data(heldout, seed)[0], "adapter"


def bundle_traces(
    bundle: str | Path, granularity: str | None = None, heldout: int = 8, tasks: tuple[str, ...] = ()
) -> dict[str, tuple[Trace, Trace]]:
    """Per task, (calibration trace, held-out trace) of a bundle.

    Args:
        bundle: Bundle folder.
        granularity: ``run`` or ``token`` (default: ``token`` for token-routed models, else ``run``).
        heldout: Held-out inputs to trace.
        tasks: Tasks (default: all in the bundle).
    """
    manifest = read_manifest(bundle)
    if granularity is None:
        granularity = "token" if manifest["model"].get("granularity") == "token" else "run"
    calib, held, _ = trace_inputs(bundle, heldout)
    return {
        task: (
            record_trace(bundle, task, calib, granularity, "calibration"),
            record_trace(bundle, task, held, granularity, "held-out"),
        )
        for task in tasks or tuple(manifest["tasks"])
    }
