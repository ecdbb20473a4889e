"""Belady's MIN: the offline bound the planner scores policies against (needs the future)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..swap.book import Key
from ..swap.policies import Policy


class Belady(Policy):
    """Belady's MIN, exact per access: evict the expert whose next access is furthest away (oracle only).

    The future is the sequence of single accesses: step after step and, within a step, its keys
    in the order given, which must be the order the replay accesses them in (the simulator's and
    the runtime's: ascending expert, as :meth:`~edgemoe.schedule.traces.Trace.keys`). Next use
    counted in whole steps is not enough: of two experts next needed in one step, evicting the
    one accessed first there brings its miss forward while the other still holds a slot, and that
    miss may have to evict an expert needed soon after (MIN evicts the one accessed later).
    Experts never accessed again are furthest (ties among them: least recently used first).

    With experts of one size this is optimal: no choice of victims gets more hits on the trace
    (tests check it against exhaustive search). With mixed sizes the cache evicts victims one by
    one until the missed expert fits, and MIN is then a heuristic, not a bound: a few small
    victims may beat one large one (optimal caching of mixed sizes is NP-hard).

    Args:
        steps: The scored trace: per step, its keys in access order.
    """

    name = "belady"

    def __init__(self, steps: Sequence[Iterable[Key]]):
        super().__init__()
        # Per key, its accesses as (step, position within the step), in trace order.
        self.uses: dict[Key, list[tuple[int, int]]] = {}
        for i, keys in enumerate(steps):
            for j, k in enumerate(keys):
                self.uses.setdefault(k, []).append((i, j))
        self.cursor: dict[Key, int] = {}

    def next_access(self, key: Key) -> tuple[float, int]:
        """(step, position within the step) of the next access of ``key``; (inf, 0): never again."""
        uses = self.uses.get(key, [])
        i = self.cursor.get(key, 0)
        while i < len(uses) and (uses[i][0] < self.step or (uses[i][0] == self.step and key in self.done)):
            i += 1
        self.cursor[key] = i
        return uses[i] if i < len(uses) else (math.inf, 0)

    def next_use(self, key: Key) -> float:
        """Step index of the next use of ``key`` (inf: never again)."""
        return self.next_access(key)[0]

    def victim(self, candidates: Sequence[Key]) -> Key:
        # Finite next accesses are distinct (one key per position), so only never-again keys tie.
        return max(candidates, key=lambda k: (self.next_access(k), -self.last_use.get(k, -1)))
