"""onnxruntime execution providers: device profile lists, explicit overrides, the TensorRT engine cache.

Without a GPU here, the provider logic is tested against this machine's real onnxruntime (CPU) and,
where a GPU provider has to be present, through a recording stand-in for ``InferenceSession``
that creates the real session on CPU. The ``gpu`` test runs a bundle with the CUDA provider.
"""

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
from helpers import read_manifest, write_manifest

from edgemoe.bundle import sample_input
from edgemoe.devices import device_profiles, get_device, load_profiles
from edgemoe.errors import BundleError, ConfigError, EdgeMoEWarning
from edgemoe.runtime import Session
from edgemoe.runtime.executor import get_executor
from edgemoe.targets.onnx import executor as ortx

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
JETSON = (TRT, CUDA, CPU)
SCHEMA = Path(__file__).resolve().parents[1] / "edgemoe" / "bundle" / "manifest.schema.json"
SHA = "ab" * 32


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    # Where a GPU machine's TensorRT would build engines: never the user's cache.
    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def jetson_bundle(bundle_factory):
    return bundle_factory("m3vit-micro", device="jetson-orin-nano-8gb")


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")}


# -- resolution ------------------------------------------------------------------------------------


def test_resolution_keeps_available_in_order_once_with_cpu_last():
    available = [CPU, CUDA, TRT, "AzureExecutionProvider"]
    assert ortx.resolve_providers(JETSON, available) == [TRT, CUDA, CPU]
    assert ortx.resolve_providers([CPU, CUDA, CUDA], available) == [CUDA, CPU]
    assert ortx.resolve_providers([CUDA, TRT], [CPU, CUDA]) == [CUDA, CPU]
    assert ortx.resolve_providers([], available) == [CPU]


def test_resolution_on_this_onnxruntime():
    available = ort.get_available_providers()
    got = ortx.resolve_providers(JETSON, available)
    assert got[-1] == CPU and set(got) <= set(available)
    assert got == [p for p in JETSON if p in available]
    if CUDA not in available:  # the CPU wheel this project pins
        assert got == [CPU]


def test_provider_names_accept_any_case_and_short_forms():
    known = ort.get_all_providers()
    assert ortx.provider_name("cuda", known) == CUDA
    assert ortx.provider_name(" TensorRT ", known) == TRT
    assert ortx.provider_name("cpuexecutionprovider", known) == CPU
    assert ortx.provider_name("cudaa", known) is None


def test_explicit_providers_unknown_or_missing():
    with pytest.raises(ConfigError, match="unknown onnxruntime execution provider 'cudaa'"):
        get_executor("onnxruntime", providers=("cudaa",))
    # CoreML exists only in macOS builds: onnxruntime knows the name, this one lacks the provider.
    with pytest.warns(EdgeMoEWarning, match="has no CoreMLExecutionProvider"):
        ex = get_executor("onnxruntime", providers=("coreml", "cpu"))
    assert ex.requested == ("CoreMLExecutionProvider", CPU) and ex.providers == [CPU]


# -- device profiles -------------------------------------------------------------------------------


