"""Replay a routing trace against an expert cache, a policy, a prefetcher and a device profile.

Time model: one loader channel moves experts at the profile's load bandwidth (slowest tier from
storage to where experts run), serially: background loads take it in the order they were queued,
each when it frees, and a demand load goes ahead of those not started yet (as the runtime's
loader thread); experts compute at the profile's throughput (2 FLOP per
fp32 weight per token) but no faster than their weights stream from DRAM at its memory
bandwidth (a roofline: a decoded token is bound by the bytes), and so do the dense graphs
between MoE layers when their bytes are given (:class:`DenseCost`; attention's term quadratic in
tokens is left out): loads overlap that compute, as they do in the runtime. Without prefetch a
step accesses its experts in ascending order, as the runtime does, and a miss stalls until its
load lands. Prefetch follows the runtime's rules: a step's misses are queued as soon as it is
routed and its cached experts run first (:func:`~edgemoe.swap.book.fetch_rule`); then the
experts of the next ``depth`` steps
(:func:`~edgemoe.swap.predict.lookahead`: the predictor for the next layer, the calibration
order beyond it and past a unit's last layer) are queued in the order they will be needed, sparing
the step's own experts, the resident set and whatever the policy expects back sooner; keys that
find no room are retried after each expert of the step is done; a unit's first layers are
prefetched before it starts. The rules are :mod:`edgemoe.swap`'s, which the runtime runs too
(:class:`VirtualCache` is its cache on a virtual clock), so predicted and measured misses — and the
event logs — agree for the same trace and policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..devices import DeviceProfile
from ..swap.book import CacheBook, Key, fetch_rule, prefetch_rule
from ..swap.policies import Policy
from ..swap.predict import Predictor, PreGate, Static, lookahead
from ..swap.step import begin_run, run_step
from ..swap.switch import SwitchMoves, plan_switch
from .traces import Trace


@dataclass(frozen=True)
class DenseCost:
    """Bytes of a task's dense graphs around its MoE layers, for the simulated compute time.

    Attributes:
        before: Per MoE layer, bytes of what runs before it (the segment and the gate; the first
            segment also embeds the input).
        after: Bytes of what runs after the last MoE layer (the last segment and the task's head).
        top_k: Per MoE layer, experts per token (a step's tokens are its routed slots over ``top_k``).
    """

    before: tuple[int, ...]
    after: int
    top_k: tuple[int, ...]


@dataclass(frozen=True)
class SimResult:
    """Outcome of one replay.

    Attributes:
        policy: Eviction policy name.
        predictor: Prefetch predictor name, or "" without prefetch.
        capacity_bytes: Cache capacity.
        accesses: Expert accesses.
        hits: Accesses that found the expert cached or loading (prefetched).
        misses: Accesses that had to load the expert on demand.
        hit_rate: ``hits / accesses``.
        bytes_moved: Bytes loaded (on demand and prefetched).
        evictions: Experts evicted.
        peak_bytes: Most bytes cached or in flight at once (never above the capacity).
        time_s: Simulated time of the trace.
        compute_s: Compute time (experts, and dense graphs when their cost was given).
        stall_s: Time compute waited for loads.
        prefetch_issued: Prefetch loads issued.
        prefetch_used: Prefetched experts accessed before being evicted.
        recall: Fraction of predicted-step experts the predictor named (NaN without prefetch).
        hit_rate_ahead: Hit rate over steps a prefetch could target (every layer but a unit's first).
        accesses_ahead: Accesses in those steps.
        timeline: (start s, end s, kind, layer, expert) per load / compute / stall.
        memory: (time s, bytes cached or in flight) after every change.
        events: The decisions' event log (``simulate(..., log=True)``), else None.
    """

    policy: str
    predictor: str
    capacity_bytes: int
    accesses: int
    hits: int
    misses: int
    hit_rate: float
    bytes_moved: int
    evictions: int
    peak_bytes: int
    time_s: float
    compute_s: float
    stall_s: float
    prefetch_issued: int = 0
    prefetch_used: int = 0
    recall: float = float("nan")
    hit_rate_ahead: float = float("nan")
    accesses_ahead: int = 0
    timeline: list = field(default_factory=list, repr=False)
    memory: list = field(default_factory=list, repr=False)
    events: list | None = field(default=None, repr=False)

    def summary(self) -> dict:
        """JSON summary (no timeline)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("timeline", "memory", "events")}
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}


class VirtualCache:
    """The swap rules on a virtual clock: the runtime's cache, with time instead of data.

    One loader channel moves experts at ``bw`` bytes/s, serially, demand loads ahead of queued
    background ones; a miss stalls until its load lands; compute takes its FLOPs at ``flops``.
    Decisions go through the same :class:`~edgemoe.swap.book.CacheBook` and
    :func:`~edgemoe.swap.book.prefetch_rule` as the runtime's
    :class:`~edgemoe.runtime.expert_cache.ExpertCache`, and steps through the same
    :func:`~edgemoe.swap.step.run_step`.
    """

    def __init__(self, book: CacheBook, bw: float, flops: float, keep_timeline: bool):
        self.book, self.bw, self.flops, self.keep = book, bw, flops, keep_timeline
        self.now = self.loader_free = self.stall = self.compute = 0.0
        self.arrival: dict[Key, float] = {}  # loads on the channel: when each lands
        # Background loads (prefetches, a step's early fetches) not on the channel yet, with when
        # each was queued: as the runtime's loader thread, each takes the channel only when it
        # frees, so a demand load goes ahead of those still waiting (and takes one it needs).
        self.queued: dict[Key, float] = {}
        self.prefetched: set[Key] = set()
        self.issued = self.used = 0
        self.timeline: list = []
        self.memory: list = [(0.0, 0)]

    def _load(self, key: Key, since: float) -> float:
        """Put ``key`` on the channel, no earlier than ``since``; returns when it lands."""
        start = max(since, self.loader_free)
        self.loader_free = start + (self.book.sizes[key] / self.bw if self.bw else 0.0)
        if self.keep:
            self.timeline.append((start, self.loader_free, "load", *key))
        return self.loader_free

    def _next_start(self) -> float:
        """When the first queued load takes the channel (it has to be free and the load queued)."""
        return max(next(iter(self.queued.values())), self.loader_free)

    def _dequeue(self, until: float) -> None:
        """Queued loads that take the channel by ``until`` go on it, in queue order."""
        while self.queued and self._next_start() <= until:
            key, since = next(iter(self.queued.items()))
            del self.queued[key]
            self.arrival[key] = self._load(key, since)

    def settle(self) -> None:
        """Loads due by now land."""
        self._dequeue(self.now)
        for k, t in list(self.arrival.items()):
            if t <= self.now:
                self.book.ready(k)
                del self.arrival[k]

    def _make_room(self, key: Key) -> bool:
        while True:
            self.settle()
            victims = self.book.room_for(key)
            if victims is not None:
                for v in victims:
                    self.book.evict(v)
                    self.prefetched.discard(v)
                return True
            if not self.arrival:
                if not self.queued:
                    return False
                self._dequeue(self._next_start())  # the loader takes up the next queued load
            self.now = max(self.now, min(self.arrival.values()))  # wait for an in-flight load to land

    def warm(self, keys: Iterable[Key]) -> None:
        """Load ``keys`` before the trace (a plan's resident set), uncounted."""
        loaded_before = self.book.bytes_loaded
        for key in keys:
            if key in self.book.sizes and key not in self.book.cached and self._make_room(key):
                self.book.reserve(key)
                self.book.ready(key)
        self.book.bytes_loaded = loaded_before

    def begin_step(self, layer: int, keys: Sequence[Key]) -> None:
        self.book.begin_step(layer, keys)

    def _start(self, key: Key, victims: list[Key], prefetch: bool) -> None:
        """Evict ``victims`` and start loading ``key`` in the background (a prefetch, or a step's early fetch)."""
        for v in victims:
            self.book.evict(v)
            self.prefetched.discard(v)
        self.book.reserve(key, prefetch=prefetch)
        self.queued[key] = self.now
        if prefetch:
            self.prefetched.add(key)
            self.issued += 1
        self.memory.append((self.now, self.book.used))

    def prefetch(self, keys: Sequence[Key], protect: Sequence[Key] = ()) -> tuple[Key, ...]:
        return prefetch_rule(self.book, keys, protect, lambda k, v: self._start(k, v, True), self.settle)

    def fetch(self, keys: Sequence[Key]) -> tuple[Key, ...]:
        return fetch_rule(self.book, keys, lambda k, v: self._start(k, v, False), self.settle)

    def acquire(self, key: Key) -> bool:
        """Access ``key`` (waiting for its load if it is in flight or missing); returns whether it hit.

        A miss its step fetched early (:meth:`fetch`) waits for that load and is no hit.
        """
        self.settle()
        fetched = key in self.book.claimed
        hit = self.book.access(key)
        if hit:
            if key in self.queued:  # not on the channel yet: the access loads it itself, now
                self.arrival[key] = self._load(key, self.now)
                del self.queued[key]
            if key in self.arrival:  # still loading: wait for it
                if self.keep:
                    self.timeline.append((self.now, self.arrival[key], "stall", *key))
                self.stall += self.arrival[key] - self.now
                self.now = self.arrival[key]
                self.settle()
            if key in self.prefetched:
                self.used += 1
                self.prefetched.discard(key)
            hit = not fetched
        else:
            self._make_room(key)
            self.book.reserve(key)
            self.memory.append((self.now, self.book.used))
            done = self._load(key, self.now)
            if self.keep:
                self.timeline.append((self.now, done, "stall", *key))
            self.stall += done - self.now
            self.now = done
            self.book.ready(key)
        self.book.policy.touch(key)
        return hit

    def run(self, seconds: float, kind: str, layer: int, expert: int) -> None:
        """Compute for ``seconds``; loads in flight proceed meanwhile."""
        if self.keep and seconds:
            self.timeline.append((self.now, self.now + seconds, kind, layer, expert))
        self.now += seconds
        self.compute += seconds
        if kind == "compute":
            self.memory.append((self.now, self.book.used))

    def finish(self) -> None:
        """Prefetches still queued or in flight land (times unchanged: nothing waits for them)."""
        self._dequeue(float("inf"))
        for key in self.arrival:
            self.book.ready(key)
        self.arrival.clear()


def simulate(
    trace: Trace,
    sizes: dict[Key, int],
    capacity: int,
    policy: Policy,
    profile: DeviceProfile | None = None,
    predictor: Predictor | None = None,
    warm: Iterable[Key] = (),
    keep_timeline: bool = False,
    resident: Iterable[Key] = (),
    book: CacheBook | None = None,
    far: Static | None = None,
    depth: int = 1,
    dense: DenseCost | None = None,
    log: bool = False,
) -> SimResult:
    """Replay ``trace``.

    Args:
        trace: Routing trace to replay.
        sizes: Bytes of every expert that may be cached, by ``(layer, expert)``.
        capacity: Cache capacity in bytes.
        policy: Fresh eviction policy (it keeps state).
        profile: Device for timing (None: loads and compute take no time; counts only).
        predictor: Prefetch predictor, or None.
        warm: Experts loaded before the trace starts (a plan's resident set), not counted.
        keep_timeline: Record the timeline and memory samples (for plots).
        resident: The plan's resident set: prefetches never evict it (demand misses may).
        book: Continue on this cache (built with ``capacity``, ``sizes`` and ``policy``) instead
            of an empty one, e.g. to replay a task switch after the trace; its counters then
            accumulate over the replays. The replay ends with every load landed.
        far: Calibration order for the prefetch steps beyond the next one and for a unit's first
            layers (the runtime's; None: the predictor's next layer only).
        depth: Steps a prefetch looks ahead (the runtime's ``prefetch_depth``; 1: the next layer).
        dense: Dense graphs' bytes, to time their compute (None: only experts compute).
        log: Record the decisions' event log in ``book.events`` (a fresh book only).

    Returns:
        The replay's counters, times and (optionally) timeline.
    """
    book = CacheBook(capacity, sizes, policy, log=log) if book is None else book
    bw = profile.load_gbs() * 1e9 if profile and profile.load_gbs() > 0 else 0.0
    flops = profile.compute_gflops * 1e9 if profile and profile.compute_gflops > 0 else 0.0
    dram = profile.memory_bandwidth_gbs * 1e9 if flops and profile.memory_bandwidth_gbs > 0 else 0.0
    vc = VirtualCache(book, bw, flops, keep_timeline)

    def compute_s(nbytes: int, tokens: float) -> float:
        """A graph's time on ``tokens`` (roofline): 2 FLOP per fp32 weight per token, or its weights' DRAM read.

        The read bounds a decoded token: one token does too few FLOPs per byte.
        """
        if not flops or not nbytes:
            return 0.0
        return max(tokens * nbytes / 2 / flops, nbytes / dram if dram else 0.0)

    if predictor is not None and not predictor.looks_ahead:
        far = None  # as the runtime (choose_predictor)
    named = needed = 0
    ahead_hits = ahead_accesses = 0
    resident = tuple(resident)

    def run_dense(nbytes: int, tokens: float, layer: int) -> None:
        vc.run(compute_s(nbytes, tokens), "dense", layer, -1)

    def plan_ahead(i: int) -> list[Key]:
        step, nxt = trace.steps[i], trace.steps[i + 1] if i + 1 < len(trace.steps) else None
        near, pregate = predictor, None
        if isinstance(predictor, PreGate):
            # the runtime runs the next layer's gate only within a unit
            same = nxt is not None and nxt.unit == step.unit and nxt.layer == step.layer + 1
            near, pregate = (predictor, nxt.pregate) if same and step.layer + 1 < trace.num_layers else (None, None)
        return lookahead(near, far, step.layer, step.experts, pregate, trace.num_layers, depth)

    vc.warm(warm)
    for i, step in enumerate(trace.steps):
        keys = trace.keys(i)
        prev = trace.steps[i - 1] if i else None
        if predictor is not None and far is not None and (prev is None or prev.unit != step.unit):
            # a unit's first layers, from the calibration order, before it starts (as Session.run)
            begin_run(vc, lookahead(None, far, -1, (), None, trace.num_layers, depth), resident)
        unit_tokens = sum(step.tokens) / dense.top_k[step.layer] if dense else 0.0
        if dense:  # the segment (and gate) before this MoE layer; loads in flight proceed meanwhile
            run_dense(dense.before[step.layer], unit_tokens, step.layer)
        ahead: list[Key] = plan_ahead(i) if predictor is not None else []
        nxt = trace.steps[i + 1] if i + 1 < len(trace.steps) else None
        if ahead and nxt is not None and nxt.unit == step.unit and nxt.layer == step.layer + 1:
            named += len({e for layer, e in ahead if layer == nxt.layer} & set(nxt.experts))
            needed += len(nxt.experts)
        ahead_step = prev is not None and prev.unit == step.unit and prev.layer + 1 == step.layer

        def run_expert(j: int, key: Key, step=step, ahead_step=ahead_step) -> None:
            nonlocal ahead_hits, ahead_accesses
            ahead_accesses += ahead_step
            if vc.acquire(key):
                ahead_hits += ahead_step
            vc.run(compute_s(sizes[key], step.tokens[j]), "compute", *key)

        run_step(vc, step.layer, keys, ahead, resident, run_expert, fetch=predictor is not None)
        if dense and (nxt is None or nxt.unit != step.unit):
            run_dense(dense.after, unit_tokens, trace.num_layers)  # the last segment and the head
    vc.finish()
    accesses = book.hits + book.misses
    return SimResult(
        policy=policy.name,
        predictor=predictor.name if predictor else "",
        capacity_bytes=int(capacity),
        accesses=accesses,
        hits=book.hits,
        misses=book.misses,
        hit_rate=book.hits / accesses if accesses else 1.0,
        bytes_moved=book.bytes_loaded,
        evictions=book.evictions,
        peak_bytes=book.peak,
        time_s=vc.now,
        compute_s=vc.compute,
        stall_s=vc.stall,
        prefetch_issued=vc.issued,
        prefetch_used=vc.used,
        recall=named / needed if needed else float("nan"),
        hit_rate_ahead=ahead_hits / ahead_accesses if ahead_accesses else float("nan"),
        accesses_ahead=ahead_accesses,
        timeline=vc.timeline,
        memory=vc.memory,
        events=book.events,
    )


@dataclass(frozen=True)
class SwitchResult:
    """Predicted cost of a task switch on a cache.

    Attributes:
        source: Task switched from.
        target: Task switched to.
        moves: Experts freed, loaded and left in place (the runtime makes the same moves).
        time_s: Time of the switch's loads, serially over the profile's load channel (evictions
            are free; 0 without a profile).
    """

    source: str
    target: str
    moves: SwitchMoves
    time_s: float

    def summary(self) -> dict:
        """JSON summary (the manifest's ``task_switch`` ``cost``)."""
        m = self.moves
        return {
            "experts_unloaded": len(m.evicted),
            "experts_loaded": len(m.loaded),
            "unload_bytes": m.bytes_unloaded,
            "load_bytes": m.bytes_loaded,
            "load_s": self.time_s,
        }


def simulate_switch(
    book: CacheBook,
    sizes: dict[Key, int],
    resident: Sequence[Key] = (),
    entry: dict | None = None,
    prob: Sequence[Sequence[float]] | None = None,
    profile: DeviceProfile | None = None,
    source: str = "",
    target: str = "",
) -> SwitchResult:
    """Replay a task switch on a cache left by :func:`simulate` (arguments as :func:`plan_switch`).

    Loads land at once in the book (the runtime waits for them before the new task runs).

    Returns:
        The moves and their predicted time on ``profile``.
    """
    moves = plan_switch(book, sizes, resident, entry, prob)
    for key in moves.loaded:
        book.ready(key)
    bw = profile.load_gbs() * 1e9 if profile and profile.load_gbs() > 0 else 0.0
    return SwitchResult(source, target, moves, moves.bytes_loaded / bw if bw else 0.0)
