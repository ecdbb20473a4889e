"""Prefetch predictors: which experts the next layer will need, known one layer ahead.

Each predictor sees only what the runtime has when it issues a prefetch at layer ``l``: layer
``l``'s routing and MoE input. Tables are learned from calibration traces only.
:func:`lookahead` extends a prediction to the layers after the next one (and past a run's last
layer to the next run's first ones) with the calibration order, so loads can start earlier.

* ``pregate`` (Pre-gated MoE): layer ``l+1``'s gate applied to layer ``l``'s MoE input.
* ``affinity`` (ExFlow): P(expert at ``l+1`` | experts at ``l``) counted on calibration traces.
* ``static`` (Edge-MoE style double buffering, task-level models): the task's most used experts
  of layer ``l+1`` in calibration, in frequency order.
* ``routed``: nothing ahead. Every prefetch mode, this one included, loads a step's own misses
  as soon as it is routed and runs its cached experts meanwhile
  (:func:`~edgemoe.swap.book.fetch_rule`); ``routed`` does only that, so no load is ever wasted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..schedule.traces import Trace

PREDICTORS = ("pregate", "affinity", "static", "routed")
# MoE steps the runtime's prefetch looks ahead by default (Session's prefetch_depth); the planner simulates the same.
PREFETCH_DEPTH = 2


class Predictor:
    """Base class: ``predict(layer, experts, pregate)`` -> experts of layer ``layer + 1``."""

    name = "predictor"
    # Whether a prefetch looks beyond the step at hand: the steps past the next layer (and a run's
    # first layers) then come from the calibration order (see :func:`lookahead`).
    looks_ahead = True

    def predict(self, layer: int, experts: Sequence[int], pregate: Sequence[int] | None) -> tuple[int, ...]:
        """Experts of layer ``layer + 1`` to prefetch, most likely first."""
        raise NotImplementedError

    def to_json(self) -> dict:
        """Manifest form (what the runtime needs to rebuild it)."""
        return {"name": self.name}


class PreGate(Predictor):
    """Layer ``l+1``'s own gate on layer ``l``'s MoE input (computed by the runtime or the trace)."""

    name = "pregate"

    def predict(self, layer, experts, pregate):
        return tuple(pregate or ())


class Routed(Predictor):
    """No guess about the next layer: only the step's own misses load early (see the module docstring)."""

    name = "routed"
    looks_ahead = False  # nothing ahead, not even the calibration order

    def predict(self, layer, experts, pregate):
        return ()


def _width(counts: Sequence[float]) -> list[int]:
    return [max(1, math.ceil(c - 1e-9)) for c in counts]


class Affinity(Predictor):
    """Inter-layer affinity: score experts of ``l+1`` by P(e' at l+1 | e at l) summed over layer ``l``'s experts.

    Args:
        table: Per layer ``l`` (all but the last), a matrix [experts of l][experts of l+1] of
            conditional probabilities.
        width: Per layer, how many experts a step uses on average (how many to predict).
    """

    name = "affinity"

    def __init__(self, table: Sequence[Sequence[Sequence[float]]], width: Sequence[int]):
        self.table = [np.asarray(t, dtype=np.float64) for t in table]
        self.width = list(width)

    @classmethod
    def from_trace(cls, trace: Trace) -> Affinity:
        """Count layer-to-layer co-occurrences within each unit of a calibration trace."""
        n = trace.num_experts
        counts = [np.zeros((n[li], n[li + 1])) for li in range(trace.num_layers - 1)]
        for prev, s in zip(trace.steps, trace.steps[1:], strict=False):
            if s.unit == prev.unit and s.layer == prev.layer + 1:
                for e in prev.experts:
                    counts[prev.layer][e, list(s.experts)] += 1
        table = [c / np.maximum(c.sum(axis=1, keepdims=True), 1) for c in counts]
        return cls(table, _width(_mean_width(trace)))

    def predict(self, layer, experts, pregate):
        if layer >= len(self.table) or not len(experts):
            return ()
        score = self.table[layer][list(experts)].sum(axis=0)
        order = np.argsort(-score, kind="stable")
        return tuple(int(e) for e in order[: self.width[layer + 1]] if score[e] > 0)

    def to_json(self) -> dict:
        return {"name": self.name, "table": [np.round(t, 4).tolist() for t in self.table], "width": self.width}


