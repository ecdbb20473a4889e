"""Prefetching: lookahead over layers and runs, Belady-consistent victims, the throttled channel, runtime effect."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from edgemoe.bundle.format import read_manifest, sample_input
from edgemoe.errors import ConfigError
from edgemoe.runtime import Session
from edgemoe.runtime.expert_cache import ExpertCache, wait_until
from edgemoe.schedule import plan_bundle
from edgemoe.swap import CacheBook, make_policy
from edgemoe.swap.predict import Affinity, Static, lookahead


@pytest.fixture
def planned(bundle_factory, tmp_path):
    """A private copy of the m3vit-micro bundle with a 50% plan stored (per-run probabilities)."""
    dst = tmp_path / "m3vit-micro"
    shutil.copytree(bundle_factory("m3vit-micro"), dst)
    plan_bundle(dst, "jetson-orin-nano-8gb", "50%", "planned", heldout=2)
    return dst


def test_lookahead_names_the_next_layers_in_order_and_wraps_to_the_next_run():
    far = Static([[3, 1, 2], [0, 2], [1, 0, 3]], [2, 1, 2])
    # near: affinity table that maps any expert of layer 0 to expert 2 of layer 1
    near = Affinity([np.array([[0, 0, 1.0]] * 4), np.zeros((3, 4))], [1, 1, 1])
    assert lookahead(near, far, 0, [1], None, 3, 2) == [(1, 2), (2, 1), (2, 0)]
    assert lookahead(None, far, 0, [1], None, 3, 2) == [(1, 0), (2, 1), (2, 0)]
    # the last layer: the next run's first layers, from the calibration order
    assert lookahead(near, far, 2, [0], None, 3, 2) == [(0, 3), (0, 1), (1, 0)]
    assert lookahead(None, far, -1, [], None, 3, 1) == [(0, 3), (0, 1)]
    assert len(lookahead(None, far, 0, [], None, 3, 10)) == 5  # at most one cycle of layers ahead
    assert lookahead(near, None, 0, [1], None, 3, 2) == [(1, 2)]  # no calibration order: one step only
    assert lookahead(near, None, 2, [1], None, 3, 2) == []


def test_prefetch_never_evicts_an_expert_needed_sooner_than_the_one_it_brings():
    sizes = {(layer, e): 10 for layer in range(3) for e in range(2)}
    policy = make_policy("planned", [[1.0, 1.0]] * 3)
    book = CacheBook(20, sizes, policy)
    for key in ((1, 0), (2, 0)):
        book.reserve(key)
        book.ready(key)
    policy.begin_step(0, 0, [(0, 0)])
    # at layer 0: (1, 0) is due in 1 step, (2, 0) in 2; bringing in (1, 1) may evict only (2, 0)
    assert book.room_for((1, 1), prefetch=True) == [(2, 0)]
    assert book.room_for((1, 1), keep=[(2, 0)], prefetch=True) is None
    # (2, 1) is due as late as (2, 0): no victim is due later, so no prefetch; a demand miss still evicts
    assert book.room_for((2, 1), prefetch=True) is None
    assert book.room_for((2, 1)) == [(2, 0)]
    # recency cannot tell when an expert is due: LRU lets a prefetch evict any unprotected entry
    lru = CacheBook(20, sizes, make_policy("lru"))
    for key in ((1, 0), (2, 0)):
        lru.reserve(key)
        lru.ready(key)
    assert lru.room_for((2, 1), prefetch=True) == [(1, 0)]


def _slow_cache(n_keys: int, nbytes: int, gbs: float) -> tuple[ExpertCache, list]:
    loads = []

    def load(key, into):
        loads.append(key)
        into[:] = bytes([key[1]]) * len(into)
        return {"w": np.frombuffer(into, dtype=np.uint8)}

    sizes = {(0, e): nbytes for e in range(n_keys)}
    return ExpertCache(nbytes * n_keys, sizes, make_policy("lru"), load, storage_gbs=gbs), loads


def test_throttled_prefetches_queue_on_one_channel_and_demand_loads_go_first():
    nbytes, gbs = 1000, 2e-5  # 50 ms per load
    slot = nbytes / (gbs * 1e9)
    cache, _ = _slow_cache(4, nbytes, gbs)
    start = time.perf_counter()
    assert cache.prefetch([(0, 0), (0, 1), (0, 2)]) == ()
    w = cache.acquire((0, 3))  # a demand miss behind three queued prefetches
    demand_done = time.perf_counter() - start
    assert w["w"][0] == 3
    # it took the channel ahead of the queued prefetches (at most after the one in progress)
    assert demand_done >= slot * 0.99
    with cache._cond:
        assert cache.book.cached[(0, 2)] is False  # the last queued prefetch is still loading
    cache.release((0, 3))
    for e in range(3):
        w = cache.acquire((0, e))
        assert w["w"][0] == e
        cache.release((0, e))
    # four loads over one channel: never faster than their bytes over the bandwidth
    assert time.perf_counter() - start >= 4 * slot * 0.99
    st = cache.book
    assert st.hits == 3 and st.misses == 1 and cache.prefetch_used == 3
    cache.close()


def test_wait_until_never_returns_early():
    # the throttle's promise: a load is never usable before its slot ends, short slots and long
    for left in (0.0, 20e-6, 100e-6, 400e-6, 3e-3):
        deadline = time.perf_counter() + left
        wait_until(deadline)
        assert time.perf_counter() >= deadline
    wait_until(time.perf_counter() - 1.0)  # a deadline already past returns at once


def test_loads_reuse_the_memory_of_the_expert_they_replace():
    cache, loads = _slow_cache(4, 1000, 0.0)
    cache.book.capacity = 2000  # two experts at a time
    seen = []
    for e in (0, 1, 2, 3, 0):
        w = cache.acquire((0, e))
        assert w["w"][0] == e and len(w["w"]) == 1000
        seen.append(w["w"].ctypes.data)
        cache.release((0, e))
    assert loads == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 0)]
    assert len(set(seen)) == 2  # every load after the first two landed in an evicted expert's buffer
    assert sum(len(b) for b in cache._buffers.values()) <= cache.book.capacity


def test_static_prefetch_looks_past_the_run_and_keeps_outputs_and_budget(planned):
    spec = read_manifest(planned)["input"]
    xs = [sample_input(spec, batch=1, seed=s) for s in range(4)]
    want = [Session(planned, "semseg").run(x) for x in xs]
    budget = read_manifest(planned)["schedule"]["budget_bytes"]
    misses = {}
    for prefetch in (None, "static", "pregate"):
        s = Session(planned, "semseg", memory_budget=budget, policy="planned", prefetch=prefetch)
        s.run(xs[0])
        s.close()  # the first run's prefetches land (also those for the next run's first layers)
        before = s.stats.cache_misses
        for x, y in zip(xs, want, strict=True):
            np.testing.assert_array_equal(s.run(x), y)
        st = s.stats
        misses[prefetch] = st.cache_misses - before
        assert st.peak_expert_bytes <= budget
        if prefetch:
            assert st.prefetch_issued > 0 and st.prefetch_used > 0
        s.close()
    assert misses["static"] < misses[None] and misses["pregate"] < misses[None]


def test_prefetch_depth_must_be_positive(bundle_factory):
    with pytest.raises(ConfigError, match="prefetch_depth"):
        Session(bundle_factory("m3vit-micro"), "semseg", prefetch="static", prefetch_depth=0)


def test_concurrent_runs_with_lookahead_prefetch(planned):
    spec = read_manifest(planned)["input"]
    xs = [sample_input(spec, batch=1, seed=s) for s in range(6)]
    want = [Session(planned, "depth").run(x) for x in xs]
    budget = read_manifest(planned)["schedule"]["budget_bytes"]
    s = Session(planned, "depth", memory_budget=budget, policy="planned", prefetch="static", storage_gbs=0.05)
    got: dict[int, np.ndarray] = {}

    def work(i):
        got[i] = s.run(xs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    for i, y in enumerate(want):
        np.testing.assert_array_equal(got[i], y)
    assert s.stats.peak_expert_bytes <= budget
    s.close()
