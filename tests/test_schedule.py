"""Swap schedule: device profiles, traces, policies vs Belady, simulator vs runtime, expert cache, `edgemoe plan`."""

from __future__ import annotations

import functools
import inspect
import json
import math
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgemoe.bundle.format import read_manifest, sample_input
from edgemoe.devices import device_profiles, get_device, load_profiles
from edgemoe.errors import ConfigError
from edgemoe.runtime import Session
from edgemoe.schedule import Belady, record_trace, simulate
from edgemoe.schedule.planner import PREFETCH_MARGIN
from edgemoe.schedule.traces import Step, Trace
from edgemoe.swap import POLICIES, ThrashWarning, check_budget, expert_sizes, make_policy, parse_budget
from edgemoe.swap.predict import make_predictor

NAMED = (
    "host",
    "jetson-orin-nano-8gb",
    "jetson-agx-orin-64gb",
    "jetson-xavier-nx",
    "raspberry-pi-5",
    "zcu104",
    "zcu102",
)


@pytest.fixture
def bundle(bundle_factory, tmp_path):
    """A private copy of the m3vit-micro bundle (plan rewrites its manifest)."""
    dst = tmp_path / "m3vit-micro"
    shutil.copytree(bundle_factory("m3vit-micro"), dst)
    return dst


def _inputs(bundle, n, seed=3):
    return sample_input(read_manifest(bundle)["input"], batch=n, seed=seed)


# -- device profiles ---------------------------------------------------------------------------
def test_named_profiles_have_tiers_with_sources():
    profiles = device_profiles()
    for name in NAMED:
        p = profiles[name]
        assert p.weight_memory_bytes > 0 and p.storage_gbs > 0 and p.compute_gflops > 0, name
        assert 0 < p.load_gbs() <= p.storage_gbs
        for key in ("weight_memory_bytes", "storage_gbs", "compute_gflops"):
            assert p.tier_sources.get(key), f"{name}: no source for {key}"
    assert profiles["zcu104"].onchip_gbs > 0 and profiles["jetson-orin-nano-8gb"].onchip_gbs == 0


def test_user_profiles_from_toml_and_json(tmp_path):
    toml = tmp_path / "boards.toml"
    toml.write_text("[my-board]\nmemory_bytes = 4294967296\nstorage_gbs = 0.5\ncompute_gflops = 100.0\n")
    p = load_profiles(toml)["my-board"]
    assert p.storage_gbs == 0.5 and p.weight_memory_bytes == 4294967296 and "user-defined" in p.source
    js = tmp_path / "board.json"
    js.write_text(json.dumps({"b": {"memory_bytes": 1 << 30, "onchip_gbs": 4.0, "storage_gbs": 1.0}}))
    assert get_device(str(js)).load_gbs() == 1.0
    js.write_text(json.dumps({"b": {"memory_bytes": 1 << 30, "flux": 1}}))
    with pytest.raises(ConfigError, match="unknown fields"):
        load_profiles(js)
    js.write_text(json.dumps({"b": {"memory_bytes": -1}}))
    with pytest.raises(ConfigError, match="memory_bytes"):
        load_profiles(js)


