"""Untrusted files (issue 17, first cases): each is refused with its class's exit code and one line."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from helpers import read_manifest

from edgemoe.errors import BundleError, IntegrityError, ModelError
from edgemoe.models import resolve_model


def _one_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _edit_manifest(bundle, change) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_a_manifest_listing_an_expert_twice_is_refused(run_cli, micro_bundle):
    def twice(m):
        experts = m["moe_layers"][0]["experts"]
        experts[1]["index"] = experts[0]["index"]

    _edit_manifest(micro_bundle, twice)
    result = run_cli("run", micro_bundle, "--task", "semseg")
    assert result.exit_code == BundleError.exit_code
    assert "layer 0 lists expert" in _one_line(result) and "twice" in result.stderr


def test_an_expert_index_outside_the_layer_is_refused(run_cli, micro_bundle):
    _edit_manifest(micro_bundle, lambda m: m["moe_layers"][1]["experts"][0].update(index=99))
    result = run_cli("run", micro_bundle, "--task", "semseg")
    assert result.exit_code == BundleError.exit_code
    assert "layer 1 lists expert 99" in _one_line(result)


def test_a_size_claim_beyond_the_file_is_refused_before_allocating(run_cli, micro_bundle):
    """A record claiming 4 GB fails on the file's size at session start, not after allocating 4 GB."""
    _edit_manifest(micro_bundle, lambda m: m["moe_layers"][0]["experts"][0].update(bytes=4 << 30))
    result = run_cli("run", micro_bundle, "--task", "semseg")
    assert result.exit_code == IntegrityError.exit_code
    assert "manifest says 4294967296" in _one_line(result)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_killed_compiles_leftovers_go_with_the_next_compile(run_cli, tmp_path):
    out = tmp_path / "b"
    assert run_cli("compile", "m3vit-micro", "-o", out, "-q").exit_code == 0
    stale = tmp_path / f".b.staging-{_dead_pid()}-0badc0de"
    backup = tmp_path / ".b.old-12345678"
    for folder in (stale, backup):
        (folder / "graphs").mkdir(parents=True)
        (folder / "graphs" / "x.onnx").write_bytes(b"half-written")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = tmp_path / f".b.staging-{sleeper.pid}-0fedcba9"  # a compile still running elsewhere
        live.mkdir()
        other = tmp_path / ".c.staging-1-00000000"  # another output's
        other.mkdir()
        assert run_cli("compile", "m3vit-micro", "-o", out, "-q").exit_code == 0
        assert not stale.exists() and not backup.exists()
        assert live.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_non_finite_weights_are_refused_by_name(run_cli, tmp_path):
    from safetensors.torch import save_file

    model = resolve_model("m3vit-micro").build()
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    name = next(k for k in state if "experts" in k and k.endswith("weight"))
    state[name].view(-1)[3] = float("nan")
    ckpt = tmp_path / "nan.safetensors"
    save_file(state, str(ckpt))
    out = tmp_path / "out"
    result = run_cli("compile", "m3vit-micro", "--weights", ckpt, "-o", out, "-q")
    assert result.exit_code == ModelError.exit_code
    line = _one_line(result)
    assert name in line and "(NaN)" in line and "--allow-nonfinite" in line
    assert not out.exists()
    result = run_cli("compile", "m3vit-micro", "--weights", ckpt, "--allow-nonfinite", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert f"non-finite weights compiled as asked: {name}" in result.stderr
    assert read_manifest(out)["model"]["name"] == "m3vit-micro"
    assert os.listdir(tmp_path)  # the compile left its bundle and nothing hidden beside it
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out.")]


@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_infinite_weights_are_named_too(tmp_path, value):
    import torch

    from edgemoe.config import CompileConfig
    from edgemoe.passes.capture_model import capture_model
    from edgemoe.passes.check_finite_weights import check_finite_weights

    captured = capture_model(CompileConfig(model="m3vit-micro"))
    param = next(iter(captured.adapter.model.parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float(value)
    with pytest.raises(ModelError, match=r"\(Inf\)"):
        check_finite_weights(captured)
    assert len(check_finite_weights(captured, allow=True)) == 1


GARBLED = {
    "no-gates": (lambda m: m["tasks"]["semseg"].pop("gates"), "tasks.semseg.gates must be one name per MoE layer"),
    "no-kernel": (lambda m: m["moe_layers"][0].pop("kernel"), r"moe_layers\[0\].kernel must be a name"),
    "tensors-not-a-list": (
        lambda m: m["moe_layers"][0]["experts"][0].update(tensors=5),
        r"moe_layers\[0\].experts\[0\].tensors must be a list",
    ),
    "negative-offset": (
        lambda m: m["moe_layers"][1]["experts"][0]["tensors"][0].update(offset=-8),
        "non-negative offset",
    ),
    "no-input-shape": (lambda m: m["input"].pop("shape"), "input.shape must be a list"),
    "overlapping-tensors": (
        lambda m: m["moe_layers"][0]["experts"][0]["tensors"][1].update(
            offset=m["moe_layers"][0]["experts"][0]["tensors"][0]["offset"]
        ),
        r"tensors \w+ and \w+ of expert \d+ of layer 0 overlap",
    ),
    "tensor-named-twice": (
        lambda m: m["moe_layers"][0]["experts"][0]["tensors"][1].update(
            name=m["moe_layers"][0]["experts"][0]["tensors"][0]["name"]
        ),
        "lists tensor w1 twice",
    ),
    "tensor-past-the-blob": (
        lambda m: m["moe_layers"][0]["experts"][0]["tensors"][-1].update(offset=1 << 20),
        "runs past its",
    ),
    "kept-sets-short": (
        lambda m: m["tasks"]["semseg"].update(experts=[[0]]),
        "tasks.semseg.experts must be one list of expert ids per MoE layer",
    ),
}


@pytest.mark.parametrize("case", GARBLED)
def test_garbled_nested_manifest_fields_are_bundle_errors(run_cli, micro_bundle, case):
    """Each was an internal error (KeyError, TypeError, ValueError: exit 1) before the structure check."""
    change, message = GARBLED[case]
    _edit_manifest(micro_bundle, change)
    for command in (("run", micro_bundle, "--task", "semseg"), ("inspect", micro_bundle, "--check")):
        result = run_cli(*command)
        assert result.exit_code == BundleError.exit_code, (command, result.output)
        assert re.search(message, _one_line(result))


@pytest.mark.parametrize("damage", ["random-bytes", "truncated"])
def test_a_broken_safetensors_checkpoint_is_a_model_error(run_cli, tmp_path, damage):
    from safetensors.torch import save_file

    ckpt = tmp_path / "w.safetensors"
    if damage == "random-bytes":
        ckpt.write_bytes(np.random.default_rng(0).bytes(5000))
    else:
        model = resolve_model("m3vit-micro").build()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
        data = ckpt.read_bytes()
        ckpt.write_bytes(data[: len(data) // 2])
    result = run_cli("compile", "m3vit-micro", "--weights", ckpt, "-o", tmp_path / "out", "-q")
    assert result.exit_code == ModelError.exit_code
    assert "not a whole safetensors file" in _one_line(result)
    assert not (tmp_path / "out").exists()


def test_a_blob_rewritten_in_place_is_caught_on_reload(bundle_factory, tmp_path):
    """Same size, mtime put back: the reload after an eviction still checks (the ctime moved)."""
    import shutil

    from edgemoe.bundle.format import sample_input
    from edgemoe.runtime import Session

    bundle = tmp_path / "b"
    shutil.copytree(bundle_factory("m3vit-micro"), bundle)
    session = Session(bundle, "semseg", memory_budget="25%", policy="lru")
    x = sample_input(session.input_spec, batch=1, seed=0)
    session.run(x)
    assert session.stats.evictions > 0
    for blob in (bundle / "experts").iterdir():
        st = blob.stat()
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0xFF
        with open(blob, "r+b") as f:  # in place: same inode, same size
            f.write(data)
        os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(IntegrityError, match="fails its sha256 check"):
        for _ in range(3):
            session.run(x)


def test_output_storage_errors_name_the_output(run_cli, tmp_path):
    result = run_cli("compile", "m3vit-micro", "-o", "/proc/edgemoe-bundle", "-q")
    from edgemoe.errors import OutputPathError

    assert result.exit_code == OutputPathError.exit_code
    assert "cannot write a bundle at /proc/edgemoe-bundle" in _one_line(result)


def test_a_full_disk_is_an_output_error_with_nothing_left(run_cli, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode:
        pytest.skip("mounting a small tmpfs needs privileges this machine does not give")
    try:
        from edgemoe.errors import OutputPathError

        result = run_cli("compile", "m3vit-micro", "-o", small / "b", "-q")
        assert result.exit_code == OutputPathError.exit_code
        assert "No space left on device" in _one_line(result)
        assert os.listdir(small) == []  # the staging folder went too
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_plan_plots_without_matplotlib_fail_before_the_manifest_changes(run_cli, micro_bundle, monkeypatch, tmp_path):
    from edgemoe.errors import DependencyError

    before = (micro_bundle / "manifest.json").read_bytes()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without it raises on import
    result = run_cli("plan", micro_bundle, "--budget", "50%", "--plots", tmp_path / "plots")
    assert result.exit_code == DependencyError.exit_code
    assert "--plots needs matplotlib" in _one_line(result)
    assert (micro_bundle / "manifest.json").read_bytes() == before


def test_a_bundle_whose_executor_is_not_installed_is_a_dependency_error(run_cli, bundle_factory, monkeypatch):
    from edgemoe.errors import DependencyError

    bundle = bundle_factory("m3vit-micro")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = run_cli("run", bundle, "--task", "semseg")
    assert result.exit_code == DependencyError.exit_code
    assert "executor 'onnxruntime' needs the package 'onnxruntime'" in _one_line(result)


@pytest.mark.parametrize(
    "config",
    [
        {"base": "mixtral-lm-micro", "num_experts": 2_000_000},
        {"base": "m3vit-micro", "dim": 65536, "expert_hidden": 65536},
        {
            "family": "hf",
            "arch": "mixtral",
            "vocab_size": 320,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
        },
    ],
    ids=["moe_lm-experts", "m3vit-width", "hf-mixtral-8x7b"],
)
def test_a_config_beyond_the_hosts_memory_is_refused_before_building(run_cli, tmp_path, config):
    import time

    path = tmp_path / "big.json"
    path.write_text(json.dumps(config))
    start = time.perf_counter()
    result = run_cli("compile", path, "-o", tmp_path / "out", "-q")
    assert time.perf_counter() - start < 30  # counted, not built (this ran for minutes before)
    assert result.exit_code == ModelError.exit_code
    assert "more than this machine's available memory" in _one_line(result)
    assert not (tmp_path / "out").exists()


def _npy_claiming(path, shape):
    from numpy.lib import format as npy

    with open(path, "wb") as f:
        npy.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(b"\0" * 64)
    return path


def test_input_headers_are_checked_against_their_files(run_cli, bundle_factory, tmp_path):
    """.npy headers and image sizes are claims: checked before numpy or Pillow allocate for them."""
    from PIL import Image

    from edgemoe.errors import InputError

    bundle = bundle_factory("m3vit-micro")
    bomb = _npy_claiming(tmp_path / "bomb.npy", (100_000, 100_000))
    objects = tmp_path / "objects.npy"
    np.save(objects, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    big = tmp_path / "big.png"
    Image.new("L", (9000, 9000)).save(big)  # 81 Mpx, a small file
    for path, message in (
        (bomb, "header declares a float32 array of shape [100000, 100000] (40000000000 bytes)"),
        (objects, "holds Python objects"),
        (big, "9000x9000 pixels"),
    ):
        result = run_cli("run", bundle, "--task", "semseg", "--input", path)
        assert result.exit_code == InputError.exit_code, result.output
        assert message in _one_line(result)
