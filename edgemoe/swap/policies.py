"""Eviction policies: which cached expert to drop when a load needs room.

An expert is keyed ``(layer, expert)``. :class:`~edgemoe.swap.book.CacheBook` asks the policy for
victims; the runtime's cache and the simulator share both. Pure Python: the runtime imports it on
devices.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..errors import ConfigError
from .book import Key

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


def count_probabilities(manifest: dict, task: str) -> list[list[float]]:
    """Without a schedule: per-expert use probability of ``task`` from the manifest's calibration token counts.

    ``counts / total * top_k``, capped at 1 (what the planned policy rates experts by).
    """
    layers = manifest["moe_layers"]
    out = []
    for layer, counts in zip(layers, manifest["tasks"][task].get("expert_counts", []), strict=False):
        c = [float(v) for v in counts]
        total = max(sum(c), 1.0)
        out.append([min(1.0, v / total * int(layer["top_k"])) for v in c])
    return out or [[1.0] * int(layer["num_experts"]) for layer in layers]
