"""One set of swap rules: the Python runtime, the simulator and edgemoe-rt log the same decisions.

The event log (per step: hit / miss / evict / load / prefetch of each expert) is the contract of
:mod:`edgemoe.swap`: the runtime's cache, the simulator's virtual one and the native runtime
must produce it identically for the same trace, budget and policy.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import GUARD_CODE, guard_prelude, read_manifest

from edgemoe.bundle import sample_input
from edgemoe.runtime import Session
from edgemoe.schedule import record_trace, simulate
from edgemoe.swap import check_budget, expert_sizes, make_policy
from edgemoe.swap.policies import count_probabilities
from edgemoe.swap.predict import Routed

ROOT = Path(__file__).resolve().parents[1]
BUDGETS = (0.25, 0.5, 1.0)


def _budget(manifest: dict, task: str, share: float) -> int:
    return int(sum(expert_sizes(manifest, task).values()) * share)


def _inputs(manifest: dict, runs: int, seed: int = 0) -> np.ndarray:
    spec = manifest["input"]
    if spec["dtype"].startswith("int"):  # token-routed LMs: byte windows
        return np.random.default_rng(seed).integers(0, spec["high"], size=(runs, 1, 48), dtype=np.int64)
    return np.stack([sample_input(spec, batch=1, seed=seed + i) for i in range(runs)])


def _python_log(bundle: Path, task: str, budget: int, policy: str, xs: np.ndarray, prefetch=None) -> list:
    s = Session(bundle, task, memory_budget=budget, policy=policy, prefetch=prefetch, log_events=True)
    for x in xs:
        s.run(x)
    return s.events


def _simulated_log(bundle: Path, task: str, budget: int, policy: str, xs: np.ndarray, prefetch=None) -> list:
    m = read_manifest(bundle)
    trace = record_trace(bundle, task, np.concatenate(list(xs)), "run")
    sizes = expert_sizes(m, task)
    capacity = check_budget(m, budget, task)
    predictor = Routed() if prefetch == "routed" else None
    res = simulate(trace, sizes, capacity, make_policy(policy, count_probabilities(m, task)), None, predictor, log=True)
    return res.events


@pytest.mark.parametrize("share", BUDGETS)
def test_runtime_and_simulator_log_the_same_decisions_on_m3vit_tiny(bundle_factory, share):
    bundle = bundle_factory("m3vit-tiny")
    m = read_manifest(bundle)
    xs = _inputs(m, 4)
    for policy in ("lru", "lfu", "planned"):
        budget = _budget(m, "semseg", share)
        got = _python_log(bundle, "semseg", budget, policy, xs)
        assert got == _simulated_log(bundle, "semseg", budget, policy, xs), (share, policy)
        kinds = {k for *_, k in got}
        assert {"miss", "load"} <= kinds and (share == 1.0) == ("evict" not in kinds)
        assert share < 1.0 or "hit" in kinds  # everything stays: later runs hit


def test_runtime_and_simulator_log_the_same_decisions_on_the_byte_lm(bundle_factory):
    bundle = bundle_factory("mixtral-lm-bytes")
    m = read_manifest(bundle)
    xs = _inputs(m, 3)
    for share in BUDGETS:
        budget = _budget(m, "lm", share)
        assert _python_log(bundle, "lm", budget, "lru", xs) == _simulated_log(bundle, "lm", budget, "lru", xs)


@pytest.mark.parametrize(("model", "task"), [("m3vit-tiny", "semseg"), ("mixtral-lm-bytes", "lm")])
def test_routed_steps_log_the_same_decisions(bundle_factory, model, task):
    # routed loads a step's misses before it runs any of its experts, cached ones first; it guesses
    # nothing, so (unlike a predictor's loads) no load is in flight when a step begins and the
    # decisions do not depend on timing: the runtime and the simulator must agree exactly.
    bundle = bundle_factory(model)
    m = read_manifest(bundle)
    xs = _inputs(m, 3)
    for share in (0.25, 0.5):
        budget = _budget(m, task, share)
        for policy in ("lru", "planned"):
            got = _python_log(bundle, task, budget, policy, xs, "routed")
            assert got == _simulated_log(bundle, task, budget, policy, xs, "routed"), (share, policy)
            kinds = [k for *_, k in got]
            assert kinds.count("miss") == kinds.count("load") > 0 and "prefetch" not in kinds
            # a step's misses are all counted (and their loads started) before its first hit
            steps: dict[int, list[str]] = {}
            for step, _, _, kind in got:
                steps.setdefault(step, []).append(kind)
            for kinds in steps.values():
                if "hit" in kinds and "miss" in kinds:
                    assert max(i for i, k in enumerate(kinds) if k == "miss") < kinds.index("hit")


@pytest.fixture(scope="module")
def rt() -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: `make native` cannot build edgemoe-rt")
    proc = subprocess.run(["make", "native"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return ROOT / "build" / "native" / "edgemoe-rt"


def _native_log(
    rt: Path, bundle: Path, task: str, budget: int, policy: str, x: np.ndarray, runs: int, tmp: Path, prefetch="off"
):
    np.save(tmp / "x.npy", x)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    cmd = [str(rt), str(bundle), "--task", task, "--input", str(tmp / "x.npy"), "--memory-budget", str(budget)]
    # --repeat R runs once, then R timed runs (as `edgemoe run`): runs - 1 of them after the first.
    cmd += ["--policy", policy, "--prefetch", prefetch, "--repeat", str(runs - 1), "--events", str(tmp / "ev.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return [tuple(e[k] for k in ("step", "layer", "expert", "kind")) for e in map(json.loads, open(tmp / "ev.jsonl"))]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "task"), [("m3vit-tiny", "semseg"), ("mixtral-lm-bytes", "lm")])
def test_native_runtime_logs_the_same_decisions(rt, bundle_factory, tmp_path, model, task):
    pytest.importorskip("tvm", reason="Apache TVM is not installed")
    bundle = bundle_factory(model, target="tvm")
    m = read_manifest(bundle)
    x = _inputs(m, 1)[0]
    runs = 3  # the same input, run after run: the cache carries over
    for share in BUDGETS:
        budget = _budget(m, task, share)
        for policy in ("lru", "planned") if share < 1 else ("lru",):
            want = _python_log(bundle, task, budget, policy, [x] * runs)
            got = _native_log(rt, bundle, task, budget, policy, x, runs, tmp_path)
            assert got == want, (model, share, policy)
            if share == 0.25:  # routed: a step's misses load first, its cached experts run meanwhile
                want = _python_log(bundle, task, budget, policy, [x] * runs, "routed")
                got = _native_log(rt, bundle, task, budget, policy, x, runs, tmp_path, "routed")
                assert got == want, (model, share, policy, "routed")


def test_runtime_imports_neither_the_planner_nor_the_compiler():
    code = (
        guard_prelude()
        + "import edgemoe.runtime, edgemoe.runtime.run, edgemoe.swap\n"
        + "bad = [m for m in sys.modules if m.startswith(('edgemoe.schedule', 'edgemoe.devices',"
        + " 'edgemoe.quantization'))]\n"
        + "assert not bad, bad\n"
        + GUARD_CODE
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_run_takes_the_bundles_schedule_and_reports_the_cache(bundle_factory, run_cli, tmp_path):
    bundle = bundle_factory("m3vit-micro", memory_budget="25%", device="jetson-orin-nano-8gb")
    m = read_manifest(bundle)
    budget = m["schedule"]["budget_bytes"]
    res = run_cli("run", bundle, "--task", "semseg", "--json", "--output", tmp_path / "a.npy")
    assert res.exit_code == 0, res.output
    cache = json.loads(res.stdout)["cache"]
    assert cache["budget_bytes"] == budget and cache["from_schedule"] and cache["policy"] == m["schedule"]["policy"]
    assert 0 < cache["peak_expert_bytes"] <= budget and cache["bytes_read"] > 0
    for key in ("hits", "misses", "evictions", "prefetched", "prefetch_hits", "stall_ms"):
        assert key in cache
    res = run_cli("run", bundle, "--task", "semseg", "--json", "--memory-budget", "none", "-o", tmp_path / "b.npy")
    assert json.loads(res.stdout)["cache"]["budget_bytes"] is None
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    res = run_cli("run", bundle, "--task", "semseg", "--memory-budget", "10")
    assert res.exit_code == 4 and "memory budget" in res.stderr
    text = run_cli("run", bundle, "--task", "semseg", "--policy", "lfu", "--prefetch", "none").stdout
    assert "cache        budget" in text and "lfu, prefetch off" in text
