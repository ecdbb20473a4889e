"""edgemoe-rt, the native runtime of TVM bundles (targets/tvm/native): built with `make native`,
compared with the Python runtime on outputs, cache counters, integrity checks and exit codes."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

from edgemoe.bundle import sample_input
from edgemoe.runtime import Session
from edgemoe.runtime.run import run_bundle

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "build" / "native" / "edgemoe-rt"
# An image model (two tasks, batch-dynamic) and a token-routed LM with shared experts.
CASES = [("m3vit-micro", "semseg"), ("m3vit-micro", "depth"), ("deepseek-lm-micro", "lm")]

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


@pytest.fixture(scope="module")
def rt() -> Path:
    """Build edgemoe-rt through the Makefile target (what CI and a developer run)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: `make native` cannot build edgemoe-rt")
    proc = subprocess.run(["make", "native"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert BINARY.is_file()
    return BINARY


def _tvm_bundle(bundle_factory, model: str) -> Path:
    return bundle_factory(model, target="tvm")


def _input(bundle: Path, session_spec: dict, model: str, tmp_path: Path, tokens: int = 16) -> tuple[np.ndarray, Path]:
    if model.startswith("m3vit"):
        x = sample_input(session_spec, batch=2, seed=3)
    else:
        x = np.random.default_rng(3).integers(0, session_spec["high"], size=(2, tokens), dtype=np.int64)
    path = tmp_path / "x.npy"
    np.save(path, x)
    return x, path


def _run(rt: Path, *args, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    # No Python on this path: a bare environment (no PYTHONPATH, no venv on PATH).
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"), **(env_extra or {})}
    return subprocess.run([str(rt), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize(("model", "task"), CASES)
def test_native_output_and_report_match_python(rt, bundle_factory, tmp_path, model, task):
    bundle = _tvm_bundle(bundle_factory, model)
    spec = json.loads((bundle / "manifest.json").read_text())["input"]
    x, xpath = _input(bundle, spec, model, tmp_path)
    proc = _run(rt, bundle, "--task", task, "--input", xpath, "--output", tmp_path / "y.npy", "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    y = np.load(tmp_path / "y.npy")
    want = Session(bundle, task).run(x)
    assert y.shape == want.shape and y.dtype == want.dtype
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)
    # The same keys and load counters as `edgemoe run --json`, plus the cache report.
    ref = run_bundle(bundle, task, input_path=xpath)
    assert set(got) == set(ref) | {"cache"}
    for key in (
        "task",
        "output_shape",
        "runs",
        "experts_loaded",
        "experts_task",
        "experts_total",
        "expert_bytes_loaded",
        "expert_bytes_task",
        "expert_bytes_total",
        "graph_bytes",
    ):
        assert got[key] == ref[key], key
    assert set(got["cache"]) >= {
        "budget_bytes",
        "peak_expert_bytes",
        "hits",
        "misses",
        "evictions",
        "prefetched",
        "prefetch_hits",
        "stall_ms",
        "bytes_read",
    }


@pytest.mark.parametrize("policy", ["lru", "lfu", "planned"])
@pytest.mark.parametrize(
    ("model", "task", "fraction", "tokens"), [("m3vit-micro", "semseg", 0.3, 0), ("deepseek-lm-micro", "lm", 0.4, 3)]
)
def test_native_cache_counters_match_python(rt, bundle_factory, tmp_path, policy, model, task, fraction, tokens):
    bundle = _tvm_bundle(bundle_factory, model)
    m = json.loads((bundle / "manifest.json").read_text())
    routed = sum(e["bytes"] for layer in m["moe_layers"] for e in layer["experts"])
    shared = sum(e["bytes"] for layer in m["moe_layers"] for e in layer.get("shared", []))
    budget = int(routed * fraction) + shared
    x, xpath = _input(bundle, m["input"], model, tmp_path, tokens=tokens or 16)
    repeat = 3  # edgemoe-rt runs once, then --repeat timed runs (as `edgemoe run`)
    proc = _run(
        rt,
        bundle,
        "--task",
        task,
        "--input",
        xpath,
        "--memory-budget",
        budget,
        "--policy",
        policy,
        "--repeat",
        repeat,
        "--json",
        "--events",
        tmp_path / "events.jsonl",
    )
    assert proc.returncode == 0, proc.stderr
    cache = json.loads(proc.stdout)["cache"]
    session = Session(bundle, task, memory_budget=budget, policy=policy)
    for _ in range(1 + repeat):
        session.run(x)
    st = session.stats
    assert st.evictions > 0  # the budget binds
    assert (cache["hits"], cache["misses"], cache["evictions"], cache["peak_expert_bytes"]) == (
        st.cache_hits,
        st.cache_misses,
        st.evictions,
        st.peak_expert_bytes,
    )
    assert cache["budget_bytes"] == budget and cache["policy"] == policy and cache["prefetched"] == 0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    kinds = [e["kind"] for e in events]
    assert set(kinds) <= {"hit", "miss", "load", "evict", "prefetch"}
    assert (kinds.count("hit"), kinds.count("miss"), kinds.count("evict")) == (
        st.cache_hits,
        st.cache_misses,
        st.evictions,
    )
    assert all(set(e) == {"step", "layer", "expert", "kind"} for e in events)


def test_native_prefetch_keeps_outputs(rt, bundle_factory, tmp_path):
    bundle = _tvm_bundle(bundle_factory, "m3vit-micro")
    spec = json.loads((bundle / "manifest.json").read_text())["input"]
    x, xpath = _input(bundle, spec, "m3vit-micro", tmp_path)
    want = Session(bundle, "semseg").run(x)
    for predictor in ("static", "pregate", "routed"):
        out = tmp_path / f"y_{predictor}.npy"
        proc = _run(
            rt,
            bundle,
            "--task",
            "semseg",
            "--input",
            xpath,
            "--output",
            out,
            "--memory-budget",
            "40%",
            "--prefetch",
            predictor,
            "--repeat",
            3,
            "--json",
        )
        assert proc.returncode == 0, proc.stderr
        cache = json.loads(proc.stdout)["cache"]
        assert cache["prefetched"] > 0 if predictor != "routed" else cache["prefetched"] == 0 < cache["misses"]
        np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-5)


def _loaded_bundle_libraries(ld_log_prefix: Path, bundle: Path) -> list[str]:
    """Libraries the dynamic loader opened from a bundle (or its private copies), from LD_DEBUG=files logs."""
    names = {p.name for p in (bundle / "graphs").iterdir()}
    hits = []
    for log in ld_log_prefix.parent.glob(ld_log_prefix.name + ".*"):
        for line in log.read_text(errors="replace").splitlines():
            if "file=" in line and any(n in line for n in names):
                hits.append(line.strip())
    return hits


@pytest.mark.parametrize("damage", ["blob", "library", "foreign_library"])
def test_native_tampered_bundle_exits_6_before_loading_code(rt, bundle_factory, tmp_path, damage):
    bundle = tmp_path / "bundle"
    shutil.copytree(_tvm_bundle(bundle_factory, "m3vit-micro"), bundle)
    spec = json.loads((bundle / "manifest.json").read_text())["input"]
    _, xpath = _input(bundle, spec, "m3vit-micro", tmp_path)
    marker = tmp_path / "constructor-ran"
    # The loader log does show the bundle's libraries when they are loaded (the check below is not vacuous).
    control = tmp_path / "ld-control"
    ok = _run(
        rt,
        bundle,
        "--task",
        "semseg",
        "--input",
        xpath,
        env_extra={"LD_DEBUG": "files", "LD_DEBUG_OUTPUT": str(control)},
    )
    assert ok.returncode == 0 and _loaded_bundle_libraries(control, bundle), ok.stderr
    if damage == "blob":
        path = bundle / "experts" / "L1_E3.bin"
        data = bytearray(path.read_bytes())
        data[100] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "library":
        path = bundle / "graphs" / "head_semseg.so"
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        # A library whose load would run code: swapped in for a listed one, it must never be opened.
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            pytest.skip("no C compiler to build the foreign library")
        src = tmp_path / "evil.c"
        src.write_text(
            "#include <stdio.h>\n"
            f'__attribute__((constructor)) static void ran(void) {{ FILE* f = fopen("{marker}", "w"); '
            "if (f) fclose(f); }\n"
        )
        subprocess.run([cc, "-shared", "-fPIC", "-o", bundle / "graphs" / "segment_1.so", src], check=True)
    ld_log = tmp_path / "ld"
    proc = _run(
        rt,
        bundle,
        "--task",
        "semseg",
        "--input",
        xpath,
        "--output",
        tmp_path / "y.npy",
        env_extra={"LD_DEBUG": "files", "LD_DEBUG_OUTPUT": str(ld_log)},
    )
    assert proc.returncode == 6, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and ("sha256" in lines[0] or "bytes" in lines[0])
    assert not (tmp_path / "y.npy").exists()
    assert not marker.exists()
    assert _loaded_bundle_libraries(ld_log, bundle) == []


def test_native_lazy_verify_reads_only_routed_blobs(rt, bundle_factory, tmp_path):
    """With --lazy-verify a damaged blob no input routes to goes unnoticed; a routed one still fails (6)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(_tvm_bundle(bundle_factory, "m3vit-micro"), bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    x = sample_input(m["input"], batch=1, seed=0)
    np.save(tmp_path / "x.npy", x)
    session = Session(bundle, "semseg")
    session.run(x)
    routed = {(li, e) for li, experts in session.loaded_experts.items() for e in experts}
    unrouted = [
        (li, e["index"])
        for li, layer in enumerate(m["moe_layers"])
        for e in layer["experts"]
        if (li, e["index"]) not in routed
    ]
    assert unrouted, "every expert routed: pick another input"
    li, e = unrouted[0]
    (bundle / "experts" / f"L{li}_E{e}.bin").write_bytes(b"garbage")
    args = (bundle, "--task", "semseg", "--input", tmp_path / "x.npy")
    assert _run(rt, *args).returncode == 6  # checked up front by default
    assert _run(rt, *args, "--lazy-verify").returncode == 0
    li, e = sorted(routed)[0]
    (bundle / "experts" / f"L{li}_E{e}.bin").write_bytes(b"garbage")
    proc = _run(rt, *args, "--lazy-verify")
    assert proc.returncode == 6 and proc.stderr.startswith("error: "), proc.stderr


def test_native_exit_codes(rt, bundle_factory, tmp_path):
    bundle = _tvm_bundle(bundle_factory, "m3vit-micro")
    spec = json.loads((bundle / "manifest.json").read_text())["input"]
    _, xpath = _input(bundle, spec, "m3vit-micro", tmp_path)
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 16, 64), np.float32))
    np.save(tmp_path / "nan.npy", np.full((1, 3, 32, 64), np.nan, np.float32))

    def check(code: int, *args, text: str = ""):
        proc = _run(rt, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == code, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], proc.stderr

    check(8, bundle, "--task", "nope", "--input", xpath, text="unknown task 'nope'")
    check(8, bundle, "--input", xpath, text="choose one")  # two tasks, none named
    check(9, bundle, "--task", "semseg", "--input", tmp_path / "bad.npy", text="input has shape [1, 3, 16, 64]")
    check(9, bundle, "--task", "semseg", "--input", tmp_path / "nan.npy", text="NaN")
    check(9, bundle, "--task", "semseg", "--input", tmp_path / "missing.npy", text="not found")
    check(4, bundle, "--task", "semseg", "--input", xpath, "--memory-budget", "10", text="memory budget")
    check(4, bundle, "--task", "semseg", "--input", xpath, "--memory-budget", "lots", text="budget must be")
    check(5, tmp_path / "nowhere", "--task", "semseg", "--input", xpath, text="bundle not found")
    check(2, bundle, "--task", "semseg", "--input", xpath, "--policy", "fifo", text="--policy")
    check(2, bundle, "--task", "semseg", text="--input")


@pytest.fixture(scope="module")
def rt_aarch64() -> Path:
    """edgemoe-rt cross-built for aarch64 through the Makefile (`make test` builds it first)."""
    tools = ("cmake", "aarch64-linux-gnu-g++", "qemu-aarch64")
    if any(shutil.which(t) is None for t in tools):
        pytest.skip(f"needs {', '.join(tools)} (make native-aarch64 installs them: g++-aarch64-linux-gnu, qemu-user)")
    proc = subprocess.run(["make", "native-aarch64"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return ROOT / "build" / "native-aarch64" / "edgemoe-rt"


# A Raspberry Pi 5 bundle and a Jetson Orin Nano one whose partitions are all CPU code (edgemoe-rt
# cannot load the CUDA libraries of a plain --device jetson-orin-nano-8gb bundle).
@pytest.mark.parametrize("device", ["raspberry-pi-5", "jetson-orin-nano-8gb-cpu"])
@pytest.mark.parametrize(("model", "task"), [("m3vit-micro", "depth"), ("deepseek-lm-micro", "lm")])
def test_native_aarch64_under_qemu_matches_x86_python(
    rt_aarch64, bundle_factory, jetson_cpu_profile, tmp_path, device, model, task
):
    """edgemoe-rt cross-built for aarch64 (`make native-aarch64`) runs aarch64 bundles under qemu-user."""
    binary = rt_aarch64
    pi = bundle_factory(model, target="tvm", device=jetson_cpu_profile if device.endswith("-cpu") else device)
    assert json.loads((pi / "manifest.json").read_text())["target"]["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    host = _tvm_bundle(bundle_factory, model)
    spec = json.loads((pi / "manifest.json").read_text())["input"]
    x, xpath = _input(pi, spec, model, tmp_path)
    proc = subprocess.run(
        [
            "qemu-aarch64",
            "-L",
            "/usr/aarch64-linux-gnu",
            str(binary),
            str(pi),
            "--task",
            task,
            "--input",
            str(xpath),
            "--output",
            str(tmp_path / "y.npy"),
            "--memory-budget",
            "50%",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), Session(host, task).run(x), rtol=0, atol=1e-4)