# -- budget checks -----------------------------------------------------------------------------
def test_budget_checks(bundle):
    m = read_manifest(bundle)
    sizes = expert_sizes(m)
    largest = max(sizes.values())
    with pytest.raises(ConfigError, match=f"largest expert \\({largest} B\\)"):
        check_budget(m, largest - 1)
    with pytest.raises(ConfigError, match="largest expert"):
        Session(bundle, "semseg", memory_budget=largest - 1)
    with pytest.warns(ThrashWarning, match="working set"):
        check_budget(m, largest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_budget(m, 2 * largest) == 2 * largest
    assert parse_budget("50%", m) == sum(sizes.values()) // 2
    with pytest.raises(ConfigError, match="percentage"):
        parse_budget("lots", m)


# -- simulator ---------------------------------------------------------------------------------
def test_planned_prefetch_veto_uses_the_predicted_step():
    # A prefetched expert is due at its layer's next visit; its prior (recency) estimate may lie far
    # later, and comparing victims against that vetoed nearly every prefetch on token-routed plans.
    from edgemoe.swap.policies import Planned

    policy = Planned([[0.25] * 8] * 4, [[1.0, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0]] * 4)
    steps = [[(0, 1), (0, 2)], [(1, 6)], [(2, 3)], [(3, 3)], [(0, 1)]]
    for i, keys in enumerate(steps[:-1]):
        policy.begin_step(i, i % 4, keys)
        for key in keys:
            policy.touch(key)
    policy.begin_step(4, 0, steps[-1])
    assert policy.expected_next_use((2, 0)) > policy.expected_next_use((0, 2)) > 2  # prior: (2, 0) far off
    assert policy.outliving([(0, 2), (3, 5)], (2, 0)) == [(0, 2), (3, 5)]
    # (1, 6) is reused at every visit: due at the next layer, before (2, 0), so a prefetch may not evict it
    assert policy.expected_next_use((1, 6)) == 1
    assert policy.outliving([(1, 6), (0, 2)], (2, 0)) == [(0, 2)]


def test_planned_keeps_an_expert_calibration_never_saw_once_it_is_in_use():
    # Short calibration traces of a model with sticky routing can miss an expert entirely (p = 0).
    # Rating it "never needed" evicted it first even while every token used it.
    from edgemoe.swap.policies import Planned

    for recency in ([[1.1, 6.0, 8.0, 8.0]] * 2, None):
        policy = Planned([[0.5, 0.0, 0.5, 0.25], [0.5, 0.5, 0.5, 0.5]], recency)
        assert policy.expected_next_use((0, 1)) == math.inf  # unseen anywhere: not expected back
        for step in range(4):
            keys = [(0, 1), (0, 2)] if step % 2 == 0 else [(1, 0)]
            policy.begin_step(step, step % 2, keys)
            for key in keys:
                policy.touch(key)
        policy.begin_step(4, 0, [(0, 1), (0, 2)])
        policy.touch((0, 1))
        policy.touch((0, 2))
        policy.begin_step(5, 1, [(1, 0)])
        # (0, 1) was used at every visit of layer 0 (and (0, 3) never): the victim is (0, 3), not (0, 1)
        assert policy.expected_next_use((0, 1)) < math.inf
        assert policy.victim([(0, 1), (0, 3)]) == (0, 3)
        # A task switch to probabilities without it: the new task never uses it, so it goes first again.
        policy.new_task([[0.5, 0.0, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]])
        assert policy.expected_next_use((0, 1)) == math.inf
        assert policy.victim([(0, 2), (0, 1)]) == (0, 1)


def test_belady_bounds_every_policy_and_memory_stays_in_budget(bundle):
    m = read_manifest(bundle)
    sizes = expert_sizes(m, "semseg")
    calib = record_trace(bundle, "semseg", _inputs(bundle, 4, seed=1), "run")
    held = record_trace(bundle, "semseg", _inputs(bundle, 6, seed=2), "run")
    assert held.steps and all(s.experts == tuple(sorted(s.experts)) for s in held.steps)
    prob = calib.probabilities()
    steps = [held.keys(i) for i in range(len(held.steps))]
    for frac in (0.25, 0.5):
        cap = int(sum(sizes.values()) * frac)
        best = simulate(held, sizes, cap, Belady(steps))
        for name in POLICIES:
            r = simulate(
                held, sizes, cap, make_policy(name, prob), get_device("jetson-orin-nano-8gb"), keep_timeline=True
            )
            assert r.hits <= best.hits, (name, frac)
            assert r.accesses == best.accesses == sum(len(s.experts) for s in held.steps)
            assert max(b for _, b in r.memory) <= cap and r.peak_bytes <= cap
            assert r.time_s >= r.stall_s > 0 and r.bytes_moved == r.misses * max(sizes.values())
        full = simulate(held, sizes, sum(sizes.values()), make_policy("lru"))
        assert full.misses == len({k for ks in steps for k in ks})  # only compulsory misses


class _StepMIN(Belady):
    """The MIN this project used to have: next use in whole steps, ties within a step broken by recency."""

    def victim(self, candidates):
        return max(candidates, key=lambda k: (self.next_use(k), -self.last_use.get(k, -1)))


def _most_hits(accesses, slots):
    """The most hits any choice of victims gets (exhaustive search over every miss's victims)."""

    @functools.cache
    def best(i, cached):
        if i == len(accesses):
            return 0
        key = accesses[i]
        if key in cached:
            return 1 + best(i + 1, cached)
        if len(cached) < slots:
            return best(i + 1, cached | {key})
        return max(best(i + 1, cached - {v} | {key}) for v in cached)

    return best(0, frozenset())


def _trace(layers, experts, steps):
    steps = tuple(Step(i // layers, i % layers, tuple(es), (1,) * len(es), None) for i, es in enumerate(steps))
    return Trace("t", "run", layers, (experts,) * layers, steps)


def test_belady_is_exact_min_per_access():
    # Experts of one size: Belady's hits are the most any choice of victims gets, on small random
    # traces (1-2 layers of 3-6 experts, 1-3 slots, 6-12 steps of 1-3 experts each, ascending as replayed).
    size = 10

    def hits(trace, slots, policy, extra=0):
        sizes = {(layer, e): size for layer in range(trace.num_layers) for e in range(trace.num_experts[0])}
        return simulate(trace, sizes, slots * size + extra, policy).hits

    # (0, 0) and (0, 1) are next needed in one step: evicting (0, 0), accessed first there, as the
    # step-granular MIN did (least recent), makes its miss evict (0, 2), needed right after.
    trace = _trace(1, 3, [[0], [1], [2], [0, 1], [2]])
    keys = [trace.keys(i) for i in range(len(trace.steps))]
    assert _most_hits(tuple(k for ks in keys for k in ks), 2) == hits(trace, 2, Belady(keys)) == 2
    assert hits(trace, 2, _StepMIN(keys)) == 1

    rng = np.random.default_rng(15)
    lost = 0
    for _ in range(300):
        layers, experts, slots = int(rng.integers(1, 3)), int(rng.integers(3, 7)), int(rng.integers(1, 4))
        steps = [
            sorted(rng.choice(experts, size=int(rng.integers(1, 4)), replace=False).tolist())
            for _ in range(int(rng.integers(6, 13)))
        ]
        trace = _trace(layers, experts, steps)
        keys = [trace.keys(i) for i in range(len(trace.steps))]
        best = _most_hits(tuple(k for ks in keys for k in ks), slots)
        extra = int(rng.integers(0, size))  # a part of a slot holds no expert
        assert hits(trace, slots, Belady(keys), extra) == best, steps
        lost += hits(trace, slots, _StepMIN(keys), extra) < best
        prob = rng.random((layers, experts)) * (rng.random((layers, experts)) < 0.8)  # some never used
        recency = (1 + 8 * rng.random((layers, 4))).tolist()
        others = [
            make_policy("lru"),
            make_policy("lfu"),
            make_policy("planned", trace.probabilities()),
            make_policy("planned", prob.tolist()),
            make_policy("planned", prob.tolist(), recency),
        ]
        for policy in others:
            assert hits(trace, slots, policy, extra) <= best, (policy.name, steps)
    assert lost  # the step-granular MIN falls short on some of these traces


def test_predictors_on_token_trace(bundle_factory):
    lm = bundle_factory("switch-lm-micro")
    spec = read_manifest(lm)["input"]
    calib = record_trace(lm, "lm", sample_input(spec, batch=3, seed=1), "token")
    held = record_trace(lm, "lm", sample_input(spec, batch=3, seed=2), "token")
    sizes = expert_sizes(read_manifest(lm), "lm")
    assert held.granularity == "token" and all(len(s.experts) == 1 for s in held.steps)  # top-1
    for name in ("pregate", "affinity", "static"):
        r = simulate(
            held,
            sizes,
            sum(sizes.values()) // 4,
            make_policy("planned", calib.probabilities()),
            None,
            make_predictor(name, calib),
        )
        assert 0 <= r.recall <= 1 and r.prefetch_issued > 0 and r.peak_bytes <= sum(sizes.values()) // 4


# -- runtime expert cache ----------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_simulator_and_runtime_agree_on_misses(bundle, policy):
    m = read_manifest(bundle)
    sizes = expert_sizes(m, "semseg")
    x = _inputs(bundle, 5)
    trace = record_trace(bundle, "semseg", x, "run")
    budget = 3 * max(sizes.values())
    session = Session(bundle, "semseg", memory_budget=budget, policy=policy)
    for i in range(len(x)):
        session.run(x[i : i + 1])
    prob = session._cache.policy.prob if policy == "planned" else None
    sim = simulate(trace, sizes, budget, make_policy(policy, prob))
    st = session.stats
    assert st.cache_misses == sim.misses > 0 and st.cache_hits == sim.hits
    assert st.evictions == sim.evictions and st.expert_bytes_loaded == sim.bytes_moved
    assert st.peak_expert_bytes <= budget


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_simulator_prefetches_as_the_runtime(bundle, depth):
    # A budget that holds every expert: no eviction, so which loads are prefetched and which
    # accesses find their expert loaded or loading depends on the lookahead rules only, not on timing.
    from edgemoe.swap.predict import PREFETCH_DEPTH, PreGate, Static

    m = read_manifest(bundle)
    sizes = expert_sizes(m, "semseg")
    x = _inputs(bundle, 4)
    trace = record_trace(bundle, "semseg", x, "run")
    budget = sum(sizes.values())
    session = Session(
        bundle, "semseg", memory_budget=budget, policy="planned", prefetch="pregate", prefetch_depth=depth
    )
    for i in range(len(x)):
        session.run(x[i : i + 1])
        session.wait_prefetch()
    prob = session._cache.policy.prob
    far = Static.from_probabilities(prob)
    sim = simulate(trace, sizes, budget, make_policy("planned", prob), None, PreGate(), far=far, depth=depth)
    st = session.stats
    assert st.prefetch_issued == sim.prefetch_issued > 0
    assert (st.cache_hits, st.cache_misses) == (sim.hits, sim.misses) and st.expert_bytes_loaded == sim.bytes_moved
    default = inspect.signature(Session).parameters["prefetch_depth"].default
    assert default == PREFETCH_DEPTH  # the planner simulates the runtime's default
    session.close()


def test_simulator_times_dense_compute_and_loads_overlap_it(bundle):
    import dataclasses

    from edgemoe.schedule.planner import dense_cost
    from edgemoe.swap.predict import Static

    m = read_manifest(bundle)
    sizes, dense = expert_sizes(m, "semseg"), dense_cost(m, "semseg")
    task = m["tasks"]["semseg"]
    graphs = [*m["segments"], *task["gates"], task["head"]]
    assert sum(dense.before) + dense.after == sum(m["graphs"][g]["bytes"] for g in graphs)
    trace = record_trace(bundle, "semseg", _inputs(bundle, 3), "run")
    profile = dataclasses.replace(get_device("jetson-orin-nano-8gb"), compute_gflops=5.0)
    prob = trace.probabilities()
    resident = simulate(trace, sizes, sum(sizes.values()), make_policy("lru"), profile, warm=list(sizes), dense=dense)
    tokens = sum(trace.steps[0].tokens) / dense.top_k[0]  # every image has the same patches
    # 2 FLOP per fp32 weight per token, experts (by their routed tokens) and dense graphs (every token)
    experts = sum(n * sizes[(s.layer, e)] for s in trace.steps for e, n in zip(s.experts, s.tokens, strict=True))
    want = (experts + 3 * tokens * (sum(dense.before) + dense.after)) / 2 / 5e9
    assert resident.stall_s == 0 and resident.time_s == pytest.approx(want)
    cap = 3 * max(sizes.values())
    kw = {"predictor": make_predictor("static", trace), "far": Static.from_probabilities(prob), "depth": 2}
    without = simulate(trace, sizes, cap, make_policy("planned", prob), profile, **kw)
    with_dense = simulate(trace, sizes, cap, make_policy("planned", prob), profile, dense=dense, **kw)
    assert with_dense.compute_s > without.compute_s and with_dense.stall_s < without.stall_s  # loads overlap it


def test_routed_runs_cached_experts_while_the_misses_load():
    # One layer, experts of one size, room for two. Step 1 needs 1 (cached) and 2 (missing): on
    # demand it runs 1, then loads 2 and waits; routed starts 2's load first and runs 1 meanwhile.
    # In step 0 (0 and 1 both missing) routed loads 1 while 0 computes. Same victim (0, least
    # recent), same misses: two experts' compute less on the clock.
    import dataclasses

    from edgemoe.swap.predict import Routed

    trace = _trace(1, 3, [[0, 1], [1, 2]])
    sizes = {(0, e): 1_000_000 for e in range(3)}
    load = 1e6 / 2e9  # jetson-orin-nano-8gb: 2 GB/s storage
    profile = dataclasses.replace(get_device("jetson-orin-nano-8gb"), compute_gflops=1e6 / 2 / load / 1e9)
    compute = load  # 2 FLOP per fp32 weight on one token: as long as a load on this profile
    demand = simulate(trace, sizes, 2_000_000, make_policy("lru"), profile, log=True)
    routed = simulate(trace, sizes, 2_000_000, make_policy("lru"), profile, Routed(), log=True)
    assert (
        (routed.misses, routed.hits, routed.bytes_moved)
        == (demand.misses, demand.hits, demand.bytes_moved)
        == (
            3,
            1,
            3_000_000,
        )
    )
    assert demand.time_s == pytest.approx(2 * load + 2 * compute + compute + load + compute)
    assert routed.time_s == pytest.approx(demand.time_s - 2 * compute)
    assert routed.prefetch_issued == 0
    # the log: step 1's miss of 2 (and its victim, 0) come before its hit of 1
    assert [e for e in routed.events if e[0] == 1] == [
        (1, 0, 2, "miss"),
        (1, 0, 0, "evict"),
        (1, 0, 2, "load"),
        (1, 0, 1, "hit"),
    ]
    assert [e for e in demand.events if e[0] == 1] == [
        (1, 0, 1, "hit"),
        (1, 0, 2, "miss"),
        (1, 0, 0, "evict"),
        (1, 0, 2, "load"),
    ]


def test_simulator_puts_a_demand_load_ahead_of_queued_prefetches():
    # As the runtime's throttle (test_prefetch.py): queued background loads take the channel one at
    # a time as it frees; a demand miss waits only for the one in progress, and an access to one
    # still queued loads it itself then.
    from edgemoe.schedule.simulate import VirtualCache
    from edgemoe.swap.book import CacheBook

    sizes = {(0, e): 1000 for e in range(4)}
    vc = VirtualCache(CacheBook(4000, sizes, make_policy("lru")), 1000.0, 0.0, True)  # 1 s per load
    assert vc.prefetch([(0, 0), (0, 1), (0, 2)]) == ()
    vc.run(0.5, "dense", 0, -1)
    assert vc.acquire((0, 3)) is False
    assert vc.now == pytest.approx(2.0)  # after (0, 0)'s slot, ahead of (0, 1) and (0, 2)
    assert vc.acquire((0, 2)) is True  # queued behind (0, 1), which took the channel at 2 s
    assert vc.now == pytest.approx(4.0)
    assert vc.acquire((0, 1)) is True and vc.now == pytest.approx(4.0)  # landed at 3 s
    loads = [(round(a, 6), round(b, 6), k) for a, b, kind, *k in vc.timeline if kind == "load"]
    assert loads == [(0, 1, [0, 0]), (1, 2, [0, 3]), (2, 3, [0, 1]), (3, 4, [0, 2])]
    assert vc.stall == pytest.approx(1.5 + 2.0)


def test_fetch_rule_orders_a_step_and_leaves_what_finds_no_room_to_demand():
    from edgemoe.swap.book import CacheBook, fetch_rule

    sizes = {(0, e): 10 for e in range(5)}
    book = CacheBook(30, sizes, make_policy("lru"))
    for key, ready in (((0, 0), True), ((0, 1), False), ((0, 4), True)):
        book.reserve(key)
        if ready:
            book.ready(key)
    issued = []

    def issue(key, victims):
        for v in victims:
            book.evict(v)
        book.reserve(key)
        issued.append((key, victims))

    # (0, 0) is cached, (0, 1) loading; (0, 2) evicts (0, 4), the only entry outside the step; (0, 3)
    # finds no room (the step's own experts and in-flight loads are never victims) and loads on demand.
    order = fetch_rule(book, [(0, 0), (0, 1), (0, 2), (0, 3)], issue)
    assert order == ((0, 0), (0, 1), (0, 2), (0, 3)) and issued == [((0, 2), [(0, 4)])]
    assert book.misses == 1 and book.claimed == {(0, 2)}
    book.ready((0, 2))
    assert book.evictable() == [(0, 0)]  # a fetched expert is kept until its step runs it
    assert book.access((0, 2)) and book.misses == 1 and book.hits == 0 and not book.claimed  # counted once
    assert not book.access((0, 3)) and book.misses == 2


def test_outputs_identical_across_budgets_and_prefetch(bundle):
    x = _inputs(bundle, 3)
    want = Session(bundle, "depth").run(x)
    largest = max(expert_sizes(read_manifest(bundle)).values())
    cases = [(None, "pregate"), (2 * largest, None), (2 * largest, "pregate"), (largest, "static")]
    for budget, prefetch in [*cases, (2 * largest, "routed"), (largest, "routed")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ThrashWarning)
            s = Session(bundle, "depth", memory_budget=budget, prefetch=prefetch)
        np.testing.assert_array_equal(s.run(x), want)
        np.testing.assert_array_equal(s.run(x), want)
        st = s.stats
        if prefetch:
            assert (st.prefetch_issued > 0) == (prefetch != "routed")
        if budget:
            assert st.peak_expert_bytes <= budget and st.evictions > 0
        s.close()


def test_concurrent_runs_under_tiny_budget(bundle):
    xs = [_inputs(bundle, 1, seed=s) for s in range(8)]
    ref = Session(bundle, "semseg")
    want = [ref.run(x) for x in xs]
    largest = max(expert_sizes(read_manifest(bundle)).values())
    with pytest.warns(ThrashWarning):
        session = Session(bundle, "semseg", memory_budget=largest, prefetch="pregate")
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(session.run, x) for x in xs * 2]
        got = [f.result(timeout=60) for f in futures]  # a deadlock fails here instead of hanging
    for g, w in zip(got, want * 2, strict=True):
        np.testing.assert_array_equal(g, w)
    assert session.stats.peak_expert_bytes <= largest
    session.close()


def test_storage_throttle_costs_bytes_over_bandwidth(bundle):
    x = _inputs(bundle, 1)
    gbs = 0.002  # 2 MB/s: a 6 KB expert takes >= 3 ms
    s = Session(bundle, "semseg", storage_gbs=gbs)
    start = time.perf_counter()
    s.run(x)
    elapsed = time.perf_counter() - start
    st = s.stats
    assert st.stall_ms / 1e3 >= st.expert_bytes_loaded / (gbs * 1e9) * 0.99
    assert elapsed >= st.expert_bytes_loaded / (gbs * 1e9) * 0.99


# -- planner and CLI ---------------------------------------------------------------------------
def test_plan_cli_json_plots_and_manifest(bundle, run_cli, tmp_path):
    res = run_cli(
        "plan",
        bundle,
        "--device",
        "jetson-orin-nano-8gb",
        "--budget",
        "50%",
        "--heldout",
        "4",
        "--json",
        "--plots",
        tmp_path / "plots",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["budget_bytes"] == parse_budget("50%", read_manifest(bundle))
    assert set(out["policies"]) == {"lru", "lfu", "planned", "belady"}
    for r in out["policies"].values():
        assert 0 <= r["hit_rate"] <= out["policies"]["belady"]["hit_rate"] <= 1
    assert set(out["prefetch"]) == {"pregate", "affinity", "static", "routed"}
    assert all(0 <= r["accuracy"] <= 1 for r in out["prefetch"].values())
    assert 0 < out["peak_bytes"] <= out["budget_bytes"]
    for name in ("memory.png", "usage.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    sched = read_manifest(bundle)["schedule"]
    assert sched["budget_bytes"] == out["budget_bytes"] and set(sched["tasks"]) == {"semseg", "depth"}
    assert set(sched["task_switch"]) == {"semseg->depth", "depth->semseg"}
    assert run_cli("inspect", bundle, "--check").exit_code == 0  # the rewritten manifest is still a valid bundle
    # The runtime follows the stored plan: planned policy probabilities and the chosen predictor.
    x = _inputs(bundle, 2)
    want = Session(bundle, "semseg").run(x)
    for prefetch in ("plan", "pregate", "affinity", "static"):
        s = Session(bundle, "semseg", memory_budget=out["budget_bytes"], policy="planned", prefetch=prefetch)
        assert s._cache.policy.prob == sched["tasks"]["semseg"]["probability"]
        np.testing.assert_array_equal(s.run(x), want)
        # 'plan' is the chosen predictor, or none where the plan found that none pays on the device.
        issues = prefetch != "plan" or sched["predictor"] is not None
        assert (s.stats.prefetch_issued > 0) == issues and s.stats.peak_expert_bytes <= out["budget_bytes"]
        s.close()


def test_plan_cli_errors(bundle, run_cli):
    res = run_cli("plan", bundle, "--budget", "10")
    assert res.exit_code == ConfigError.exit_code and "largest expert" in res.stderr
    res = run_cli("plan", bundle, "--device", "no-such-board")
    assert res.exit_code != 0 and "unknown device" in res.stderr


def test_reload_after_eviction_rechecks_a_changed_blob(bundle):
    from edgemoe.errors import IntegrityError

    x = _inputs(bundle, 1)
    largest = max(expert_sizes(read_manifest(bundle)).values())
    with pytest.warns(ThrashWarning):
        s = Session(bundle, "semseg", memory_budget=largest)
    s.run(x)
    s.run(x)  # reloads skip the hash while the files are unchanged
    assert s.stats.cache_misses > s.stats.experts_loaded
    for blob in (bundle / "experts").glob("L*_E*.bin"):
        data = bytearray(blob.read_bytes())
        data[0] ^= 0xFF
        time.sleep(0.01)
        blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        s.run(x)


def test_failed_prefetch_reports_the_integrity_error(bundle):
    from edgemoe.errors import IntegrityError

    x = _inputs(bundle, 1)
    s = Session(
        bundle, "semseg", memory_budget=4 * max(expert_sizes(read_manifest(bundle)).values()), prefetch="pregate"
    )
    for blob in (bundle / "experts").glob("L1_E*.bin"):  # layer 1: only ever prefetched or loaded after layer 0
        blob.write_bytes(b"\0" * blob.stat().st_size)
    with pytest.raises(IntegrityError, match="sha256"):
        s.run(x)
    s.close()


def test_plan_prefetches_only_where_its_simulation_says_it_pays(bundle_factory, tmp_path):
    from dataclasses import replace

    from edgemoe.schedule import plan_bundle

    bundle = tmp_path / "b"
    shutil.copytree(bundle_factory("m3vit-micro"), bundle)
    # A fast device: loads cannot hide behind the little compute there is, so guesses only add loads.
    fast = plan_bundle(bundle, "jetson-orin-nano-8gb", "50%", write=False)
    demand = fast["policies"][fast["policy"]]["stall_s"]
    assert fast["predictor"] is None and all(r["stall_s"] > demand for r in fast["prefetch"].values())
    # A slower processor: each layer's compute hides the next layer's loads, and prefetch pays.
    slow = replace(get_device("jetson-orin-nano-8gb"), name="slow-cpu", compute_gflops=10.0)
    res = plan_bundle(bundle, slow, "50%", write=True)
    assert res["predictor"] not in (None, "routed")
    demand = res["policies"][res["policy"]]
    assert res["prefetch"][res["predictor"]]["time_s"] < (1 - PREFETCH_MARGIN) * demand["time_s"]
    # Slower still, the loads are a sliver of the time: what prefetch would save is not worth its CPU time.
    crawl = plan_bundle(bundle, replace(slow, compute_gflops=0.1), "50%", write=False)
    assert crawl["predictor"] is None
    assert all(r["stall_s"] < crawl["policies"][crawl["policy"]]["stall_s"] for r in crawl["prefetch"].values())
    sched = read_manifest(bundle)["schedule"]
    assert sched["predictor"] == res["predictor"] and sched["tasks"]["semseg"]["prefetch"] is not None
    # Stored as "no prefetch": the runtime then loads on demand, with the same outputs.
    plan_bundle(bundle, "jetson-orin-nano-8gb", "50%", write=True)
    sched = read_manifest(bundle)["schedule"]
    assert sched["predictor"] is None and sched["tasks"]["semseg"]["prefetch"] is None
    x = _inputs(bundle, 2)
    s = Session(bundle, "semseg", prefetch="plan")
    assert s.prefetch is None
    np.testing.assert_array_equal(s.run(x), Session(bundle, "semseg", memory_budget=None).run(x))
    assert s.stats.prefetch_issued == 0
    s.close()
