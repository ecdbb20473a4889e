"""Quantized partitions on the TVM target: fp16, int8 (static) and int8-dynamic compile and run;
group-wise n-bit (int4, mixed precision) is refused at compile time with a clear error."""

import numpy as np
import pytest
from helpers import read_manifest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

from edgemoe.bundle import sample_input
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.errors import TargetError
from edgemoe.quantization import QuantConfig
from edgemoe.runtime import Session

SCHEMES = ("int8", "int8-dynamic", "fp16")

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


@pytest.fixture(scope="module")
def tvm_quant(tmp_path_factory):
    root = tmp_path_factory.mktemp("tvmquant")
    cache = {}

    def make(model, scheme):
        if (model, scheme) not in cache:
            out = root / f"{model}-{scheme}"
            q = QuantConfig(scheme=scheme, eval_samples=4)
            compile_model(CompileConfig(model, target="tvm", quant=q, calib_samples=4), out)
            cache[(model, scheme)] = out
        return cache[(model, scheme)]

    return make


def _bytes(bundle, kinds):
    m = read_manifest(bundle)
    return sum(g["bytes"] for g in m["graphs"].values() if g["kind"] in kinds)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_m3vit_runs_on_tvm(tvm_quant, bundle_factory, scheme):
    bundle = tvm_quant("m3vit-micro", scheme)
    fp32 = bundle_factory("m3vit-micro", target="tvm")
    m, m32 = read_manifest(bundle), read_manifest(fp32)
    assert m["target"]["name"] == "tvm"
    # Experts are data: int8 blobs are ~4x, fp16 2x smaller than fp32, under the same executor.
    ratio = m["totals"]["expert_bytes_bundle"] / m32["totals"]["expert_bytes_bundle"]
    assert ratio < (0.55 if scheme == "fp16" else 0.35), ratio  # micro experts: scales weigh a little
    for layer in m["moe_layers"]:
        for e in layer["experts"]:
            assert m["graphs"][e["kernel"]]["file"].endswith(".so")
    for task in m["tasks"]:
        x = sample_input(m["input"], batch=2, seed=3)
        got = Session(bundle, task).run(x)
        ref = Session(fp32, task).run(x)
        cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
        assert cos > {"fp16": 0.99999}.get(scheme, 0.98), (task, cos)
        assert not np.array_equal(got, ref)  # the quantized graphs really ran
    acc = m["accuracy"]["tasks"]["semseg"]
    assert acc["metric_name"] == "miou" and 0 <= acc["metric"] <= 1


def test_int8_tvm_dense_library_holds_int8_weights(tmp_path):
    """A quantized trunk segment stores int8 constants (a smaller file), not a dequantized fp32 copy."""
    from edgemoe.passes.capture_model import capture_model
    from edgemoe.targets.tvm.target import TARGET

    cfg = CompileConfig("m3vit-tiny-patch", target="tvm")
    seg = capture_model(cfg).adapter.segment(1)  # two transformer blocks: weights dominate the file
    try:
        path = TARGET.emit(seg, tmp_path, cfg)
        fp32 = path.stat().st_size
        feeds = [{n: t.numpy() for n, t in zip(seg.input_names, seg.example_inputs, strict=True)}]
        TARGET.quantize_graph(path, "int8", feeds, QuantConfig(scheme="int8"))  # checked against torch
    finally:
        TARGET.release()  # as a compile does when it ends: the partition kept for quantize_graph goes
    assert path.stat().st_size < 0.6 * fp32, (path.stat().st_size, fp32)


def test_int8_token_model_on_tvm(tvm_quant, bundle_factory):
    """SwiGLU kernels with shared experts (three weight matmuls each) quantize and run."""
    bundle = tvm_quant("deepseek-lm-micro", "int8")
    m = read_manifest(bundle)
    ids = np.random.default_rng(0).integers(0, m["input"]["high"], size=(2, 9), dtype=np.int64)
    task = next(iter(m["tasks"]))
    got = Session(bundle, task).run(ids)
    ref = Session(bundle_factory("deepseek-lm-micro", target="tvm"), task).run(ids)
    cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
    assert cos > 0.98 and not np.array_equal(got, ref)


@pytest.mark.parametrize("quant", [QuantConfig(scheme="int4"), QuantConfig(avg_bits=3.0)], ids=["int4", "mixed"])
def test_group_wise_nbits_is_refused_at_compile_time(tmp_path, quant):
    with pytest.raises(TargetError, match=r"not support quantization scheme .* --target onnx"):
        compile_model(CompileConfig("m3vit-micro", target="tvm", quant=quant, calib_samples=2), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_cli_refuses_int4_on_tvm(run_cli, tmp_path):
    r = run_cli("compile", "m3vit-micro", "--target", "tvm", "--quant", "int4", "-o", tmp_path / "b")
    assert r.exit_code == TargetError.exit_code
    assert "int4" in r.stderr and "--target onnx" in r.stderr
