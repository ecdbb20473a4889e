"""The expert cache's bookkeeping and its decision rules, shared by the runtime and the simulator.

:class:`CacheBook` tracks which experts are cached, their bytes, pins and in-flight loads against
a byte capacity and asks a policy for victims; it holds no weights and does no I/O. Every decision
of the runtime's :class:`~edgemoe.runtime.expert_cache.ExpertCache` and of the simulator
(:func:`~edgemoe.schedule.simulate.simulate`) goes through it — hits and misses
(:meth:`CacheBook.access`), victims, reservations, prefetches (:func:`prefetch_rule`) — so both
make the very same decisions for the same access sequence, and record the same event log.
Pure Python: the runtime imports it on devices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .policies import Policy

Key = tuple[int, int]
# Event kinds, in the order they can happen for one key: an access is a ``hit`` or a ``miss``; a
# miss evicts victims (``evict``) and starts a ``load``; a prefetch evicts and starts a ``prefetch``.
EVENTS = ("hit", "miss", "evict", "load", "prefetch")


class CacheBook:
    """Which experts are cached or loading, within a byte capacity; no data, no locking.

    Args:
        capacity: Bytes the cached and in-flight experts may occupy together.
        sizes: Bytes of each expert that may be cached.
        policy: Eviction policy.
        log: Record every decision in :attr:`events` as ``(step, layer, expert, kind)`` (kinds:
            :data:`EVENTS`): the log the runtime, the simulator and the native runtime agree on.

    Raises:
        ConfigError: The capacity cannot hold the largest expert.
    """

    def __init__(self, capacity: int, sizes: dict[Key, int], policy: Policy, log: bool = False):
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
        # Loads a step issued for its own misses before running them (:func:`fetch_rule`): their
        # access was counted then; until it comes they are kept from eviction.
        self.claimed: set[Key] = set()
        self.step = -1
        self.events: list[tuple[int, int, int, str]] | None = [] if log else None

    def _log(self, key: Key, kind: str) -> None:
        if self.events is not None:
            self.events.append((self.step, key[0], key[1], kind))

    def begin_step(self, layer: int, keys: Iterable[Key]) -> None:
        """A layer's routing is known: the next step accesses ``keys`` (the policy is told)."""
        self.step += 1
        self.policy.begin_step(self.step, layer, keys)

    def access(self, key: Key) -> bool:
        """Count an access: a hit if ``key`` is cached or loading, else a miss (the caller loads it).

        A key its step fetched early (:func:`fetch_rule`) was counted as a miss then: its access
        counts nothing more and answers True (its load is in flight or done).
        """
        if key in self.claimed:
            self.claimed.discard(key)
            return True
        hit = key in self.cached
        if hit:
            self.hits += 1
        else:
            self.misses += 1
        self._log(key, "hit" if hit else "miss")
        return hit

    def evictable(self, keep: Iterable[Key] = ()) -> list[Key]:
        """Ready, unpinned entries not in ``keep`` nor fetched for the current step and not yet run."""
        keep = keep if isinstance(keep, set | frozenset) else set(keep)
        return [
            k
            for k, ready in self.cached.items()
            if ready and not self.pins.get(k) and k not in keep and k not in self.claimed
        ]

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
        self.claimed.discard(key)
        self.evictions += 1
        self.policy.evicted(key)
        self._log(key, "evict")

    def reserve(self, key: Key, prefetch: bool = False) -> None:
        """Account for ``key`` as in flight (room must have been made): a demand load or a prefetch."""
        self.cached[key] = False
        self.used += self.sizes[key]
        self.peak = max(self.peak, self.used)
        if self.used > self.capacity:  # a bookkeeping bug, never a user error
            raise AssertionError(f"expert cache over budget: {self.used} > {self.capacity}")
        self.bytes_loaded += self.sizes[key]
        self.policy.inserted(key)
        self._log(key, "prefetch" if prefetch else "load")

    def drop(self, key: Key) -> None:
        """Forget a reservation whose load failed."""
        if self.cached.pop(key, None) is not None:
            self.used -= self.sizes[key]
        self.claimed.discard(key)

    def ready(self, key: Key) -> None:
        """``key``'s load finished."""
        self.cached[key] = True


def prefetch_rule(
    book: CacheBook,
    keys: Sequence[Key],
    protect: Iterable[Key],
    issue: Callable[[Key, list[Key]], None],
    settle: Callable[[], None] = lambda: None,
) -> tuple[Key, ...]:
    """Decide the prefetches of ``keys`` (the experts of the coming steps, in the order they are needed).

    Keys already cached or unknown are skipped. A load never evicts ``protect`` nor a key due no
    later than itself (its own layer's or an earlier one's); those of later layers may make room
    as the policy allows (with the planned policy, only experts expected back later than the one
    loaded). Once a key finds no room, neither it nor those after it are issued (they would
    overtake it). Never waits.

    Args:
        book: The cache's bookkeeping.
        keys: Experts to prefetch, grouped by layer, in the order they will be needed.
        protect: Experts not to evict (the step's own, the plan's resident set, ...).
        issue: Called with each key to load and its victims; it must evict them
            (:meth:`CacheBook.evict`) and reserve the key (``reserve(key, prefetch=True)``).
        settle: Called before each decision (the simulator lands loads due by now).

    Returns:
        The keys not issued for want of room (to retry once room may have been made).
    """
    keys = tuple(keys)
    keep = set(protect)  # grows by the prediction up to the end of the current key's layer
    end = 0
    for i, key in enumerate(keys):
        while end < len(keys) and (end <= i or keys[end][0] == key[0]):
            keep.add(keys[end])
            end += 1
        if key not in book.sizes or key in book.cached:
            continue
        settle()
        victims = book.room_for(key, keep=keep, prefetch=True)
        if victims is None:
            return keys[i:]
        issue(key, victims)
    return ()


def fetch_rule(
    book: CacheBook,
    keys: Sequence[Key],
    issue: Callable[[Key, list[Key]], None],
    settle: Callable[[], None] = lambda: None,
) -> tuple[Key, ...]:
    """Start a step's own missing experts loading before it runs any, and order its experts to run.

    A step knows its experts once routed: loading its misses right away, and running the experts
    already cached meanwhile, hides those loads behind that compute (an on-demand step loads each
    miss only when its turn comes, and computes nothing while it loads). Each miss is counted
    (and logged) now, evicts as a demand miss would (never one of the step's own experts) and is
    then kept from eviction until the step runs it. A miss that finds no room (everything pinned
    or in flight) is left to load on demand at its turn, as are those after it.

    Args:
        book: The cache's bookkeeping.
        keys: The step's experts (ascending).
        issue: Called with each key to load and its victims; it must evict them
            (:meth:`CacheBook.evict`) and reserve the key (``reserve(key)``).
        settle: Called before each decision (the simulator lands loads due by now).

    Returns:
        The order to run ``keys`` in: the cached ones, those already loading (prefetched), those
        just issued (in issue order), then any left to load on demand.
    """
    settle()
    ready = [k for k in keys if book.cached.get(k) is True]
    loading = [k for k in keys if book.cached.get(k) is False]
    missing = [k for k in keys if k not in book.cached]
    issued: list[Key] = []
    for i, key in enumerate(missing):
        settle()
        victims = book.room_for(key, keep=keys)
        if victims is None:
            return (*ready, *loading, *issued, *missing[i:])
        book.misses += 1
        book._log(key, "miss")
        book.claimed.add(key)
        issue(key, victims)
        issued.append(key)
    return (*ready, *loading, *issued)
