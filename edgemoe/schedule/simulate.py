"""Replay a routing trace against an expert cache, a policy, a prefetcher and a device profile.

Time model: one loader channel moves experts at the profile's load bandwidth (slowest tier from
storage to where experts run), serially; experts compute at the profile's throughput (2 FLOP per
fp32 weight per token), and so do the dense graphs between MoE layers when their bytes are given
(:class:`DenseCost`; attention's term quadratic in tokens is left out): loads overlap that compute,
as they do in the runtime. A step accesses its experts in
ascending order, as the runtime does; a miss stalls until its load lands. Prefetch follows the
runtime's rules: when a step's routing is known, the experts of the next ``depth`` steps
(:func:`~edgemoe.schedule.predict.lookahead`: the predictor for the next layer, the calibration
order beyond it and past a unit's last layer) are queued in the order they will be needed, sparing
the step's own experts, the resident set and whatever the policy expects back sooner; keys that
find no room are retried after each expert of the step is done; a unit's first layers are
prefetched before it starts. The bookkeeping is :class:`~edgemoe.schedule.policies.CacheBook`,
shared with the runtime, so predicted and measured misses agree for the same trace and policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..devices import DeviceProfile
from .policies import CacheBook, Key, Policy
from .predict import Predictor, PreGate, Static, lookahead
from .switch import SwitchMoves, plan_switch
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

    def summary(self) -> dict:
        """JSON summary (no timeline)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("timeline", "memory")}
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in out.items()}


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

    Returns:
        The replay's counters, times and (optionally) timeline.
    """
    book = CacheBook(capacity, sizes, policy) if book is None else book
    bw = profile.load_gbs() * 1e9 if profile and profile.load_gbs() > 0 else 0.0
    flops = profile.compute_gflops * 1e9 if profile and profile.compute_gflops > 0 else 0.0
    now = loader_free = stall = compute = 0.0
    arrival: dict[Key, float] = {}
    prefetched: set[Key] = set()
    issued = used = 0
    named = needed = 0
    ahead_hits = ahead_accesses = 0
    resident = tuple(resident)
    timeline: list = []
    memory: list = [(0.0, 0)]

    def run_dense(nbytes: int, tokens: float, layer: int) -> None:
        nonlocal now, compute
        dt = tokens * nbytes / 2 / flops if flops and nbytes else 0.0  # as experts: 2 FLOP per fp32 weight
        if keep_timeline and dt:
            timeline.append((now, now + dt, "dense", layer, -1))
        now += dt
        compute += dt

    def load(key: Key) -> float:
        nonlocal loader_free
        start = max(now, loader_free)
        loader_free = start + (sizes[key] / bw if bw else 0.0)
        if keep_timeline:
            timeline.append((start, loader_free, "load", *key))
        return loader_free

    def settle() -> None:
        for k, t in list(arrival.items()):
            if t <= now:
                book.ready(k)
                del arrival[k]

    def make_room(key: Key) -> bool:
        nonlocal now
        while True:
            settle()
            victims = book.room_for(key)
            if victims is not None:
                for v in victims:
                    book.evict(v)
                    prefetched.discard(v)
                return True
            if not arrival:
                return False
            now = max(now, min(arrival.values()))  # wait for an in-flight load to land

    def prefetch(ahead: Sequence[Key], protect: Iterable[Key]) -> tuple[Key, ...]:
        # ExpertCache.prefetch's rules: a key never evicts one due no later than itself (its own
        # layer's or an earlier one's), the policy may veto victims, and the first key without room
        # stops the rest (returned, to retry once room may have been made); never waits.
        nonlocal issued
        ahead = tuple(ahead)
        keep, end = set(protect), 0
        for i, key in enumerate(ahead):
            while end < len(ahead) and (end <= i or ahead[end][0] == key[0]):
                keep.add(ahead[end])
                end += 1
            if key not in sizes or key in book.cached:
                continue
            settle()
            victims = book.room_for(key, keep=keep, prefetch=True)
            if victims is None:
                return ahead[i:]
            for v in victims:
                book.evict(v)
                prefetched.discard(v)
            book.reserve(key)
            arrival[key] = load(key)
            prefetched.add(key)
            issued += 1
            memory.append((now, book.used))
        return ()

    def plan_ahead(i: int) -> list[Key]:
        step, nxt = trace.steps[i], trace.steps[i + 1] if i + 1 < len(trace.steps) else None
        near, pregate = predictor, None
        if isinstance(predictor, PreGate):
            # the runtime runs the next layer's gate only within a unit
            same = nxt is not None and nxt.unit == step.unit and nxt.layer == step.layer + 1
            near, pregate = (predictor, nxt.pregate) if same and step.layer + 1 < trace.num_layers else (None, None)
        return lookahead(near, far, step.layer, step.experts, pregate, trace.num_layers, depth)

    loaded_before = book.bytes_loaded
    for key in warm:
        if key in sizes and key not in book.cached and make_room(key):
            book.reserve(key)
            book.ready(key)
    book.bytes_loaded = loaded_before
    for i, step in enumerate(trace.steps):
        keys = trace.keys(i)
        prev = trace.steps[i - 1] if i else None
        if predictor is not None and far is not None and (prev is None or prev.unit != step.unit):
            # a unit's first layers, from the calibration order, before it starts (as Session.run)
            prefetch(lookahead(None, far, -1, (), None, trace.num_layers, depth), resident)
        unit_tokens = sum(step.tokens) / dense.top_k[step.layer] if dense else 0.0
        if dense:  # the segment (and gate) before this MoE layer; loads in flight proceed meanwhile
            run_dense(dense.before[step.layer], unit_tokens, step.layer)
        policy.begin_step(i, step.layer, keys)
        ahead: list[Key] = plan_ahead(i) if predictor is not None else []
        nxt = trace.steps[i + 1] if i + 1 < len(trace.steps) else None
        if ahead and nxt is not None and nxt.unit == step.unit and nxt.layer == step.layer + 1:
            named += len({e for layer, e in ahead if layer == nxt.layer} & set(nxt.experts))
            needed += len(nxt.experts)

        # Prefetch when the routing is known (sparing this step's experts), and again after each
        # expert is done (its slot may then take a pending one), as the runtime does.
        pending = prefetch(ahead, keys + resident) if ahead else ()
        ahead_step = prev is not None and prev.unit == step.unit and prev.layer + 1 == step.layer
        for j, (key, tokens) in enumerate(zip(keys, step.tokens, strict=True)):
            settle()
            ahead_accesses += ahead_step
            if key in book.cached:
                book.hits += 1
                ahead_hits += ahead_step
                if key in arrival:  # still loading: wait for it
                    if keep_timeline:
                        timeline.append((now, arrival[key], "stall", *key))
                    stall += arrival[key] - now
                    now = arrival[key]
                    settle()
                if key in prefetched:
                    used += 1
                    prefetched.discard(key)
            else:
                book.misses += 1
                make_room(key)
                book.reserve(key)
                memory.append((now, book.used))
                done = load(key)
                if keep_timeline:
                    timeline.append((now, done, "stall", *key))
                stall += done - now
                now = done
                book.ready(key)
            policy.touch(key)
            dt = tokens * sizes[key] / 2 / flops if flops else 0.0  # 2 FLOP per fp32 weight (4 bytes)
            if keep_timeline:
                timeline.append((now, now + dt, "compute", *key))
            now += dt
            compute += dt
            memory.append((now, book.used))
            if pending and key not in resident:  # the expert just done may make room, as in the runtime
                issued_keys = tuple(ahead[: len(ahead) - len(pending)])
                pending = prefetch(pending, keys[j + 1 :] + resident + issued_keys)
        if dense and (nxt is None or nxt.unit != step.unit):
            run_dense(dense.after, unit_tokens, trace.num_layers)  # the last segment and the head
    for key in arrival:  # prefetches still in flight land (times unchanged: nothing waits for them)
        book.ready(key)
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
        time_s=now,
        compute_s=compute,
        stall_s=stall,
        prefetch_issued=issued,
        prefetch_used=used,
        recall=named / needed if needed else float("nan"),
        hit_rate_ahead=ahead_hits / ahead_accesses if ahead_accesses else float("nan"),
        accesses_ahead=ahead_accesses,
        timeline=timeline,
        memory=memory,
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