def test_builtin_profiles_name_their_providers():
    profiles = device_profiles()
    for name in ("jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "jetson-xavier-nx"):
        assert profiles[name].onnx_providers == JETSON
        assert "onnx_providers" in profiles[name].tier_sources
    for name in ("host", "raspberry-pi-5", "zcu104", "zcu102"):
        assert profiles[name].onnx_providers == ()  # CPU
    assert json.loads(json.dumps(profiles["jetson-xavier-nx"].to_json()))["onnx_providers"] == list(JETSON)


def test_user_profile_providers(tmp_path):
    toml = tmp_path / "board.toml"
    toml.write_text(
        '[board]\nmemory_bytes = 1024\nonnx_providers = ["CUDAExecutionProvider", " CPUExecutionProvider"]\n'
    )
    assert get_device(str(toml)).onnx_providers == (CUDA, CPU)
    js = tmp_path / "boards.json"
    js.write_text(json.dumps({"a": {"memory_bytes": 1}, "b": {"memory_bytes": 1, "onnx_providers": []}}))
    assert {n: p.onnx_providers for n, p in load_profiles(js).items()} == {"a": (), "b": ()}


@pytest.mark.parametrize(
    "value", ['"CUDAExecutionProvider"', "[1, 2]", '["CUDAExecutionProvider", ""]', "{ cuda = 1 }", "true"]
)
def test_user_profile_providers_must_be_a_list_of_names(tmp_path, value):
    path = tmp_path / "board.toml"
    path.write_text(f"[board]\nmemory_bytes = 1024\nonnx_providers = {value}\n")
    with pytest.raises(ConfigError, match=r"board\.toml: device 'board' field onnx_providers must be a list"):
        load_profiles(path)


# -- a Jetson bundle -------------------------------------------------------------------------------


def test_jetson_manifest_records_providers_and_follows_the_schema(jetson_bundle):
    m = read_manifest(jetson_bundle)
    assert m["device"]["onnx_providers"] == list(JETSON)
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(m, schema)
    m["device"]["onnx_providers"] = "TensorrtExecutionProvider"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(m, schema)


def test_jetson_bundle_runs_here_and_reports_providers(jetson_bundle):
    session = Session(jetson_bundle, "depth")
    ex = session.executor
    assert ex.requested == JETSON
    assert ex.providers == ortx.resolve_providers(JETSON, ort.get_available_providers())
    assert set(ex.providers_used) <= set(ex.providers) and ex.providers_used[-1] == CPU
    if ex.providers == [CPU]:
        assert ex.providers_used == (CPU,)
    x = sample_input(session.input_spec, batch=1, seed=0)
    y = session.run(x)
    # Asking for CPU replaces the profile's list; on this CPU-only onnxruntime the numbers are the same.
    cpu = Session(jetson_bundle, "depth", providers=("cpu",))
    assert cpu.executor.requested == (CPU,) and cpu.executor.providers_used == (CPU,)
    if session.executor.providers == [CPU]:
        np.testing.assert_array_equal(cpu.run(x), y)


def test_graph_loaded_alone_reads_the_profile_next_to_it(jetson_bundle, tmp_path):
    m = read_manifest(jetson_bundle)
    record = next(iter(m["graphs"].values()))
    ex = get_executor("onnxruntime")
    ex.load(jetson_bundle, record)
    assert ex.requested == JETSON and ex.providers_used
    # A folder without a manifest (a compile's probe graph) runs on CPU.
    (tmp_path / Path(record["file"]).parent).mkdir(parents=True)
    shutil.copy(jetson_bundle / record["file"], tmp_path / record["file"])
    alone = get_executor("onnxruntime")
    alone.load(tmp_path, record)
    assert alone.requested == () and alone.providers == [CPU]


def test_garbled_manifest_providers(jetson_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(jetson_bundle, bundle)
    m = read_manifest(bundle)
    m["device"]["onnx_providers"] = "TensorrtExecutionProvider"
    write_manifest(bundle, m)
    with pytest.raises(BundleError, match=r"device\.onnx_providers must be a list"):
        Session(bundle, "depth")


def test_run_providers_option(run_cli, jetson_bundle):
    out = run_cli("run", jetson_bundle, "--task", "depth", "--providers", "cpu", "--json")
    assert out.exit_code == 0, out.stderr
    assert json.loads(out.stdout)["output_shape"]
    bad = run_cli("run", jetson_bundle, "--task", "depth", "--providers", "cuda,cudaa")
    assert bad.exit_code == ConfigError.exit_code and "unknown onnxruntime execution provider 'cudaa'" in bad.stderr


# -- TensorRT engine cache -------------------------------------------------------------------------


def test_tensorrt_options_cache_in_user_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path / "cache"))
    opts = ortx.tensorrt_options(SHA, "NVIDIA-H100-80GB-HBM3", "1.32.0", bundle=tmp_path / "bundle")
    engines = tmp_path / "cache" / "tensorrt" / SHA / "NVIDIA-H100-80GB-HBM3" / "onnxruntime-1.32.0"
    assert opts == {
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(engines),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(
            tmp_path / "cache" / "tensorrt" / "timing" / "NVIDIA-H100-80GB-HBM3" / "onnxruntime-1.32.0"
        ),
    }
    monkeypatch.delenv("EDGEMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ortx.tensorrt_options(SHA, "cuda0", "1")["trt_engine_cache_path"].startswith(
        str(tmp_path / "xdg" / "edgemoe")
    )


def test_tensorrt_options_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEMOE_CACHE", str(tmp_path / "bundle" / "cache"))
    with pytest.raises(ConfigError, match="inside the bundle"):
        ortx.tensorrt_options(SHA, "cuda0", "1.32.0", bundle=tmp_path / "bundle")
    with pytest.raises(BundleError, match="garbled manifest"):
        ortx.tensorrt_options("../../etc", "cuda0", "1.32.0")


