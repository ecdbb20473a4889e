"""The runtime's expert cache: a byte budget over routed experts, pins, a background prefetch loader.

Decisions (hit, miss, victim, prefetch, a step's early fetch) are made by
:class:`~edgemoe.swap.book.CacheBook`, :func:`~edgemoe.swap.book.prefetch_rule` and
:func:`~edgemoe.swap.book.fetch_rule`, the same rules the simulator replays traces with. This
class adds the data, the locking and the loader thread:

* an expert is *pinned* while a kernel runs on it, so eviction never frees it mid-layer; a
  thread that needs room while every byte is pinned or in flight waits for a release;
* a load in flight is an entry with an event: a second thread needing the same expert waits on
  it instead of loading it again (coalescing), and so does an access to a prefetched expert;
* prefetches and a step's early fetches go to one background thread; an access to one still
  queued loads it on its own thread instead of waiting for the loader to reach it (the loader
  skips it then); prefetches never wait for room (they are skipped instead);
  they never evict what the policy expects back sooner than the expert they bring in, so
  prefetching does not trade a later hit for an earlier miss;
* a load reads into the buffer of the expert it evicts: memory stays within the budget and
  swapping allocates nothing;
* a storage tier throttle models one channel of the profile's bandwidth: loads (demand and
  prefetch) queue for it, each holding it for ``n / bandwidth`` seconds for ``n`` bytes. Queued
  prefetches run back to back; a demand load goes ahead of those not started yet. A load returns
  when its slot ends, to within a microsecond or two (:func:`wait_until`): a plain sleep
  overshoots by ~0.1 ms, as much as a whole 100 KiB load at 2 GB/s.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from ..errors import BundleError
from ..swap.book import CacheBook, Key, fetch_rule, prefetch_rule
from ..swap.policies import Policy
from ..swap.switch import SwitchMoves, plan_switch

# Below this much time left, wait_until spins instead of sleeping (a sleep's wake-up is late by up to ~0.1 ms).
_SPIN_S = 250e-6
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def wait_until(deadline: float) -> None:
    """Return at ``deadline`` (a ``time.perf_counter()`` value): sleep most of the way, spin the rest.

    The spin yields the CPU and the GIL on every turn (``sched_yield``: returns within a
    microsecond, where ``sleep(0)`` takes ~50), so a loader thread waiting here does not hold up
    the thread running the model.
    """
    left = deadline - time.perf_counter()
    if left > _SPIN_S:
        time.sleep(left - _SPIN_S)
    while time.perf_counter() < deadline:
        _yield()


class ExpertCache:
    """Expert weights by ``(layer, expert)`` within a byte capacity.

    Args:
        capacity: Bytes the cached and in-flight experts may occupy together.
        sizes: Bytes of every expert that may be loaded.
        policy: Eviction policy.
        load: Reads and checks one expert's blob from the bundle into the given buffer (of the
            expert's size) and returns its tensors, views on that buffer.
        storage_gbs: Throttle loads to this bandwidth, GB/s (0: as fast as the disk goes).
        drop: Called with an evicted expert's tensors (as ``load`` returned them), e.g. to free the
            device memory an executor placed them in.
        log: Record the decisions in ``book.events`` (see :class:`~edgemoe.swap.book.CacheBook`).
    """

    def __init__(
        self,
        capacity: int,
        sizes: dict[Key, int],
        policy: Policy,
        load: Callable[[Key, bytearray], dict[str, np.ndarray]],
        storage_gbs: float = 0.0,
        drop: Callable[[dict[str, object]], None] | None = None,
        log: bool = False,
    ):
        self.book = CacheBook(capacity, sizes, policy, log=log)
        self._drop = drop
        self.policy = policy
        self._load_fn = load
        self.storage_gbs = float(storage_gbs)
        self._channel_lock = threading.Lock()
        self._channel_free = 0.0
        self.data: dict[Key, dict[str, np.ndarray]] = {}
        self._buffers: dict[Key, bytearray] = {}  # the memory each cached or loading expert occupies
        self._events: dict[Key, threading.Event] = {}
        self._cond = threading.Condition()
        self._queue: queue.Queue[tuple[Key, bytearray, float, int] | None] = queue.Queue()
        self._loader: threading.Thread | None = None
        self._prefetched: set[Key] = set()
        # Queued loads not started yet, with when they were queued; an access to one loads it on
        # its own thread (the loader then skips it) instead of waiting for the loader to wake up.
        self._queued: dict[Key, tuple[int, float]] = {}  # key -> (its queue entry's number, queued at)
        self._numbers = itertools.count()
        self.ever: set[Key] = set()
        self.prefetch_issued = self.prefetch_used = 0
        self.stall_s = 0.0

    # -- loading ----------------------------------------------------------------------------
    def _read(self, key: Key, into: bytearray, since: float | None = None) -> dict[str, np.ndarray]:
        """Load ``key``, throttled: no earlier than ``n / bandwidth`` after the channel took the request.

        Args:
            key: Expert to load.
            into: Its buffer.
            since: When the load was requested (None: now). A queued prefetch starts when it was
                queued or when the channel frees, whichever is later, as on a device whose DMA
                queue runs back to back; the loader thread's own wake-up delays do not count.
        """
        if self.storage_gbs <= 0:
            return self._load_fn(key, into)
        # One storage channel shared by demand loads and the prefetcher: each load books the
        # next free slot of bytes / bandwidth and returns no earlier than the slot's end. A
        # prefetch books its slot only when the loader takes it up, so a demand load waits at
        # most for the one slot in progress, never for the queue.
        now = time.perf_counter()
        with self._channel_lock:
            start = max(now if since is None else min(since, now), self._channel_free)
            self._channel_free = end = start + self.book.sizes[key] / (self.storage_gbs * 1e9)
        weights = self._load_fn(key, into)
        wait_until(end)
        return weights

    def _finish(self, key: Key, weights: dict[str, np.ndarray] | None) -> None:
        with self._cond:
            if weights is None:  # the load failed: drop the reservation
                self.book.drop(key)
                self._prefetched.discard(key)
                self._buffers.pop(key, None)
            else:
                self.data[key] = weights
                self.book.ready(key)
                self.ever.add(key)
            self._events.pop(key).set()
            self._cond.notify_all()

    def _evict(self, victims: Iterable[Key]) -> list[bytearray]:
        """Drop ``victims`` (unpinned, so no kernel holds their weights); returns their freed buffers."""
        freed = []
        for v in victims:
            self._forget(v)
            self.book.evict(v)
            self._prefetched.discard(v)
            freed.append(self._buffers.pop(v))
        return freed

    def _forget(self, key: Key) -> None:
        """Drop an evicted expert's tensors (and whatever its executor placed them in)."""
        weights = self.data.pop(key, None)
        if weights is not None and self._drop is not None:
            self._drop(weights)

    def _reserve(self, key: Key, freed: list[bytearray], prefetch: bool = False) -> bytearray:
        """Account for ``key`` as loading and give it a buffer: a freed one of its size, else a new one.

        A load reuses the memory of the expert it replaces (the budget bounds the buffers too),
        which also spares the allocator and the page faults of a fresh buffer per load.
        """
        self.book.reserve(key, prefetch)
        self._events[key] = threading.Event()
        size = self.book.sizes[key]
        buf = next((b for b in freed if len(b) == size), None)
        self._buffers[key] = buf = bytearray(size) if buf is None else buf
        return buf

    # -- steps ------------------------------------------------------------------------------
    def begin_step(self, layer: int, keys: Iterable[Key]) -> None:
        """A layer's routing is known: tell the policy which experts this step uses."""
        with self._cond:
            self.book.begin_step(layer, keys)

    def acquire(self, key: Key) -> dict[str, np.ndarray]:
        """Pin ``key`` and return its weights, loading it (or waiting for its load) if needed."""
        start = time.perf_counter()
        loader = False
        with self._cond:
            if self.book.access(key):
                if key in self._prefetched:
                    self.prefetch_used += 1
                    self._prefetched.discard(key)
            else:
                while key not in self.book.cached:
                    victims = self.book.room_for(key)
                    if victims is not None:
                        into = self._reserve(key, self._evict(victims))
                        loader = True
                        break
                    self._cond.wait()  # every byte is pinned or in flight: wait for a release
            self.book.pins[key] = self.book.pins.get(key, 0) + 1
            self.policy.touch(key)
            event = self._events.get(key)
            queued = self._queued.pop(key, None)  # still waiting for the loader: this thread loads it
        try:
            if loader:
                weights = None
                try:
                    weights = self._read(key, into)
                finally:
                    self._finish(key, weights)
            elif event is not None:
                if queued is None:  # the loader has it
                    event.wait()
                else:  # still queued: load it here rather than wait for the loader thread's turn
                    weights = None
                    try:
                        weights = self._read(key, self._buffers[key], queued[1])
                    finally:
                        self._finish(key, weights)
            weights = self.data.get(key)
            if weights is None:
                self._load_fn(key, bytearray(self.book.sizes[key]))  # the background load failed: raise its error
                raise BundleError(f"expert {key[1]} of layer {key[0]} failed to load")
        except BaseException:
            self.release(key)
            raise
        finally:
            stall = time.perf_counter() - start
            with self._cond:
                self.stall_s += stall
        return weights

    def release(self, key: Key) -> None:
        """Unpin ``key``."""
        with self._cond:
            n = self.book.pins.get(key, 0) - 1
            if n > 0:
                self.book.pins[key] = n
            else:
                self.book.pins.pop(key, None)
            self._cond.notify_all()

    def prefetch(self, keys: Sequence[Key], protect: Iterable[Key] = ()) -> tuple[Key, ...]:
        """Start background loads of ``keys`` not cached yet, in order; never evicts ``protect``, never waits.

        The decisions are :func:`~edgemoe.swap.book.prefetch_rule`'s (the simulator's too).

        Returns:
            The keys not issued for want of room (retry them once room may have been made).
        """

        def issue(key: Key, victims: list[Key]) -> None:
            into = self._reserve(key, self._evict(victims), prefetch=True)
            self._prefetched.add(key)
            self.prefetch_issued += 1
            self._enqueue(key, into)

        with self._cond:
            return prefetch_rule(self.book, keys, protect, issue)

    def fetch(self, keys: Sequence[Key]) -> tuple[Key, ...]:
        """Queue a step's own misses on the background loader now (:func:`~edgemoe.swap.book.fetch_rule`).

        Returns:
            The order to run the step's experts in: cached ones first, while the misses load.
        """

        def issue(key: Key, victims: list[Key]) -> None:
            self._enqueue(key, self._reserve(key, self._evict(victims)))

        with self._cond:
            return fetch_rule(self.book, keys, issue)

    def _enqueue(self, key: Key, into: bytearray) -> None:
        """Queue a load on the background loader (caller holds ``_cond``)."""
        number, now = next(self._numbers), time.perf_counter()
        self._queued[key] = (number, now)
        self._queue.put((key, into, now, number))
        self._start_loader()

    def _start_loader(self) -> None:
        """Start the background loader if it is not running (caller holds ``_cond``)."""
        if self._loader is None:
            self._loader = threading.Thread(target=self._run_loader, name="edgemoe-prefetch", daemon=True)
            self._loader.start()

    def switch(
        self,
        sizes: dict[Key, int],
        resident: Iterable[Key] = (),
        entry: dict | None = None,
        prob: list[list[float]] | None = None,
        capacity: int | None = None,
        wait: bool = True,
    ) -> SwitchMoves:
        """Retarget the cache to a new task by the schedule's plan (see :func:`~edgemoe.swap.switch.plan_switch`).

        Loads in flight land first, so the moves depend on the cache's contents, not on timing
        (as in the simulator). Pinned experts are never freed.

        Args:
            sizes: Bytes of each expert the new task keeps.
            resident: The new task's resident set.
            entry: The schedule's ``"A->B"`` plan, or None.
            prob: The new task's use probabilities (for the planned policy).
            capacity: New byte capacity (None: unchanged); never below the current one.
            wait: Load the resident set before returning; else queue it on the background loader
                (an access to one of its experts waits for that load, as for a prefetch).

        Returns:
            The experts freed, loaded and left in place.
        """
        with self._cond:
            while self._events:
                self._cond.wait()
            if capacity is not None:
                self.book.capacity = max(self.book.capacity, int(capacity))
            moves = plan_switch(self.book, sizes, tuple(resident), entry, prob)
            for key in moves.evicted:
                self._forget(key)
                self._prefetched.discard(key)
                self._buffers.pop(key, None)
            for key in moves.loaded:
                self._events[key] = threading.Event()
                self._buffers[key] = bytearray(self.book.sizes[key])
            if not wait and moves.loaded:
                for key in moves.loaded:
                    self._enqueue(key, self._buffers[key])
        if wait:
            pending = list(moves.loaded)
            try:
                while pending:
                    weights = self._read(pending[0], self._buffers[pending[0]])
                    self._finish(pending.pop(0), weights)
            except BaseException:
                for key in pending:  # the failed load and those after it: drop their reservations
                    self._finish(key, None)
                raise
        return moves

    def _run_loader(self) -> None:
        while (item := self._queue.get()) is not None:
            key, into, since, number = item
            with self._cond:
                if self._queued.get(key, (None,))[0] != number:
                    continue  # an access loaded it on its own thread (the key may be queued anew since)
                del self._queued[key]
            weights = None
            try:
                weights = self._read(key, into, since)
            except Exception:
                weights = None
            finally:
                self._finish(key, weights)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no load is queued or in flight; returns False if ``timeout`` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._events, timeout)

    def close(self) -> None:
        """Stop the loader thread (after the loads already queued)."""
        if self._loader is not None:
            self._queue.put(None)
            self._loader.join(timeout=10)
            self._loader = None
