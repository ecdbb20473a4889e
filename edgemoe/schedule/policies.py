"""Eviction policies and the expert-cache bookkeeping shared by the simulator and the runtime.

An expert is keyed ``(layer, expert)``. :class:`CacheBook` tracks which experts are cached, their
bytes, pins and in-flight loads against a byte capacity and asks a policy for victims; it holds
no weights and does no I/O, so the simulator and the runtime make the very same decisions for the
same access sequence (their misses agree exactly). Pure Python: the runtime imports it on devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..errors import ConfigError

Key = tuple[int, int]

POLICIES = ("lru", "lfu", "planned")


class Policy:
    """Chooses what to evict. Subclasses override :meth:`victim` and may use the hooks.

    The cache calls :meth:`begin_step` when a layer's routing is known, :meth:`touch` on every
    access (hit or after a load) and :meth:`inserted` / :meth:`evicted` as entries come and go.
    """

    name = "policy"

    def __init__(self) -> None:
        self.clock = 0
        self.last_use: dict[Key, int] = {}
        self.layer = 0
        self.step = 0
        self.step_keys: frozenset[Key] = frozenset()
        self.done: set[Key] = set()

    def begin_step(self, step: int, layer: int, keys: Iterable[Key]) -> None:
        """A new step (one layer of one token or batch) that will access ``keys``."""
        self.step, self.layer, self.step_keys, self.done = step, layer, frozenset(keys), set()

    def touch(self, key: Key) -> None:
        """``key`` was accessed."""
        self.clock += 1
        self.last_use[key] = self.clock
        self.done.add(key)

    def inserted(self, key: Key) -> None:
        """``key`` entered the cache."""
        self.last_use.setdefault(key, self.clock)

    def evicted(self, key: Key) -> None:
        """``key`` left the cache."""

    def victim(self, candidates: Sequence[Key]) -> Key:
        """The candidate to evict (default: least recently used)."""
        return min(candidates, key=lambda k: self.last_use.get(k, -1))

    def new_task(
        self, prob: Sequence[Sequence[float]] | None, recency: Sequence[Sequence[float]] | None = None
    ) -> None:
        """The session switched task; ``prob`` (and ``recency``) are the new task's plan (recency counters stay)."""

    def outliving(self, candidates: list[Key], key: Key) -> list[Key]:
        """The candidates a prefetch of ``key`` may evict: those not expected back sooner than ``key``.

        A prefetch that evicts an expert needed before the one it brings in only moves a miss
        earlier and adds a load. Recency and frequency do not tell when an expert is needed
        next, so the base policy allows every candidate.
        """
        return candidates


class LRU(Policy):
    """Evict the least recently used expert."""

    name = "lru"