@pytest.mark.parametrize(
    ("smi", "visible", "key"),
    [
        ("NVIDIA H100 80GB HBM3, GPU-1111\n", None, "NVIDIA-H100-80GB-HBM3"),
        ("Orin (nvgpu), [N/A]\n", None, "Orin-nvgpu"),
        ("NVIDIA A10, GPU-1111\nNVIDIA A10, GPU-2222\n", None, "NVIDIA-A10"),
        # Mixed models: CUDA orders them fastest first, nvidia-smi by PCI bus, so no telling which is 0.
        ("NVIDIA A10, GPU-1111\nNVIDIA T4, GPU-2222\n", None, "cuda0"),
        ("NVIDIA A10, GPU-1111\nNVIDIA T4, GPU-2222\n", "1,0", "NVIDIA-T4"),
        ("NVIDIA A10, GPU-1111-aa\nNVIDIA T4, GPU-2222-bb\n", "GPU-2222", "NVIDIA-T4"),
        ("NVIDIA A100, GPU-1111\n", "MIG-3333", "cuda0"),
        ("[N/A], [N/A]\n", None, "cuda0"),
        (None, None, "cuda0"),
    ],
)
def test_gpu_key(smi, visible, key):
    assert ortx.gpu_key(smi, visible) == key


def test_tensorrt_session_gets_the_cache_and_a_failing_provider_is_dropped(jetson_bundle, tmp_path, monkeypatch):
    """As on a Jetson whose onnxruntime-gpu has TensorRT but TensorRT's libraries fail to load."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEMOE_CACHE", str(cache))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(ortx, "_nvidia_smi", lambda: "Orin (nvgpu), GPU-1234\n")
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TRT, CUDA, CPU])
    real = ort.InferenceSession
    calls = []

    def session(data, opts, providers, enable_fallback):
        calls.append(providers)
        assert enable_fallback == 0
        if isinstance(providers[0], tuple) and providers[0][0] == TRT:
            raise RuntimeError("TensorRT EP could not create: libnvinfer.so.10: cannot open shared object file\nmore")
        return real(data, opts, providers=[CPU])

    monkeypatch.setattr(ort, "InferenceSession", session)
    before = _files(jetson_bundle)
    m = read_manifest(jetson_bundle)
    first, second = list(m["graphs"].values())[:2]
    ex = get_executor("onnxruntime")
    with pytest.warns(
        EdgeMoEWarning, match=f"cannot load {first['file']} with {TRT} .*libnvinfer.*going on with {CUDA}"
    ):
        ex.load(jetson_bundle, first)
    assert calls[0][0][0] == TRT
    opts = calls[0][0][1]
    engines = cache / "tensorrt" / first["sha256"] / "Orin-nvgpu" / f"onnxruntime-{ort.__version__}"
    assert opts["trt_engine_cache_enable"] == "1" and opts["trt_engine_cache_path"] == str(engines)
    assert engines.is_dir() and Path(opts["trt_timing_cache_path"]).is_dir()
    assert calls[0][1:] == [CUDA, CPU] and calls[1] == [CUDA, CPU]
    ex.load(jetson_bundle, second)  # TensorRT is not tried again
    assert calls[2] == [CUDA, CPU]
    assert ex.requested == JETSON and ex.providers == [CUDA, CPU] and ex.providers_used == (CPU,)
    assert _files(jetson_bundle) == before  # nothing written into the bundle


def test_no_provider_left_is_a_bundle_error(jetson_bundle, monkeypatch):
    def session(data, opts, providers, enable_fallback):
        raise RuntimeError("")

    monkeypatch.setattr(ort, "InferenceSession", session)
    record = next(iter(read_manifest(jetson_bundle)["graphs"].values()))
    with pytest.raises(BundleError, match=f"onnxruntime cannot load {record['file']}: RuntimeError"):
        get_executor("onnxruntime", providers=("cpu",)).load(jetson_bundle, record)


# -- a real GPU ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(CUDA not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_provider_matches_cpu(jetson_bundle):
    gpu = Session(jetson_bundle, "depth", providers=("cuda",))
    assert gpu.executor.providers_used[0] == CUDA
    cpu = Session(jetson_bundle, "depth", providers=("cpu",))
    for seed in range(3):
        x = sample_input(cpu.input_spec, batch=2, seed=seed)
        np.testing.assert_allclose(gpu.run(x), cpu.run(x), atol=1e-4, rtol=0)
