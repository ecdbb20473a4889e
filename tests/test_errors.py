"""Bad inputs: one clear line, the documented exit code, and nothing half-written."""

import json
import shutil

import numpy as np
import pytest
from helpers import read_manifest, write_manifest

from edgemoe.errors import (
    BundleError,
    ConfigError,
    InputError,
    IntegrityError,
    ModelError,
    OutputPathError,
    TargetError,
    TaskError,
)


def one_line_error(result, code):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines, "no error message"
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert "Traceback" not in result.stderr
    return errors[0]


def no_leftovers(parent, name):
    """Entries that a compile to ``parent/name`` left behind (the bundle or a staging folder)."""
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_unknown_model(run_cli, tmp_path):
    msg = one_line_error(run_cli("compile", "m3vit-huge", "-o", tmp_path / "b"), ModelError.exit_code)
    assert "unknown model 'm3vit-huge'" in msg and "m3vit-tiny" in msg
    assert no_leftovers(tmp_path, "b") == []


def test_unknown_task_at_compile(run_cli, tmp_path):
    msg = one_line_error(
        run_cli("compile", "m3vit-micro", "--tasks", "normals", "-o", tmp_path / "b"), TaskError.exit_code
    )
    assert "unknown task 'normals'" in msg and "semseg" in msg
    assert no_leftovers(tmp_path, "b") == []


def test_unknown_task_at_run(run_cli, micro_bundle):
    msg = one_line_error(run_cli("run", micro_bundle, "--task", "normals"), TaskError.exit_code)
    assert "unknown task 'normals'" in msg


def test_topk_above_experts(run_cli, tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"base": "m3vit-micro", "top_k": 9}))
    msg = one_line_error(run_cli("compile", cfg, "-o", tmp_path / "b"), ConfigError.exit_code)
    assert "top-k 9" in msg and "8 experts" in msg
    assert no_leftovers(tmp_path, "b") == []


def test_unknown_model_config_field(run_cli, tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"base": "m3vit-micro", "n_experts": 9}))
    msg = one_line_error(run_cli("compile", cfg, "-o", tmp_path / "b"), ModelError.exit_code)
    assert "n_experts" in msg


def test_unknown_device_and_target(run_cli, tmp_path):
    one_line_error(
        run_cli("compile", "m3vit-micro", "--device", "toaster", "-o", tmp_path / "b"), TargetError.exit_code
    )
    one_line_error(run_cli("compile", "m3vit-micro", "--target", "vhdl", "-o", tmp_path / "b"), TargetError.exit_code)
    assert no_leftovers(tmp_path, "b") == []


def test_missing_manifest(run_cli, micro_bundle):
    (micro_bundle / "manifest.json").unlink()
    msg = one_line_error(run_cli("run", micro_bundle, "--task", "semseg"), BundleError.exit_code)
    assert "no manifest.json" in msg
    one_line_error(run_cli("inspect", micro_bundle), BundleError.exit_code)


