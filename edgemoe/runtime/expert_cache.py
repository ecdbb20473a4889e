"""The runtime's expert cache: a byte budget over routed experts, pins, a background prefetch loader.

Decisions (hit, miss, victim) are made by :class:`~edgemoe.schedule.policies.CacheBook`, the
same bookkeeping the simulator replays traces with. This class adds the data, the locking and
the loader thread:

* an expert is *pinned* while a kernel runs on it, so eviction never frees it mid-layer; a
  thread that needs room while every byte is pinned or in flight waits for a release;
* a load in flight is an entry with an event: a second thread needing the same expert waits on
  it instead of loading it again (coalescing), and so does an access to a prefetched expert;
* prefetches go to one background thread and never wait for room (they are skipped instead);
* a storage tier throttle models one channel of the profile's bandwidth: loads (demand and
  prefetch) queue for it, each holding it for ``n / bandwidth`` seconds for ``n`` bytes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable

import numpy as np

from ..errors import BundleError
from ..schedule.policies import CacheBook, Key, Policy
from ..schedule.switch import SwitchMoves, plan_switch


class ExpertCache:
    """Expert weights by ``(layer, expert)`` within a byte capacity.

    Args:
        capacity: Bytes the cached and in-flight experts may occupy together.
        sizes: Bytes of every expert that may be loaded.
        policy: Eviction policy.
        load: Reads and checks one expert's weights from the bundle.
        storage_gbs: Throttle loads to this bandwidth, GB/s (0: as fast as the disk goes).
    """

    def __init__(
        self,
        capacity: int,
        sizes: dict[Key, int],
        policy: Policy,
        load: Callable[[Key], dict[str, np.ndarray]],
        storage_gbs: float = 0.0,
    ):
        self.book = CacheBook(capacity, sizes, policy)
        self.policy = policy
        self._load_fn = load
        self.storage_gbs = float(storage_gbs)
        self._channel_lock = threading.Lock()
        self._channel_free = 0.0
        self.data: dict[Key, dict[str, np.ndarray]] = {}
        self._events: dict[Key, threading.Event] = {}
        self._cond = threading.Condition()
        self._queue: queue.Queue[Key | None] = queue.Queue()
        self._loader: threading.Thread | None = None
        self._prefetched: set[Key] = set()
        self.ever: set[Key] = set()
        self.prefetch_issued = self.prefetch_used = 0
        self.stall_s = 0.0
        self._step = 0

    # -- loading ----------------------------------------------------------------------------
    def _read(self, key: Key) -> dict[str, np.ndarray]:
        if self.storage_gbs <= 0:
            return self._load_fn(key)
        # One storage channel shared by demand loads and the prefetcher: each load books the
        # next free slot of bytes / bandwidth and returns no earlier than the slot's end.
        with self._channel_lock:
            start = max(time.perf_counter(), self._channel_free)
            self._channel_free = end = start + self.book.sizes[key] / (self.storage_gbs * 1e9)
        weights = self._load_fn(key)
        left = end - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return weights

    def _finish(self, key: Key, weights: dict[str, np.ndarray] | None) -> None:
        with self._cond:
            if weights is None:  # the load failed: drop the reservation
                self.book.cached.pop(key, None)
                self.book.used -= self.book.sizes[key]
                self._prefetched.discard(key)
            else:
                self.data[key] = weights
                self.book.ready(key)
                self.ever.add(key)
            self._events.pop(key).set()
            self._cond.notify_all()

    def _evict(self, victims: Iterable[Key]) -> None:
        for v in victims:
            self.data.pop(v, None)
            self.book.evict(v)
            self._prefetched.discard(v)

    # -- steps ------------------------------------------------------------------------------
    def begin_step(self, layer: int, keys: Iterable[Key]) -> None:
        """A layer's routing is known: tell the policy which experts this step uses."""
        with self._cond:
            self.policy.begin_step(self._step, layer, keys)
            self._step += 1

    def acquire(self, key: Key) -> dict[str, np.ndarray]:
        """Pin ``key`` and return its weights, loading it (or waiting for its load) if needed."""
        start = time.perf_counter()
        loader = False
        with self._cond:
            if key in self.book.cached:
                self.book.hits += 1
                if key in self._prefetched:
                    self.prefetch_used += 1
                    self._prefetched.discard(key)
            else:
                self.book.misses += 1
                while key not in self.book.cached:
                    victims = self.book.room_for(key)
                    if victims is not None:
                        self._evict(victims)
                        self.book.reserve(key)
                        self._events[key] = threading.Event()
                        loader = True
                        break
                    self._cond.wait()  # every byte is pinned or in flight: wait for a release
            self.book.pins[key] = self.book.pins.get(key, 0) + 1
            self.policy.touch(key)
            event = self._events.get(key)
        try:
            if loader:
                weights = None
                try:
                    weights = self._read(key)
                finally:
                    self._finish(key, weights)
            elif event is not None:
                event.wait()
            weights = self.data.get(key)
            if weights is None:
                self._load_fn(key)  # the background load failed: this raises its error (e.g. IntegrityError)
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

    def prefetch(self, keys: Iterable[Key], protect: Iterable[Key] = ()) -> None:
        """Start background loads of ``keys`` not cached yet; never evicts ``protect``, never waits."""
        keys = tuple(keys)
        protect = (*protect, *keys)  # nor what the same prediction brought in
        with self._cond:
            for key in keys:
                if key not in self.book.sizes or key in self.book.cached:
                    continue
                victims = self.book.room_for(key, keep=protect)
                if victims is None:
                    break
                self._evict(victims)
                self.book.reserve(key)
                self._events[key] = threading.Event()
                self._prefetched.add(key)
                self.prefetch_issued += 1
                self._queue.put(key)
            if self.prefetch_issued:
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
        """Retarget the cache to a new task by the schedule's plan (see :func:`~edgemoe.schedule.switch.plan_switch`).

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
                self.data.pop(key, None)
                self._prefetched.discard(key)
            for key in moves.loaded:
                self._events[key] = threading.Event()
            if not wait and moves.loaded:
                for key in moves.loaded:
                    self._queue.put(key)
                self._start_loader()
        if wait:
            pending = list(moves.loaded)
            try:
                while pending:
                    weights = self._read(pending[0])
                    self._finish(pending.pop(0), weights)
            except BaseException:
                for key in pending:  # the failed load and those after it: drop their reservations
                    self._finish(key, None)
                raise
        return moves

    def _run_loader(self) -> None:
        while (key := self._queue.get()) is not None:
            weights = None
            try:
                weights = self._read(key)
            except Exception:
                weights = None
            finally:
                self._finish(key, weights)

    def close(self) -> None:
        """Stop the loader thread (after the loads already queued)."""
        if self._loader is not None:
            self._queue.put(None)
            self._loader.join(timeout=10)
            self._loader = None
