"""The compiler as one list of stages: --dump-stages, stopping early, and cleanup on failure."""

import json

import pytest
from helpers import read_manifest

from edgemoe.compiler import STAGES, run_stages
from edgemoe.config import CompileConfig
from edgemoe.errors import ConfigError
from edgemoe.stages import CompileState

NAMES = [s.name for s in STAGES]


def _dumps(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def test_dump_stages_writes_every_stage_in_order(run_cli, tmp_path):
    out, dump = tmp_path / "b", tmp_path / "stages"
    r = run_cli(
        "compile", "m3vit-micro", "-o", out, "--quant", "int8", "--memory-budget", "60%", "-q", "--dump-stages", dump
    )
    assert r.exit_code == 0, r.output
    records = _dumps(dump)
    assert [r["stage"] for r in records] == NAMES
    assert [p.name for p in sorted(dump.glob("*.json"))] == [f"{i:02d}-{n}.json" for i, n in enumerate(NAMES)]
    assert all(r["ran"] and r["seconds"] >= 0 for r in records)
    by_name = {r["stage"]: r for r in records}
    manifest = read_manifest(out)
    # Where a number changed: the emitted fp32 experts, then the quantized ones the bundle ships.
    final = {str(layer["index"]): [e["sha256"] for e in layer["experts"]] for layer in manifest["moe_layers"]}
    quantized = {li: [e["sha256"] for e in experts] for li, experts in by_name["quantize"]["experts"].items()}
    assert quantized == final and by_name["emit"]["experts"] != final
    assert by_name["quantize"]["quantization"]["scheme"] == "int8"
    timing = ("stage", "ran", "seconds")
    assert {k: v for k, v in by_name["measure-accuracy"].items() if k not in timing} == manifest["accuracy"]
    assert by_name["plan"]["budget_bytes"] == manifest["schedule"]["budget_bytes"]
    assert by_name["calibrate"]["fp32_bytes"] == manifest["accuracy"]["bundle_bytes_fp32"]
    assert by_name["prune"]["kept"] == {t: spec["experts"] for t, spec in manifest["tasks"].items()}


def test_stages_that_do_not_apply_are_recorded_as_skipped(run_cli, tmp_path):
    dump = tmp_path / "stages"
    r = run_cli("compile", "m3vit-micro", "-o", tmp_path / "b", "-q", "--dump-stages", dump)
    assert r.exit_code == 0, r.output
    ran = {r["stage"]: r["ran"] for r in _dumps(dump)}
    assert [s for s, did in ran.items() if not did] == ["calibrate", "quantize", "measure-accuracy", "plan"]
    assert set(json.loads((dump / "08-calibrate.json").read_text())) == {"stage", "ran"}


def test_a_failing_stage_is_dumped_and_leaves_nothing(run_cli, tmp_path):
    out, dump = tmp_path / "b", tmp_path / "stages"
    r = run_cli("compile", "m3vit-micro", "-o", out, "-q", "--memory-budget", "100", "--dump-stages", dump)
    assert r.exit_code != 0
    records = _dumps(dump)
    assert records[-1]["stage"] == "plan" and "ConfigError" in records[-1]["error"]
    assert [r["stage"] for r in records] == NAMES[: NAMES.index("plan") + 1]
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["stages"]  # no staging folder either


def test_run_stages_stops_after_a_named_stage_and_writes_nothing(tmp_path):
    cfg = CompileConfig("m3vit-micro", prune=False, calib_samples=1)
    state = run_stages(cfg, CompileState(None), until="partition")
    assert state.plan is not None and state.staging is None and state.manifest is None
    kinds = {p.kind for p in state.plan.graphs()}
    assert {"segment", "gate", "head", "expert_kernel"} <= kinds
    with pytest.raises(ConfigError, match="no compile stage named 'emitt'"):
        run_stages(cfg, CompileState(None), until="emitt")
