"""The TVM target and executor: bundles compiled with Relax run through the same runtime as ONNX ones.

Compiles are the expensive part (a few seconds of CPU per micro model): each bundle is built once
per session through ``bundle_factory`` and shared by every test here.
"""

import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import GUARD_CODE, guard_prelude, read_manifest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

from edgemoe.bundle import sample_input
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.errors import BundleError, IntegrityError, TargetError
from edgemoe.passes.capture_model import capture_model
from edgemoe.quantization import QuantConfig
from edgemoe.runtime import Session
from edgemoe.runtime.program import _kernel_names

# m3vit (image, batch-dynamic, two tasks) and a token-routed LM with shared experts and a
# dense first block (batch and sequence dynamic, three-output gates).
MODELS = ["m3vit-micro", "deepseek-lm-micro"]
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = capture_model(CompileConfig(model=model)).adapter
        return cache[model]

    return get


def _inputs(spec, model):
    """Inputs of several sizes along every dynamic axis (the libraries are compiled shape-generic)."""
    if model.startswith("m3vit"):
        return [sample_input(spec, batch=b, seed=b) for b in (1, 3)]
    rng = np.random.default_rng(0)
    return [rng.integers(0, spec["high"], size=s, dtype=np.int64) for s in ((1, 5), (2, 16), (3, 9))]


@pytest.mark.parametrize("model", MODELS)
def test_tvm_bundle_matches_torch(bundle_factory, references, model):
    bundle = bundle_factory(model, target="tvm")
    m = read_manifest(bundle)
    adapter = references(model)
    for task in m["tasks"]:
        keep = {li: tuple(s) for li, s in enumerate(m["tasks"][task]["experts"])}
        session = Session(bundle, task)
        for x in _inputs(session.input_spec, model):
            got = session.run(x)
            ref = adapter.reference(x, task, keep)
            assert got.shape == ref.shape
            err = float(np.abs(got.astype(np.float64) - ref).max())
            assert err <= 1e-4, f"{model}/{task} input {x.shape}: max abs error {err:.3g}"