class Static(Predictor):
    """The task's most used experts of the next layer, from calibration (no run-time input).

    Args:
        order: Per layer, experts by descending calibration frequency.
        width: Per layer, how many to prefetch.
    """

    name = "static"

    def __init__(self, order: Sequence[Sequence[int]], width: Sequence[int]):
        self.order = [list(o) for o in order]
        self.width = list(width)

    @classmethod
    def from_trace(cls, trace: Trace) -> Static:
        """Frequency order per layer from a calibration trace."""
        return cls(_frequency_order(trace.probabilities()), _width(_mean_width(trace)))

    @classmethod
    def from_probabilities(cls, prob: Sequence[Sequence[float]]) -> Static:
        """Frequency order per layer from use probabilities; width: the expected experts per step."""
        return cls(_frequency_order(prob), _width([float(np.sum(p)) for p in prob]))

    def experts(self, layer: int) -> tuple[int, ...]:
        """The experts to prefetch for ``layer`` (its most used ones)."""
        if not 0 <= layer < len(self.order):
            return ()
        return tuple(self.order[layer][: self.width[layer]])

    def predict(self, layer, experts, pregate):
        return self.experts(layer + 1)

    def to_json(self) -> dict:
        return {"name": self.name, "order": self.order, "width": self.width}


def lookahead(
    near: Predictor | None,
    far: Static | None,
    layer: int,
    experts: Sequence[int],
    pregate: Sequence[int] | None,
    num_layers: int,
    depth: int,
) -> list[tuple[int, int]]:
    """The experts of the next ``depth`` MoE steps, as ``(layer, expert)`` in the order they are needed.

    The step right after ``layer`` comes from ``near`` when given (it may use this step's routing
    or the pre-gate); later steps, and the first layers of the next run once ``layer`` is the
    last one (runs of a task repeat the same layer cycle), from ``far``'s calibration order.

    Args:
        near: Predictor of the next layer (None: ``far`` for it too).
        far: Calibration order for the steps beyond (None: predict one step only).
        layer: The step's layer (-1: before a run's first layer).
        experts: This step's experts.
        pregate: Layer ``layer + 1``'s gate on this step's MoE input, when computed.
        num_layers: MoE layers per run.
        depth: Steps to look ahead.
    """
    out: list[tuple[int, int]] = []
    for d in range(1, min(depth, num_layers) + 1):
        target = layer + d
        if d == 1 and near is not None and target < num_layers:
            named = near.predict(layer, experts, pregate)
        elif far is not None:
            named = far.experts(target % num_layers)
        else:
            break
        out += [(target % num_layers, int(e)) for e in named]
    return out


def _frequency_order(prob: Sequence[Sequence[float]]) -> list[list[int]]:
    """Per layer, the experts used at all, most used first."""
    return [[int(e) for e in np.argsort(-np.asarray(p), kind="stable") if p[e] > 0] for p in prob]


def _mean_width(trace: Trace) -> list[float]:
    total, visits = np.zeros(trace.num_layers), np.zeros(trace.num_layers)
    for s in trace.steps:
        total[s.layer] += len(s.experts)
        visits[s.layer] += 1
    return (total / np.maximum(visits, 1)).tolist()


def make_predictor(name: str, calibration: Trace) -> Predictor:
    """A predictor by name, learned from a calibration trace.

    Raises:
        ConfigError: Unknown name.
    """
    if name == "pregate":
        return PreGate()
    if name == "affinity":
        return Affinity.from_trace(calibration)
    if name == "static":
        return Static.from_trace(calibration)
    if name == "routed":
        return Routed()
    raise ConfigError(f"unknown prefetch predictor '{name}' (known: {', '.join(PREDICTORS)})")


def predictor_from_json(data: dict) -> Predictor:
    """Rebuild a predictor from its manifest form.

    Raises:
        ConfigError: Unknown or garbled entry.
    """
    try:
        if data["name"] == "pregate":
            return PreGate()
        if data["name"] == "affinity":
            return Affinity(data["table"], data["width"])
        if data["name"] == "static":
            return Static(data["order"], data["width"])
        if data["name"] == "routed":
            return Routed()
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"garbled prefetch plan in the manifest: {exc}") from None
    raise ConfigError(f"unknown prefetch predictor '{data.get('name')}' in the manifest")
