import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest

from edgemoe.bundle import decode_expert, encode_expert, read_manifest, sha256_file

SCHEMA = Path(__file__).resolve().parents[1] / "edgemoe" / "bundle" / "manifest.schema.json"


@pytest.mark.parametrize("model", ["m3vit-micro", "m3vit-micro-cond", "m3vit-micro-windows"])
def test_manifest_follows_the_schema(bundle_factory, model):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(read_manifest(bundle_factory(model)), schema)


def test_manifest_with_a_schedule_follows_the_schema(bundle_factory):
    from edgemoe.schedule import plan_bundle

    schema = json.loads(SCHEMA.read_text())
    bundle = bundle_factory("m3vit-micro-windows")
    m = read_manifest(bundle)
    assert "schedule" not in m  # validated without one above
    m["schedule"] = plan_bundle(bundle, "jetson-orin-nano-8gb", "25%", heldout=2, write=False)["schedule"]
    jsonschema.validate(m, schema)
    garbles = {
        "key": lambda s: s["tasks"]["depth"]["resident"].append([1]),
        "policy": lambda s: s.update(policy="fifo"),
        "switch name": lambda s: s["task_switch"].update(semseg=s["task_switch"]["semseg->depth"]),
        "switch list": lambda s: s["task_switch"]["semseg->depth"].pop("drop_cached"),
        "cost": lambda s: s["task_switch"]["depth->semseg"]["cost"].update(load_bytes=-1),
        "predictor": lambda s: s["tasks"]["semseg"]["predictors"]["affinity"].pop("table"),
        "probability": lambda s: s["tasks"]["semseg"]["probability"][0].append(1.5),
        "missing": lambda s: s.pop("cache_bytes"),
    }
    for name, garble in garbles.items():
        bad = json.loads(json.dumps(m))
        garble(bad["schedule"])
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
            pytest.fail(f"garbled schedule ({name}) validates")


def test_every_file_is_listed_with_size_and_digest(bundle_factory):
    bundle = bundle_factory("m3vit-micro")
    m = read_manifest(bundle)
    listed = {g["file"]: g for g in m["graphs"].values()}
    listed.update({e["file"]: e for layer in m["moe_layers"] for e in layer["experts"]})
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk
    for rel, rec in listed.items():
        assert (bundle / rel).stat().st_size == rec["bytes"]
        assert sha256_file(bundle / rel) == rec["sha256"]


def test_graphs_pass_onnx_checker(bundle_factory):
    bundle = bundle_factory("m3vit-micro-cond")
    for g in read_manifest(bundle)["graphs"].values():
        onnx.checker.check_model(str(bundle / g["file"]), full_check=True)


def test_expert_blob_round_trip():
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((5, 7)).astype(np.float32),
        "b1": np.arange(7, dtype=np.float32),
        "w2": rng.standard_normal((7, 5)).astype(np.float32),
        "b2": np.zeros(5, np.float32),
    }
    blob, tensors = encode_expert(weights)
    assert all(t["offset"] % 64 == 0 for t in tensors)
    back = decode_expert(blob, tensors)
    for k, v in weights.items():
        np.testing.assert_array_equal(back[k], v)


def test_manifest_records_expert_sets_and_counts(bundle_factory):
    m = read_manifest(bundle_factory("m3vit-micro"))
    for task in m["tasks"].values():
        assert len(task["experts"]) == len(m["moe_layers"]) == len(task["expert_counts"])
        for kept, counts in zip(task["experts"], task["expert_counts"], strict=True):
            assert kept == [e for e, c in enumerate(counts) if c > 0]  # pruned to what calibration used
            assert sum(counts) == m["calibration"]["samples"] * 9 * 2  # samples x tokens x top-k