@pytest.mark.parametrize("garble", ["truncate", "not-json", "wrong-schema", "missing-key"])
def test_garbled_manifest(run_cli, micro_bundle, garble):
    path = micro_bundle / "manifest.json"
    text = path.read_text()
    if garble == "truncate":
        path.write_text(text[: len(text) // 2])
    elif garble == "not-json":
        path.write_bytes(b"\x00\xff garbage")
    elif garble == "wrong-schema":
        m = json.loads(text)
        m["schema_version"] = 99
        path.write_text(json.dumps(m))
    else:
        m = json.loads(text)
        del m["moe_layers"]
        path.write_text(json.dumps(m))
    msg = one_line_error(run_cli("run", micro_bundle, "--task", "semseg"), BundleError.exit_code)
    assert "manifest" in msg or "schema version" in msg


def _first_expert_file(bundle):
    return bundle / read_manifest(bundle)["moe_layers"][0]["experts"][0]["file"]


def test_expert_with_wrong_sha256(run_cli, micro_bundle):
    path = _first_expert_file(micro_bundle)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(data))
    msg = one_line_error(run_cli("run", micro_bundle, "--task", "semseg"), IntegrityError.exit_code)
    assert "sha256" in msg and path.name in msg


def test_truncated_expert(run_cli, micro_bundle):
    path = _first_expert_file(micro_bundle)
    path.write_bytes(path.read_bytes()[:-10])
    msg = one_line_error(run_cli("run", micro_bundle, "--task", "semseg"), IntegrityError.exit_code)
    assert "truncated" in msg


def test_missing_expert_file(run_cli, micro_bundle):
    path = _first_expert_file(micro_bundle)
    path.unlink()
    msg = one_line_error(run_cli("run", micro_bundle, "--task", "semseg"), IntegrityError.exit_code)
    assert "missing bundle file" in msg


def test_corrupted_graph_is_caught_before_loading(run_cli, micro_bundle):
    path = micro_bundle / read_manifest(micro_bundle)["graphs"]["segment_0"]["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    one_line_error(run_cli("run", micro_bundle, "--task", "depth"), IntegrityError.exit_code)


def test_inspect_check_finds_damage(run_cli, micro_bundle):
    assert run_cli("inspect", micro_bundle, "--check").exit_code == 0
    path = _first_expert_file(micro_bundle)
    path.write_bytes(path.read_bytes()[:-1])
    one_line_error(run_cli("inspect", micro_bundle, "--check"), IntegrityError.exit_code)


def test_manifest_path_escape_is_refused(run_cli, micro_bundle):
    m = read_manifest(micro_bundle)
    m["graphs"]["segment_0"]["file"] = "../../etc/passwd"
    write_manifest(micro_bundle, m)
    msg = one_line_error(run_cli("run", micro_bundle, "--task", "semseg"), BundleError.exit_code)
    assert "outside the bundle" in msg


def test_output_path_that_is_not_a_bundle(run_cli, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    msg = one_line_error(run_cli("compile", "m3vit-micro", "-o", precious), OutputPathError.exit_code)
    assert "not an edgemoe bundle" in msg
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    one_line_error(run_cli("compile", "m3vit-micro", "-o", afile), OutputPathError.exit_code)
    assert afile.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "precious"]


def test_existing_bundle_is_replaced_atomically(run_cli, micro_bundle):
    before = read_manifest(micro_bundle)["created"]
    result = run_cli("compile", "m3vit-micro", "--tasks", "depth", "-o", micro_bundle, "-q")
    assert result.exit_code == 0, result.stderr
    assert list(read_manifest(micro_bundle)["tasks"]) == ["depth"]
    assert before  # replaced, not merged: the semseg graphs are gone
    assert not (micro_bundle / "graphs" / "head_semseg.onnx").exists()
    assert [p.name for p in micro_bundle.parent.iterdir()] == ["bundle"]


def test_failure_mid_compile_leaves_nothing(monkeypatch, tmp_path):
    """A target that fails on its third graph: no bundle, no staging folder."""
    from edgemoe.compiler import compile_model
    from edgemoe.config import CompileConfig
    from edgemoe.targets.onnx.target import TARGET

    calls = {"n": 0}
    real_emit = TARGET.emit

    def failing_emit(part, out_dir, cfg):
        calls["n"] += 1
        if calls["n"] == 3:
            raise TargetError("injected failure")
        return real_emit(part, out_dir, cfg)

    monkeypatch.setattr(TARGET, "emit", failing_emit)
    with pytest.raises(TargetError, match="injected"):
        compile_model(CompileConfig("m3vit-micro"), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_files(run_cli, micro_bundle, tmp_path):
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((1, 3, 10, 10), np.float32))
    msg = one_line_error(run_cli("run", micro_bundle, "--task", "semseg", "--input", wrong), InputError.exit_code)
    assert "expects" in msg
    txt = tmp_path / "x.txt"
    txt.write_text("hello")
    one_line_error(run_cli("run", micro_bundle, "--task", "semseg", "--input", txt), InputError.exit_code)
    one_line_error(
        run_cli("run", micro_bundle, "--task", "semseg", "--input", tmp_path / "nope.npy"), InputError.exit_code
    )
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((1, 3, 32, 64), np.nan, np.float32))
    one_line_error(run_cli("run", micro_bundle, "--task", "semseg", "--input", nan), InputError.exit_code)


def test_bundle_not_found(run_cli, tmp_path):
    msg = one_line_error(run_cli("run", tmp_path / "nothing", "--task", "semseg"), BundleError.exit_code)
    assert "not found" in msg


def test_verify_detects_other_weights(run_cli, micro_bundle):
    m = read_manifest(micro_bundle)
    m["model"]["source"]["state_sha256"] = "0" * 64
    write_manifest(micro_bundle, m)
    msg = one_line_error(run_cli("verify", micro_bundle, "-q"), ModelError.exit_code)
    assert "differ" in msg


def test_exit_codes_are_distinct():
    from edgemoe.errors import EXIT_CODES

    codes = list(EXIT_CODES.values())
    assert len(codes) == len(set(codes))
    assert not {0, 2, 130} & set(codes)


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from edgemoe.cli import cli

    monkeypatch.setenv("EDGEMOE_DEBUG", "1")
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "x")])
    assert isinstance(result.exception, BundleError)


def test_copy_fixture_is_private(micro_bundle, bundle_factory):
    assert micro_bundle != bundle_factory("m3vit-micro")
    shutil.rmtree(micro_bundle / "experts")
    assert (bundle_factory("m3vit-micro") / "experts").is_dir()
