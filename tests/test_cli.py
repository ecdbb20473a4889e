import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_manifest

REPO = Path(__file__).resolve().parents[1]


def js(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_help_teaches_the_flow(run_cli):
    out = run_cli("--help").stdout
    for word in ("compile", "run", "inspect", "verify", "models", "devices", "Exit codes", "--json"):
        assert word in out
    assert "--no-prune" in run_cli("compile", "--help").stdout
    # The typical flow is a list, one command per line (click rewraps a paragraph without a real \b).
    lines = out.splitlines()
    assert any(line.strip().startswith("edgemoe compile m3vit-tiny") for line in lines)
    assert not any("\\b" in line for line in lines)


def test_unknown_names_suggest_the_closest(run_cli, tmp_path):
    result = run_cli("compile", "m3vit-tny", "-o", tmp_path / "o")
    assert result.exit_code == 3 and "did you mean 'm3vit-tiny'" in result.stderr
    result = run_cli("compile", "m3vit-micro", "--device", "jetson-orin-nano", "-o", tmp_path / "o")
    assert "did you mean 'jetson-orin-nano-8gb'" in result.stderr
    result = run_cli("inspect", "m3vit-micro", "--json")
    assert result.exit_code == 0
    result = run_cli("compile", "m3vit-micro", "--tasks", "semsegg", "-o", tmp_path / "o")
    assert result.exit_code == 8 and "did you mean 'semseg'" in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


def test_inspect_takes_a_model_config_file(run_cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"base": "m3vit-micro", "name": "my-micro", "depth": 4}))
    model = js(run_cli("inspect", config, "--json"))
    assert model["kind"] == "model" and model["name"] == "my-micro" and model["family"] == "m3vit"


def test_console_script_and_module_entry_points():
    exe = Path(sys.executable).parent / "edgemoe"
    for cmd in ([str(exe), "--version"], [sys.executable, "-m", "edgemoe", "--version"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        assert "edgemoe, version" in out.stdout


def test_compile_json_then_inspect_json(run_cli, tmp_path):
    out = tmp_path / "b"
    res = js(run_cli("compile", "m3vit-micro-windows", "-o", out, "--json"))
    assert res["kind"] == "bundle" and res["model"]["name"] == "m3vit-micro-windows"
    again = js(run_cli("inspect", out, "--json"))
    assert again["tasks"]["semseg"]["experts"] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert again["tasks"]["depth"]["experts"] == [[4, 5, 6, 7], [4, 5, 6, 7]]
    assert again["bundle_bytes"] > again["totals"]["expert_bytes_bundle"] > 0
    kinds = {g["kind"] for g in again["graphs"]}
    assert kinds == {"segment", "gate", "head", "expert_kernel"}


def test_inspect_model_json(run_cli):
    res = js(run_cli("inspect", "m3vit-tiny", "--json"))
    assert res["kind"] == "model" and res["experts"] == 96 and len(res["moe_layers"]) == 6
    assert res["moe_layers"][0]["expert"]["bytes_fp32"] == (192 * 384 * 2 + 384 + 192) * 4


def test_run_json_contract(run_cli, bundle_factory, tmp_path):
    bundle = bundle_factory("m3vit-micro")
    out = tmp_path / "y.npy"
    res = js(run_cli("run", bundle, "--task", "depth", "--output", out, "--repeat", "3", "--json"))
    for key, typ in (
        ("task", str),
        ("latency_ms", float),
        ("experts_loaded", int),
        ("experts_total", int),
        ("expert_bytes_loaded", int),
        ("expert_bytes_total", int),
    ):
        assert isinstance(res[key], typ), key
    assert res["task"] == "depth" and res["runs"] == 3
    assert np.load(out).shape == (1, 1, 32, 64)


def test_run_is_deterministic_without_input(run_cli, bundle_factory, tmp_path):
    bundle = bundle_factory("m3vit-micro")
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    js(run_cli("run", bundle, "--task", "semseg", "--output", a, "--json"))
    js(run_cli("run", bundle, "--task", "semseg", "--output", b, "--json"))
    np.testing.assert_array_equal(np.load(a), np.load(b))


def test_run_with_npy_and_image_inputs(run_cli, bundle_factory, tmp_path):
    from PIL import Image

    from edgemoe.frontends.m3vit import M3ViTAdapter
    from edgemoe.models import resolve_model
    from edgemoe.runtime import load_input

    bundle = bundle_factory("m3vit-micro")
    spec = read_manifest(bundle)["input"]
    img_path = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(img_path)
    x = load_input(img_path, spec)
    assert x.shape == (1, 3, 32, 64) and x.dtype == np.float32
    out = tmp_path / "y.npy"
    js(run_cli("run", bundle, "--task", "semseg", "--input", img_path, "--output", out, "--json"))
    adapter = M3ViTAdapter(resolve_model("m3vit-micro").build())
    keep = {i: tuple(s) for i, s in enumerate(read_manifest(bundle)["tasks"]["semseg"]["experts"])}
    np.testing.assert_allclose(np.load(out), adapter.reference(x, "semseg", keep), atol=1e-4, rtol=0)

    npy = tmp_path / "x.npy"
    np.save(npy, x[0])  # without the batch axis
    res = js(run_cli("run", bundle, "--task", "semseg", "--input", npy, "--json"))
    assert res["output_shape"] == [1, 7, 32, 64]


def test_verify_json_contract(run_cli, bundle_factory):
    res = js(run_cli("verify", bundle_factory("m3vit-micro"), "--json"))
    assert res["passed"] is True and res["tolerance"] == pytest.approx(1e-4)
    for task in ("semseg", "depth"):
        t = res["tasks"][task]
        assert isinstance(t["max_abs_error"], float) and t["max_abs_error"] <= 1e-4
        assert "max_abs_error_unpruned" in t and "latency_ms" in t


def test_verify_fails_with_tiny_tolerance(run_cli, bundle_factory):
    result = run_cli("verify", bundle_factory("m3vit-micro"), "--tolerance", "1e-12", "-q")
    assert result.exit_code == 10
    assert "exceed the tolerance" in result.stderr


@pytest.mark.slow  # builds every registered model to count its parameters
def test_models_and_devices_json(run_cli):
    models = js(run_cli("models", "--json"))["models"]
    tiny = next(m for m in models if m["name"] == "m3vit-tiny")
    assert tiny["family"] == "m3vit" and tiny["experts"] == 96 and tiny["params"] > 10_000_000
    assert tiny["expert_bytes"] == (192 * 384 * 2 + 384 + 192) * 4
    devices = {d["name"]: d for d in js(run_cli("devices", "--json"))["devices"]}
    assert {
        "host",
        "jetson-orin-nano-8gb",
        "jetson-agx-orin-64gb",
        "jetson-xavier-nx",
        "raspberry-pi-5",
        "zcu104",
        "zcu102",
    } <= set(devices)
    assert devices["jetson-orin-nano-8gb"]["cuda_arch"] == "sm_87"
    assert all(d["source"] for d in devices.values())


def test_compile_for_a_jetson_records_the_device(run_cli, tmp_path):
    js(run_cli("compile", "m3vit-micro", "--device", "jetson-orin-nano-8gb", "-o", tmp_path / "b", "--json"))
    assert read_manifest(tmp_path / "b")["device"]["name"] == "jetson-orin-nano-8gb"


def test_progress_goes_to_stderr(run_cli, tmp_path):
    result = run_cli("compile", "m3vit-micro", "-o", tmp_path / "b")
    assert result.exit_code == 0
    assert "emit onnx graph" in result.stderr and "emit onnx graph" not in result.stdout