@pytest.mark.parametrize("model", MODELS)
def test_tvm_manifest_records_libraries(bundle_factory, model):
    import hashlib

    from edgemoe.targets.tvm.target import TARGET

    bundle = bundle_factory(model, target="tvm")
    assert not TARGET._built  # the torch partitions kept for quantization go when the compile ends
    m = read_manifest(bundle)
    assert m["target"]["name"] == "tvm" and m["target"]["executor"] == "tvm"
    assert m["target"]["tvm_target"]["kind"] == "llvm" and m["target"]["frontend"] == "torch.export"
    machine = ELF_MACHINE[{"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())]
    for name, g in m["graphs"].items():
        data = (bundle / g["file"]).read_bytes()
        assert g["file"] == f"graphs/{name}.so"
        assert len(data) == g["bytes"] and hashlib.sha256(data).hexdigest() == g["sha256"]
        assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == machine
    # One kernel library per expert shape, shared by every layer and expert of that shape.
    kernels = {g for g, rec in m["graphs"].items() if rec["kind"] == "expert_kernel"}
    used = {layer["kernel"] for layer in m["moe_layers"]} | {
        e["kernel"] for layer in m["moe_layers"] for e in layer.get("shared", [])
    }
    assert kernels == used
    shapes = {json.dumps(layer["expert_shape"], sort_keys=True) for layer in m["moe_layers"]}
    assert len({layer["kernel"] for layer in m["moe_layers"]}) == len(shapes)


@pytest.mark.parametrize("model", MODELS)
def test_executors_conform(bundle_factory, model):
    """Same routing, outputs, stats and expert-cache behaviour under a tight budget, whichever executor runs it."""
    bundles = {t: bundle_factory(model, target=t) for t in ("onnx", "tvm")}
    m = read_manifest(bundles["tvm"])
    task = next(iter(m["tasks"]))
    layer = m["moe_layers"][0]
    # Room for the shared experts plus two routed experts: the cache must evict.
    budget = m["totals"]["shared_expert_bytes"] + 2 * layer["expert_bytes"]
    sessions = {t: Session(b, task, memory_budget=budget, policy="lru") for t, b in bundles.items()}
    assert sessions["tvm"].executor.name == "tvm" and sessions["onnx"].executor.name == "onnxruntime"
    for seed in range(3):
        x = sample_input(sessions["tvm"].input_spec, batch=2, seed=seed)
        outs = {t: s.run(x) for t, s in sessions.items()}
        np.testing.assert_allclose(outs["tvm"], outs["onnx"], rtol=1e-4, atol=1e-5)
        for a, b in zip(sessions["tvm"].last_routing, sessions["onnx"].last_routing, strict=True):
            np.testing.assert_array_equal(a, b)
    stats = {t: s.stats for t, s in sessions.items()}
    assert stats["tvm"].evictions > 0
    same = ("experts_loaded", "expert_bytes_loaded", "resident_expert_bytes", "cache_hits", "cache_misses")
    for field in (*same, "evictions", "peak_expert_bytes", "runs", "experts_task"):
        assert getattr(stats["tvm"], field) == getattr(stats["onnx"], field), field
    # Graph bytes are the target's own files; both count exactly the graphs the task loaded.
    names = [*m["segments"], *m["tasks"][task]["gates"], m["tasks"][task]["head"]]
    names += _kernel_names(m, m["tasks"][task]["experts"])
    assert stats["tvm"].graph_bytes == sum(m["graphs"][n]["bytes"] for n in names)


@pytest.mark.parametrize(("model", "task"), [("m3vit-micro", "semseg"), ("deepseek-lm-micro", "lm")])
def test_resident_run_equals_the_host_path_and_copies_back_only_routing(bundle_factory, model, task):
    """Activations kept in TVM tensors (the GPU path, run here on the CPU) give the host path's bits.

    Back to numpy per run: each layer's expert ids and scores (+ shared-expert weights), the output.
    """
    from edgemoe.targets.tvm.executor import ADD, COMBINE, GATHER, ResidentProgram, TvmExecutor

    bundle = bundle_factory(model, target="tvm")
    m = read_manifest(bundle)
    assert {GATHER, COMBINE, ADD} <= {n for n, g in m["graphs"].items() if g["kind"] == "dispatch"}
    host = Session(bundle, task)
    assert type(host.program).__name__ == "GraphProgram"  # a CPU bundle reads numpy in place by default
    resident = Session(bundle, task, executor=TvmExecutor(resident=True))
    assert isinstance(resident.program, ResidentProgram)
    per_run = sum(2 + bool(layer.get("shared")) for layer in m["moe_layers"]) + 1
    for seed in range(3):
        x = sample_input(resident.input_spec, batch=2, seed=seed)
        before = resident.program.host_copies
        np.testing.assert_array_equal(resident.run(x), host.run(x))
        assert resident.program.host_copies - before == per_run
    assert resident.stats.experts_loaded == host.stats.experts_loaded


def test_tvm_runtime_imports_no_torch_and_no_compiler(bundle_factory):
    """A process that runs a TVM bundle loads neither torch (TVM's FFI would import it) nor the compiler."""
    bundle = bundle_factory("m3vit-micro", target="tvm")
    code = (
        guard_prelude()
        + "from edgemoe.runtime import Session\n"
        + "from edgemoe.bundle import sample_input\n"
        + f"s = Session({str(bundle)!r}, 'depth')\n"
        + "y = s.run(sample_input(s.input_spec, batch=1))\n"
        + "assert s.executor.name == 'tvm' and y.shape == (1, 1, 32, 64), y.shape\n"
        + GUARD_CODE
        + "import torch\n"  # the mask on torch is lifted once TVM is loaded
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_tampered_library_is_refused_before_loading(bundle_factory, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(bundle_factory("m3vit-micro", target="tvm"), bundle)
    lib = bundle / "graphs" / "segment_1.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"segment_1\.so fails its sha256"):
        Session(bundle, "semseg")


def test_tvm_graph_rejects_bad_inputs_clearly(bundle_factory):
    session = Session(bundle_factory("m3vit-micro", target="tvm"), "semseg")
    kernel = next(iter(session.program._kernels.values()))
    x = np.zeros((4, 31), np.float32)  # d_model is 32
    weights = [np.zeros(p["shape"], np.float32) for p in session.layers[0]["expert_shape"]["params"]]
    with pytest.raises(BundleError, match="rejects its inputs"):
        kernel.run(x, *weights)


def test_tvm_refuses_what_it_cannot_build(tmp_path):
    gpu = tmp_path / "gpu.toml"  # an SM no nvcc builds (Jetson CUDA builds: tests/test_tvm_cuda.py)
    gpu.write_text('[old-gpu]\ncpu_arch = "x86_64"\ncuda_arch = "sm_20"\nmemory_bytes = 1073741824\n')
    with pytest.raises(TargetError, match="sm_20"):
        compile_model(CompileConfig(model="m3vit-micro", target="tvm", device=str(gpu)), tmp_path / "a")
    # Quantized TVM bundles are calibrated by running them, so they build for this machine only
    # (int4 / mixed precision refusals: tests/test_tvm_quant.py).
    # (Without an aarch64 linker the device itself is refused first.)
    with pytest.raises(TargetError, match=r"calibrated by running them here|cross compiler"):
        quant = QuantConfig(scheme="int8")
        cfg = CompileConfig(model="m3vit-micro", target="tvm", device="raspberry-pi-5", calib_samples=1, quant=quant)
        compile_model(cfg, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tvm_executor_takes_no_providers():
    from edgemoe.runtime.executor import get_executor

    with pytest.raises(BundleError, match="takes no providers"):
        get_executor("tvm", providers=("CUDAExecutionProvider",))


def _no_aarch64_linker() -> bool:
    from edgemoe.targets.tvm.cuda import cross_linker
    from edgemoe.targets.tvm.target import AARCH64_CXX, AARCH64_TRIPLE

    return shutil.which(AARCH64_CXX) is None and cross_linker(AARCH64_TRIPLE, AARCH64_CXX) is None


@pytest.mark.skipif(_no_aarch64_linker(), reason="needs g++-aarch64-linux-gnu or the ziglang wheel")
def test_tvm_cross_compiles_for_aarch64(bundle_factory):
    """An aarch64 profile without a GPU gets aarch64 libraries for its cores, refused clearly on this host."""
    bundle = bundle_factory("m3vit-micro", target="tvm", device="raspberry-pi-5", tasks=("depth",))
    m = read_manifest(bundle)
    assert m["target"]["tvm_target"] == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}
    assert m["device"]["name"] == "raspberry-pi-5"
    for g in m["graphs"].values():
        data = (bundle / g["file"]).read_bytes()
        assert data[:5] == b"\x7fELF\x02"  # 64-bit ELF
        assert int.from_bytes(data[18:20], "little") == ELF_MACHINE["aarch64"]
    if platform.machine() not in ("aarch64", "arm64"):
        with pytest.raises(BundleError, match="is aarch64 code and this machine is"):
            Session(bundle, "depth")


def test_tvm_session_runs_from_threads(bundle_factory):
    from concurrent.futures import ThreadPoolExecutor

    bundle = bundle_factory("m3vit-micro", target="tvm")
    session = Session(bundle, "semseg")
    xs = [sample_input(session.input_spec, batch=1, seed=s) for s in range(6)]
    want = [Session(bundle, "semseg").run(x) for x in xs]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(session.run, xs))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
