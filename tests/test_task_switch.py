"""Task switches on a live session (the schedule's plan), budget checks at compile, budget parsing."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from helpers import write_manifest

from edgemoe.bundle.format import read_manifest, sample_input
from edgemoe.devices import get_device
from edgemoe.errors import ConfigError, TaskError
from edgemoe.runtime import Session
from edgemoe.schedule import plan_bundle, record_trace, simulate, simulate_switch
from edgemoe.swap import POLICIES, CacheBook, ThrashWarning, expert_sizes, make_policy, parse_budget, switch_entry

MODEL = "m3vit-micro-windows"  # per-task expert windows: semseg keeps experts 0-3, depth 4-7
DEVICE = "jetson-orin-nano-8gb"
SCHEMA = Path(__file__).resolve().parents[1] / "edgemoe" / "bundle" / "manifest.schema.json"


@pytest.fixture(scope="module")
def planned_once(bundle_factory, tmp_path_factory):
    """The windows bundle with a schedule for 25% of its expert bytes (planned once per module)."""
    dst = tmp_path_factory.mktemp("switch") / "planned"
    shutil.copytree(bundle_factory(MODEL), dst)
    plan_bundle(dst, DEVICE, "25%", heldout=2)
    return dst


@pytest.fixture
def planned(planned_once, tmp_path):
    """A private copy of the planned bundle that a test may change."""
    return shutil.copytree(planned_once, tmp_path / "planned")


def _x(bundle, n, seed=3):
    return sample_input(read_manifest(bundle)["input"], batch=n, seed=seed)


def _reference(bundle, x):
    return {task: Session(bundle, task, memory_budget=None).run(x) for task in read_manifest(bundle)["tasks"]}


@pytest.mark.parametrize(("policy", "prefetch", "wait"), [("lru", None, True), ("planned", "plan", False)])
def test_switch_follows_the_plan_and_matches_a_fresh_session(planned, policy, prefetch, wait):
    m = read_manifest(planned)
    sched = m["schedule"]
    x = _x(planned, 2)
    want = _reference(planned, x)
    s = Session(planned, "semseg", memory_budget=sched["budget_bytes"], policy=policy, prefetch=prefetch)
    np.testing.assert_array_equal(s.run(x), want["semseg"])
    s._cache.close()  # let prefetches in flight land (the switch waits for them too)
    cached_before = set(s._cache.data)
    sw = s.switch_task("depth", wait=wait)
    entry = sched["task_switch"]["semseg->depth"]
    resident = {tuple(k) for k in sched["tasks"]["depth"]["resident"]}
    # Everything semseg cached is freed (depth never routes to it); depth's resident set is loaded.
    assert set(sw.unloaded) == cached_before and cached_before <= {tuple(k) for k in entry["drop_cached"]}
    assert set(sw.loaded) == resident == {tuple(k) for k in entry["load"]}
    size = expert_sizes(m)[(0, 0)]
    assert sw.bytes_unloaded == size * len(cached_before) and sw.bytes_loaded == size * len(resident)
    assert sw.source == "semseg" and sw.target == "depth" and sw.time_ms >= sw.experts_ms > 0
    s._cache.close()  # drains the background loads when the switch did not wait
    assert set(s._cache.data) == resident
    for _ in range(2):
        np.testing.assert_array_equal(s.run(x), want["depth"])
    fresh = Session(planned, "depth").stats
    st = s.stats
    assert (st.graph_bytes, st.experts_task, st.expert_bytes_task) == (
        fresh.graph_bytes,
        fresh.experts_task,
        fresh.expert_bytes_task,
    )
    assert st.peak_expert_bytes <= sched["cache_bytes"] and all(layer_e[1] >= 4 for layer_e in s._cache.data)
    back = s.switch_task("semseg")
    np.testing.assert_array_equal(s.run(x), want["semseg"])
    st = s.stats
    assert st.task_switches == 2 and st.switch_bytes_loaded == sw.bytes_loaded + back.bytes_loaded
    assert s.switch_task("semseg").bytes_loaded == 0 and s.stats.task_switches == 2  # same task: nothing moves
    s.close()


@pytest.mark.parametrize("policy", POLICIES)
def test_runtime_and_simulator_agree_across_a_switch(planned, policy):
    m = read_manifest(planned)
    sched = m["schedule"]
    plan_a, plan_b = sched["tasks"]["semseg"], sched["tasks"]["depth"]
    xa, xb = _x(planned, 3, seed=5), _x(planned, 3, seed=6)
    trace_a = record_trace(planned, "semseg", xa, "run")
    trace_b = record_trace(planned, "depth", xb, "run")
    cap = sched["cache_bytes"]
    session = Session(planned, "semseg", memory_budget=sched["budget_bytes"], policy=policy, prefetch=None)
    for i in range(len(xa)):
        session.run(xa[i : i + 1])
    sw = session.switch_task("depth")
    for i in range(len(xb)):
        session.run(xb[i : i + 1])

    sizes_a, sizes_b = expert_sizes(m, "semseg"), expert_sizes(m, "depth")
    book = CacheBook(cap, sizes_a, make_policy(policy, plan_a["probability"]))
    simulate(trace_a, sizes_a, cap, book.policy, book=book)
    profile = get_device(DEVICE)
    entry = switch_entry(sched, "semseg", "depth")
    resident_b = [tuple(k) for k in plan_b["resident"]]
    sim = simulate_switch(book, sizes_b, resident_b, entry, plan_b["probability"], profile, "semseg", "depth")
    assert (sw.unloaded, sw.loaded) == (sim.moves.evicted, sim.moves.loaded)
    assert (sw.bytes_unloaded, sw.bytes_loaded) == (sim.moves.bytes_unloaded, sim.moves.bytes_loaded)
    assert sw.bytes_loaded > 0 and sim.time_s == pytest.approx(sw.bytes_loaded / (profile.load_gbs() * 1e9))
    # ... and on every access after it: the switch left both caches in the same state.
    simulate(trace_b, book.sizes, cap, book.policy, book=book)
    st = session.stats
    assert (st.cache_hits, st.cache_misses, st.evictions) == (book.hits, book.misses, book.evictions)
    assert st.expert_bytes_loaded == book.bytes_loaded and set(session._cache.data) == set(book.cached)
    # The plan stores the simulator's predicted cost: depth's resident set never overlaps semseg's experts.
    cost = entry["cost"]
    assert cost["load_bytes"] == plan_b["resident_bytes"] == sim.moves.bytes_loaded
    assert cost["load_s"] == pytest.approx(cost["load_bytes"] / (profile.load_gbs() * 1e9))


def test_switch_time_follows_the_storage_bandwidth(planned):
    sched = read_manifest(planned)["schedule"]
    gbs = 0.002  # 2 MB/s: each 12.6 KB expert takes >= 6 ms
    s = Session(planned, "semseg", memory_budget=sched["budget_bytes"], storage_gbs=gbs)
    s.run(_x(planned, 1))
    sw = s.switch_task("depth")
    slow = dataclasses.replace(get_device("host"), storage_gbs=gbs, host_to_device_gbs=0.0, onchip_gbs=0.0)
    m = read_manifest(planned)
    book = CacheBook(sched["cache_bytes"], expert_sizes(m, "depth"), make_policy("lru"))
    predicted = simulate_switch(book, expert_sizes(m, "depth"), sched["tasks"]["depth"]["resident"], profile=slow)
    assert predicted.moves.bytes_loaded == sw.bytes_loaded > 0
    assert sw.experts_ms / 1e3 >= predicted.time_s * 0.99 and predicted.time_s == sw.bytes_loaded / (gbs * 1e9)


def test_switch_never_frees_a_pinned_expert(planned):
    sched = read_manifest(planned)["schedule"]
    x = _x(planned, 1)
    want = _reference(planned, x)
    s = Session(planned, "semseg", memory_budget=sched["budget_bytes"], policy="planned")
    s.run(x)
    held = sorted(s._cache.data)[0]
    s._cache.acquire(held)  # as a kernel does while it runs on the expert
    sw = s.switch_task("depth")
    assert held not in sw.unloaded and sw.experts_skipped == 1 and held in s._cache.data
    s._cache.release(held)
    np.testing.assert_array_equal(s.run(x), want["depth"])
    assert held not in s._cache.data  # the planned policy frees it first: depth never uses it


def test_concurrent_runs_and_switches(planned):
    sched = read_manifest(planned)["schedule"]
    xs = [_x(planned, 1, seed=k) for k in range(4)]
    refs = [_reference(planned, x) for x in xs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Session(planned, "semseg", memory_budget=sched["budget_bytes"], prefetch="pregate")
    tasks = iter(["depth", "semseg"] * 4)
    lock = threading.Lock()

    def work(i):
        if i % 3 == 2:
            with lock:  # switches from two threads would race on which task comes next, not on safety
                return s.switch_task(next(tasks))
        return i % 4, s.run(xs[i % 4])

    with ThreadPoolExecutor(4) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(work, i) for i in range(18)]]
    for r in results:
        if isinstance(r, tuple):  # a run matches one task's reference, never a mix of both
            k, y = r
            assert any(np.array_equal(y, ref) for ref in refs[k].values())
    np.testing.assert_array_equal(s.run(xs[0]), refs[0][s.task])
    assert s.stats.task_switches == 6 and s.stats.peak_expert_bytes <= sched["cache_bytes"]
    s.close()


def test_switch_errors_leave_the_session_on_its_task(planned):
    m = read_manifest(planned)
    budget = m["schedule"]["budget_bytes"]
    m["schedule"]["tasks"]["depth"]["resident_bytes"] = budget  # as if planned for a larger budget
    write_manifest(planned, m)
    x = _x(planned, 1)
    want = _reference(planned, x)
    s = Session(planned, "semseg", memory_budget=budget)
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        s.switch_task("nope")
    with pytest.raises(ConfigError, match=rf"resident set \({budget} B\)"):
        s.switch_task("depth")
    assert s.task == "semseg"
    np.testing.assert_array_equal(s.run(x), want["semseg"])
    with pytest.raises(ConfigError, match="resident set"):  # the same check at session start
        Session(planned, "depth", memory_budget=budget)


def test_switch_without_a_schedule(bundle_factory):
    bundle = bundle_factory(MODEL)
    x = _x(bundle, 2)
    want = _reference(bundle, x)
    s = Session(bundle, "depth")  # unbounded
    s.run(x)
    sw = s.switch_task("semseg")
    assert sw.loaded == () and {k[1] for k in sw.unloaded} <= {4, 5, 6, 7} and sw.experts_unloaded > 0
    np.testing.assert_array_equal(s.run(x), want["semseg"])
    assert s.stats.evictions == sw.experts_unloaded  # unbounded: only the switch frees experts


# -- budgets -----------------------------------------------------------------------------------
def test_parse_budget_takes_percentages_and_sizes(bundle_factory):
    m = read_manifest(bundle_factory(MODEL))
    routed = sum(expert_sizes(m).values())
    assert parse_budget("25%", m) == routed // 4
    assert parse_budget("6MB", m) == 6_000_000 and parse_budget("12.5KiB", m) == 12800
    assert parse_budget("100000", m) == parse_budget(100000, m) == 100000
    for bad in ("0", "0%", "150%", "lots", "6XB", "inf"):
        with pytest.raises(ConfigError, match="budget"):
            parse_budget(bad, m)


def test_compile_memory_budget_checks_and_plans(run_cli, bundle_factory, tmp_path):
    largest = max(expert_sizes(read_manifest(bundle_factory(MODEL))).values())
    out = tmp_path / "b"
    budget = largest + 1  # holds one expert, not a layer's top-2
    res = run_cli("compile", MODEL, "-o", out, "--device", DEVICE, "--memory-budget", budget, "--json")
    assert res.exit_code == 0, res.output
    notes = json.loads(res.stdout)["warnings"]
    assert len(notes) == 1 and f"{budget} bytes" in notes[0] and f"top-2 working set of {2 * largest} bytes" in notes[0]
    assert f"warning: {notes[0]}" in res.stderr
    m = read_manifest(out)
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))
    assert m["schedule"]["budget_bytes"] == budget and m["schedule"]["device"] == DEVICE
    assert set(m["schedule"]["task_switch"]) == {"semseg->depth", "depth->semseg"}
    with pytest.warns(ThrashWarning) as caught:  # the session runs the very same check
        Session(out, "depth", memory_budget=budget)
    assert [str(w.message) for w in caught] == notes

    res = run_cli("compile", MODEL, "-o", tmp_path / "c", "--memory-budget", largest - 1, "-q")
    assert res.exit_code == ConfigError.exit_code
    assert f"largest expert ({largest} B) = {largest} bytes" in res.stderr and not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".c.staging-*"))
    res = run_cli("compile", MODEL, "-o", tmp_path / "d", "--memory-budget", "lots", "-q")
    assert res.exit_code == ConfigError.exit_code and "budget must be" in res.stderr
