"""MoE dispatch: route a layer's tokens, run each routed expert from the cache, prefetch what comes next."""

from __future__ import annotations

import numpy as np

from ..errors import BundleError, ConfigError
from ..swap.predict import PREDICTORS, PreGate, Routed, Static, lookahead, predictor_from_json
from ..swap.step import begin_run, run_step
from .expert_cache import ExpertCache


def choose_predictor(prefetch: str | None, schedule: dict | None, prob: list[list[float]]):
    """(prefetch mode, next-layer predictor or None, calibration order for the steps beyond) for a task.

    Args:
        prefetch: What was asked for: ``pregate``, ``affinity``, ``static``, ``routed``, ``plan`` or None.
        schedule: The bundle schedule's plan for the task, or None.
        prob: The task's per-layer expert probabilities (schedule or calibration counts).

    Raises:
        ConfigError: A predictor that needs a schedule the bundle lacks, or an unknown one.
    """
    if prefetch is None:
        return None, None, None
    static = (schedule or {}).get("predictors", {}).get("static")
    far = predictor_from_json(static) if static else Static.from_probabilities(prob)
    if prefetch == "pregate":
        return prefetch, None, far
    if prefetch == "routed":
        predictor = Routed()  # needs no schedule
    elif prefetch == "plan":
        if not schedule:
            raise ConfigError("prefetch='plan' needs a schedule in the bundle: run `edgemoe plan` first")
        if schedule.get("prefetch") is None:  # the plan found that no predictor pays on its device
            return None, None, None
        predictor = predictor_from_json(schedule["prefetch"])
    elif prefetch == "static" and not schedule:
        predictor = far
    elif prefetch in PREDICTORS:
        if not schedule:
            raise ConfigError(f"prefetch='{prefetch}' needs a schedule in the bundle: run `edgemoe plan` first")
        predictor = predictor_from_json(schedule.get("predictors", {}).get(prefetch, {"name": prefetch}))
    else:
        raise ConfigError(f"unknown prefetch predictor '{prefetch}' (known: {', '.join(PREDICTORS)}, plan)")
    if predictor.name == "pregate":
        return "pregate", None, far
    if not predictor.looks_ahead:
        return predictor.name, predictor, None
    return prefetch, predictor, far


class MoeDispatch:
    """Runs a task's MoE layers on the expert cache, with the task's prefetch plan.

    Args:
        cache: The expert cache (loads, evictions, background prefetch).
        num_layers: MoE layers of the model.
        depth: MoE steps a prefetch looks ahead.

    Attributes:
        prefetch: The prefetch mode in use (None: loads on demand only).
    """

    def __init__(self, cache: ExpertCache, num_layers: int, depth: int):
        self.cache = cache
        self.num_layers = num_layers
        self.depth = depth
        self.prefetch: str | None = None
        self._near = None
        self._far = None
        self._resident: tuple[tuple[int, int], ...] = ()

    def set_plan(self, prefetch: str | None, near, far, resident: tuple[tuple[int, int], ...]) -> None:
        """Use a task's prefetch mode, predictors (:func:`choose_predictor`) and resident set.

        The plan's resident set is never evicted by a prefetch, so prefetching does not trade hot
        experts for streamed ones.
        """
        self.prefetch, self._near, self._far, self._resident = prefetch, near, far, resident

    def begin(self) -> None:
        """Queue the first layers' experts at a run's start (they load while the trunk runs)."""
        if self.prefetch is not None:
            begin_run(self.cache, self.lookahead(-1, [], None), self._resident)

    def layer(
        self,
        program,
        run: object,
        layer: int,
        task: str,
        kept: frozenset[int],
        routing: list[np.ndarray],
        pregate: list | None,
    ) -> None:
        """Route ``layer``'s tokens and run every routed expert (loading it first if it is not cached).

        Args:
            program: The task's program on the executor.
            run: The run's state in ``program``.
            layer: MoE layer index.
            task: The task (for messages).
            kept: The experts the task may route to at this layer.
            routing: Gets the layer's expert indices appended.
            pregate: Gets the next layer's gate on this layer's MoE input appended (None: not kept).

        Raises:
            BundleError: The gate chose an expert outside the task's kept set.
        """
        cache = self.cache
        idx, _ = program.route(run, layer)
        routing.append(idx)
        experts = [int(e) for e in np.unique(idx)]
        for e in experts:
            if e not in kept:
                # The gate is masked to the kept set, so this means the bundle is inconsistent.
                raise BundleError(f"task '{task}' routed to expert {e} of layer {layer}, outside its kept set")
        nxt = None
        if layer + 1 < self.num_layers and (self.prefetch == "pregate" or pregate is not None):
            nxt = program.pregate(run, layer + 1)
            if pregate is not None:
                pregate.append(nxt)

        def run_expert(_j: int, key: tuple[int, int]) -> None:
            tok, slot = np.nonzero(idx == key[1])
            # Pinned while the kernel runs: eviction cannot free the weights under it.
            w = cache.acquire(key)
            try:
                program.expert(run, layer, key[1], tok, slot, w)
            finally:
                cache.release(key)

        keys = [(layer, e) for e in experts]
        ahead = self.lookahead(layer, experts, nxt)
        run_step(cache, layer, keys, ahead, self._resident, run_expert, fetch=self.prefetch is not None)
        program.finish_layer(run, layer)

    def lookahead(self, layer: int, experts: list[int], nxt: np.ndarray | None) -> list[tuple[int, int]]:
        """The experts to prefetch at ``layer`` (-1: a run's start), in the order they will be needed.

        ``nxt``: the next layer's gate on this layer's MoE input (pre-gating), where computed.
        """
        if self.prefetch is None:
            return []
        near, pregate = self._near, None
        if self.prefetch == "pregate" and nxt is not None:
            # Pre-gating: the next layer's gate on this layer's MoE input names its experts one layer ahead.
            near, pregate = PreGate(), [int(e) for e in np.unique(nxt)]
        if layer < 0:
            near = None  # nothing routed yet: the calibration order names the first layers
        return lookahead(near, self._far, layer, experts, pregate, self.num_layers, self.depth)