class LFU(Policy):
    """Evict the least frequently used expert (counts kept across evictions; ties: LRU)."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.count: dict[Key, int] = {}

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.count[key] = self.count.get(key, 0) + 1

    def victim(self, candidates: Sequence[Key]) -> Key:
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last_use.get(k, -1)))


class Planned(Policy):
    """Trace-planned eviction: evict the expert expected to be needed furthest in the future.

    Learned from calibration traces only: ``prob[l][e]`` is the fraction of steps of layer ``l``
    that used expert ``e``. Layers are visited cyclically, so an expert of layer ``l_e`` is next
    reached in ``d = (l_e - l_now) mod L`` steps and, each visit being used with probability ``p``,
    its expected next use lies ``d + L (1 - p) / p`` steps away: Belady's rule with the future
    replaced by its expectation.

    With ``recency`` (token-routed models, whose routing is not independent from one token to the
    next), visits are not independent: ``recency[l][r - 1]`` is the expected number of visits of
    layer ``l`` until an expert is used again, given that its last use was ``r`` visits ago (the
    last entry also covers older uses and experts not used yet in this session), measured on
    calibration traces (:func:`~edgemoe.schedule.planner.recency_table`). The expected next use is
    then ``d + L (recency[l][r - 1] - 1)``: a learned mix of frequency and recency.

    Args:
        prob: Per layer, per expert, probability that a step of that layer uses the expert.
        recency: Per layer, expected visits to the next use by visits since the last use, or None.
    """

    name = "planned"

    def __init__(self, prob: Sequence[Sequence[float]], recency: Sequence[Sequence[float]] | None = None):
        super().__init__()
        self.prob = [list(map(float, p)) for p in prob]
        self.layers = len(self.prob)
        self.recency = None if recency is None else [list(map(float, r)) for r in recency]
        # Per layer, per expert seen: visits of the layer since the expert's last use (1: used at the last one).
        self.since: dict[int, dict[int, int]] = {}
        # expected_next_use per key, valid until the step, the key's use or the task changes
        # (victim searches ask for every cached key again and again within a step).
        self._due: dict[Key, float] = {}

    def begin_step(self, step: int, layer: int, keys: Iterable[Key]) -> None:
        keys = tuple(keys)
        since = self.since.setdefault(layer, {})
        for e in since:
            since[e] += 1
        for lk, e in keys:
            if lk == layer:
                since[e] = 1
        super().begin_step(step, layer, keys)
        self._due.clear()

    def touch(self, key: Key) -> None:
        super().touch(key)
        self._due.pop(key, None)

    def expected_next_use(self, key: Key) -> float:
        """Expected steps until ``key`` is used again (inf: never seen in calibration)."""
        due = self._due.get(key)
        if due is None:
            due = self._due[key] = self._expected_next_use(key)
        return due

    def _expected_next_use(self, key: Key) -> float:
        layer, expert = key
        p = self.prob[layer][expert] if layer < self.layers and expert < len(self.prob[layer]) else 0.0
        if p <= 0:
            # Never used in calibration. Unless this session has used it since (calibration traces are
            # short: a model with sticky routing can leave an expert out of them), it is not expected back.
            if layer >= self.layers or expert not in self.since.get(layer, {}):
                return math.inf
            # It is in use after all: with no recency table, rate it as the layer's rarest calibrated expert.
            p = min((q for q in self.prob[layer] if q > 0), default=1.0)
        d = (layer - self.layer) % self.layers
        if d == 0 and (key in self.done or key not in self.step_keys):
            d = self.layers
        if d == 0:
            return 0.0
        if self.recency is not None and layer < len(self.recency) and self.recency[layer]:
            table = self.recency[layer]
            r = self.since.get(layer, {}).get(expert, len(table))
            return d + self.layers * (table[min(r, len(table)) - 1] - 1.0)
        return d + self.layers * (1.0 - p) / p

    def victim(self, candidates: Sequence[Key]) -> Key:
        return max(candidates, key=lambda k: (self.expected_next_use(k), -self.last_use.get(k, -1)))

    def outliving(self, candidates: list[Key], key: Key) -> list[Key]:
        # A prefetch names ``key`` for its layer's next visit: it is due then, whatever its prior estimate
        # (on token-routed plans the recency estimate of a predicted expert lies many visits away, and
        # comparing against it vetoed nearly every prefetch).
        due = (key[0] - self.layer) % self.layers or self.layers
        return [v for v in candidates if self.expected_next_use(v) > due]

    def new_task(
        self, prob: Sequence[Sequence[float]] | None, recency: Sequence[Sequence[float]] | None = None
    ) -> None:
        # The old task's experts the new one never uses get p = 0: evicted first. Recency counters stay,
        # except theirs: the old task's use of them says nothing of the new one's.
        if prob is not None:
            self.prob = [list(map(float, p)) for p in prob]
            self.layers = len(self.prob)
            for layer, since in self.since.items():
                row = self.prob[layer] if layer < self.layers else []
                for e in [e for e in since if e >= len(row) or row[e] <= 0]:
                    del since[e]
            self._due.clear()
        if recency is not None:
            self.recency = [list(map(float, r)) for r in recency]
            self._due.clear()


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


def make_policy(
    name: str, prob: Sequence[Sequence[float]] | None = None, recency: Sequence[Sequence[float]] | None = None
) -> Policy:
    """A fresh policy by name (``lru``, ``lfu``, ``planned``; ``planned`` needs ``prob`` and may take ``recency``).

    Raises:
        ConfigError: Unknown name, or ``planned`` without probabilities.
    """
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU()
    if name == "planned":
        if prob is None:
            raise ConfigError("the planned policy needs per-expert probabilities from calibration traces")
        return Planned(prob, recency)
    raise ConfigError(f"unknown cache policy '{name}' (known: {', '.join(POLICIES)})")


class CacheBook:
    """Which experts are cached or loading, within a byte capacity; no data, no locking.

    Args:
        capacity: Bytes the cached and in-flight experts may occupy together.
        sizes: Bytes of each expert that may be cached.
        policy: Eviction policy.

    Raises:
        ConfigError: The capacity cannot hold the largest expert.
    """

    def __init__(self, capacity: int, sizes: dict[Key, int], policy: Policy):
        self.capacity, self.sizes, self.policy = int(capacity), dict(sizes), policy
        largest = max(self.sizes.values(), default=0)
        if self.capacity < largest:
            raise ConfigError(f"expert cache of {self.capacity} bytes cannot hold the largest expert ({largest} bytes)")
        self.cached: dict[Key, bool] = {}  # key -> ready (False while its load is in flight)
        self.pins: dict[Key, int] = {}
        self.used = 0
        self.peak = 0
        self.hits = self.misses = self.evictions = 0
        self.bytes_loaded = 0

    def evictable(self, keep: Iterable[Key] = ()) -> list[Key]:
        """Ready, unpinned entries not in ``keep``."""
        keep = keep if isinstance(keep, set | frozenset) else set(keep)
        return [k for k, ready in self.cached.items() if ready and not self.pins.get(k) and k not in keep]

    def room_for(
        self, key: Key, keep: Iterable[Key] = (), prefer: Sequence[Key] = (), prefetch: bool = False
    ) -> list[Key] | None:
        """Victims to evict so that ``key`` fits, or None if pins (for a prefetch, also the policy) prevent it.

        Evictable entries of ``prefer`` go first, in that order (a task switch's unload list),
        then the policy's choices. For a ``prefetch``, only entries the policy expects back later
        than ``key`` are candidates (:meth:`Policy.outliving`).
        """
        need = self.used + self.sizes[key] - self.capacity
        victims: list[Key] = []
        if need <= 0:
            return victims
        candidates = self.evictable(keep)
        if prefetch:
            candidates = self.policy.outliving(candidates, key)
        for v in prefer:
            if need <= 0:
                break
            if v in candidates:
                candidates.remove(v)
                victims.append(v)
                need -= self.sizes[v]
        while need > 0:
            if not candidates:
                return None
            v = self.policy.victim(candidates)
            candidates.remove(v)
            victims.append(v)
            need -= self.sizes[v]
        return victims

    def evict(self, key: Key) -> None:
        """Drop ``key``."""
        del self.cached[key]
        self.used -= self.sizes[key]
        self.evictions += 1
        self.policy.evicted(key)

    def reserve(self, key: Key) -> None:
        """Account for ``key`` as in flight (room must have been made)."""
        self.cached[key] = False
        self.used += self.sizes[key]
        self.peak = max(self.peak, self.used)
        if self.used > self.capacity:  # a bookkeeping bug, never a user error
            raise AssertionError(f"expert cache over budget: {self.used} > {self.capacity}")
        self.bytes_loaded += self.sizes[key]
        self.policy.inserted(key)

    def ready(self, key: Key) -> None:
        """``key``'s load finished."""
        self.cached[key] = True
