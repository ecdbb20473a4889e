"""One MoE step under the swap rules: the protocol the runtime runs and the simulator replays.

A step is one MoE layer of one run (a batch) or of one token. When its routing is known the
cache is told which experts it will access (the policy's view of the step); with prefetch on,
the step's own misses start loading at once and its cached experts run first
(:func:`~edgemoe.swap.book.fetch_rule`); the experts of the coming steps are prefetched in the
order they will be needed, sparing this step's experts and the plan's resident set; then the
step's experts run one after another (ascending without prefetch; each pinned while it runs)
and, after each, the prefetches that found no room are retried (the expert just done may have
made it). The runtime calls :func:`run_step` with its
:class:`~edgemoe.runtime.expert_cache.ExpertCache`, the simulator with a cache on a virtual clock:
both make the same decisions and log the same events for the same trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .book import Key


class StepCache(Protocol):
    """What :func:`run_step` needs of a cache."""

    def begin_step(self, layer: int, keys: Sequence[Key]) -> None:
        """The step's routing is known."""

    def prefetch(self, keys: Sequence[Key], protect: Sequence[Key] = ()) -> tuple[Key, ...]:
        """Start loads of ``keys`` (see :func:`~edgemoe.swap.book.prefetch_rule`); returns those not issued."""

    def fetch(self, keys: Sequence[Key]) -> tuple[Key, ...]:
        """Start loads of the step's own misses (see :func:`~edgemoe.swap.book.fetch_rule`); returns the run order."""


def run_step(
    cache: StepCache,
    layer: int,
    keys: Sequence[Key],
    ahead: Sequence[Key],
    resident: Sequence[Key],
    run_expert: Callable[[int, Key], None],
    fetch: bool = False,
) -> None:
    """Run one step.

    Args:
        cache: The expert cache (the runtime's, or the simulator's).
        layer: The step's MoE layer.
        keys: The step's experts, ascending.
        ahead: The experts of the coming steps to prefetch, in the order they are needed
            (:func:`~edgemoe.swap.predict.lookahead`), or nothing without prefetch.
        resident: The plan's resident set (prefetches never evict it).
        run_expert: Runs the ``j``-th expert of ``keys`` (``key``): acquire its weights from the
            cache (a hit or a miss), compute, release. The results must not depend on the order
            the experts run in (the program sums their outputs in ascending order).
        fetch: Load the step's misses at once and run its cached experts first (prefetch on).
    """
    keys, ahead, resident = tuple(keys), tuple(ahead), tuple(resident)
    cache.begin_step(layer, keys)
    order = cache.fetch(keys) if fetch else keys
    pending = cache.prefetch(ahead, protect=(*keys, *resident)) if ahead else ()
    for i, key in enumerate(order):
        run_expert(keys.index(key), key)
        if pending and key not in resident:
            done = ahead[: len(ahead) - len(pending)]  # issued already: due before the pending ones
            pending = cache.prefetch(pending, protect=(*order[i + 1 :], *resident, *done))


def begin_run(cache: StepCache, ahead: Sequence[Key], resident: Sequence[Key]) -> None:
    """Before a run (or a unit of a trace) starts: prefetch its first layers' experts (calibration order)."""
    if ahead:
        cache.prefetch(ahead, protect=tuple(resident))
