"""Bundles stay byte-identical across refactors of the compiler: one golden manifest hash per model.

The manifest records the size and sha256 of every graph and blob, so its hash covers every byte
of the bundle. Two fields are not bundle content and are normalised: ``created`` (a timestamp)
and the checkpoint path (where the clone sits). The accuracy report holds metrics onnxruntime
measures on the compiling CPU; they are rounded to 4 significant digits so a CPU with other SIMD
kernels gives the same hash. The hashes were made by commit 73781b3, before the compiler became
a flat list of stages (issue 18); a change that alters a bundle on purpose updates them, and says
so in its commit.
"""

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.quantization import QuantConfig

CASES = {
    "m3vit-micro": dict(model="m3vit-micro", device="raspberry-pi-5"),
    "m3vit-micro-int4-budget": dict(
        model="m3vit-micro", device="raspberry-pi-5", quant=QuantConfig("int4"), calib_samples=2, memory_budget="50%"
    ),
    "hf-mixtral-micro-generate": dict(model="hf-mixtral-micro", device="raspberry-pi-5", max_seq=16),
    "deepseek-lm-micro": dict(model="deepseek-lm-micro", device="jetson-orin-nano-8gb"),
    "bert-moe-micro": dict(model="bert-moe-micro", device="raspberry-pi-5"),
}

GOLDEN = {
    "bert-moe-micro": "bbae912178cc1b562c17c5eedaf8dd8f02cc4a666ac743aa911f2260b7322a61",
    "deepseek-lm-micro": "49427c6743eee75f21b532840ef2f155080fdcece9c464a78ee9d705e2d4862c",
    "hf-mixtral-micro-generate": "4e8e30426f9c5ae184a414e8e42759f750400a6ebe73d471efeef9e70d0717fe",
    "m3vit-micro": "9c1d9543a40308158fe177e905ed5555999f5bd25c8bf1c595b8dd1289d1fbce",
    "m3vit-micro-int4-budget": "2b333f4e6f3f66247b0990143def3773ada548e67593b01bf73c99e9fb84c04b",
}


def _round(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest less its timestamp, with the checkpoint path reduced to its name."""
    m = json.loads(json.dumps(manifest))
    m.pop("created")
    source = m["model"]["source"]
    if source.get("weights"):
        source["weights"] = Path(source["weights"]).name
    if "accuracy" in m:
        m["accuracy"] = _round(m["accuracy"])
    return hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_bundle_matches_golden_hash(case, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = compile_model(CompileConfig(**CASES[case]), tmp_path / "b")
    on_disk = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest_hash(on_disk) == manifest_hash(manifest)
    assert manifest_hash(manifest) == GOLDEN[case], f"{case}: the bundle changed"
