"""Quantization: codecs (property-based), the mixed-precision solver, and every scheme through the runtime."""

import json

import numpy as np
import pytest
from helpers import read_manifest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from edgemoe.bundle import sample_input
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.errors import ConfigError
from edgemoe.passes.plan_expert_bits import ExpertChoice, balance_tasks, plan_expert_bits
from edgemoe.quantization import (
    QuantConfig,
    dequantize_int8_per_channel,
    dequantize_nbits,
    nbits_bytes,
    quantize_int8_per_channel,
    quantize_nbits,
)
from edgemoe.runtime import Session
from edgemoe.swap.budget import parse_bytes
from edgemoe.targets.onnx.target import INT8_WEIGHT_MAX, OnnxTarget
from edgemoe.tools.verify_bundle import verify_bundle

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
shapes = st.tuples(st.integers(1, 70), st.integers(1, 12))


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, shapes, elements=finite))
def test_int8_round_trip_error_is_half_a_step(w):
    for limit in (OnnxTarget.int8_weight_max, 127):
        q, scale = quantize_int8_per_channel(w, limit=limit)
        assert q.dtype == np.int8 and scale.dtype == np.float32 and (np.abs(q) <= limit).all()
        back = dequantize_int8_per_channel(q, scale)
        assert (np.abs(back - w) <= scale * 0.5 + 1e-6 * np.abs(w) + 1e-30).all()
    # onnxruntime's 7 bits: no pair of uint8 x int8 products can saturate a 16-bit sum (x86 without VNNI)
    assert OnnxTarget.int8_weight_max == INT8_WEIGHT_MAX and 2 * 255 * INT8_WEIGHT_MAX < 2**15


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, shapes, elements=finite), st.sampled_from([2, 4, 8]), st.sampled_from([32, 64]))
def test_nbits_round_trip_error_is_half_a_step(w, bits, group):
    packed, scales = quantize_nbits(w, bits, group)
    k, n = w.shape
    assert packed.shape == (n, -(-k // group), group * bits // 8)
    assert packed.nbytes + scales.nbytes == nbits_bytes(k, n, bits, group)
    back = dequantize_nbits(packed, scales, k, bits, group)
    assert back.shape == w.shape
    step = np.repeat(scales.reshape(n, -1), group, axis=1)[:, :k].T
    assert (np.abs(back - w) <= step * 0.5 + 1e-6 * np.abs(w) + 1e-30).all()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_nbits_edge_cases(bits):
    zeros = np.zeros((40, 3), np.float32)
    packed, scales = quantize_nbits(zeros, bits, 32)
    assert (scales == 1).all()  # zero groups: any scale reproduces them exactly
    assert (dequantize_nbits(packed, scales, 40, bits, 32) == 0).all()
    const = np.full((64, 2), -3.5, np.float32)
    packed, scales = quantize_nbits(const, bits, 32)
    np.testing.assert_allclose(dequantize_nbits(packed, scales, 64, bits, 32), const, rtol=1e-6)
    tiny = np.full((32, 1), 1e-30, np.float32)
    packed, scales = quantize_nbits(tiny, bits, 32)
    assert np.isfinite(dequantize_nbits(packed, scales, 32, bits, 32)).all()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_name_the_tensor(bad):
    w = np.ones((32, 4), np.float32)
    w[3, 1] = bad
    with pytest.raises(ConfigError, match=r"experts\.3\.w1"):
        quantize_nbits(w, 4, 32, "experts.3.w1")
    with pytest.raises(ConfigError, match="fc2"):
        quantize_int8_per_channel(w, "fc2")


def test_parse_bytes_and_config_validation():
    assert parse_bytes("6MB") == 6_000_000 and parse_bytes("6MiB") == 6 << 20 and parse_bytes("1500") == 1500
    with pytest.raises(ConfigError):
        parse_bytes("six megs")
    with pytest.raises(ConfigError):
        QuantConfig(scheme="int3").validate()
    with pytest.raises(ConfigError):
        QuantConfig(weight_budget=10, avg_bits=3).validate()
    with pytest.raises(ConfigError):
        QuantConfig(avg_bits=1).validate()
    with pytest.raises(ConfigError):
        QuantConfig(group_size=48).validate()


def _choices(n=96, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        err = {2: float(rng.uniform(0.05, 0.3)), 4: float(rng.uniform(0.004, 0.02)), 8: float(rng.uniform(1e-5, 1e-4))}
        out.append(
            ExpertChoice(
                (i // 16, i % 16),
                float(rng.exponential()),
                147456,
                {b: nbits_bytes(192, 384, b, 32) * 2 for b in (2, 4, 8)},
                err,
            )
        )
    return out


def test_solver_respects_budget_and_is_fast():
    experts = _choices()
    budget = sum(e.bytes[4] for e in experts)
    plan = plan_expert_bits(experts, (2, 4, 8), budget_bytes=budget)
    assert plan.total_bytes <= budget
    assert plan.solve_seconds < 5  # 6 layers x 16 experts
    uniform4 = sum(e.importance * e.error[4] for e in experts)
    assert plan.objective <= uniform4 + 1e-12  # all-4-bit is feasible, so the optimum is no worse
    avg = plan_expert_bits(experts, (2, 4, 8), avg_bits=3.0)
    assert avg.avg_bits <= 3.0 + 1e-9
    with pytest.raises(ConfigError, match="below"):
        plan_expert_bits(experts, (2, 4, 8), budget_bytes=10)


def test_balance_tasks_weighs_every_task_equally():
    # Task b's gate scores are 100x smaller: unbalanced, the solver would starve its experts.
    per_task = {"a": {(0, 0): 1.0, (0, 1): 0.5}, "b": {(0, 2): 0.01, (0, 3): 0.02}}
    lowest = {(0, 0): 0.2, (0, 1): 0.1, (0, 2): 0.3, (0, 3): 0.3}
    w = balance_tasks(per_task, lowest)
    for imp in per_task.values():
        assert sum(w[k] * lowest[k] for k in imp) == pytest.approx(1.0)
    assert w[(0, 2)] / w[(0, 3)] == pytest.approx(0.5)  # ratios inside a task are kept
    experts = [ExpertChoice(k, w[k], 100, {2: 25, 4: 50}, {2: lowest[k], 4: lowest[k] / 10}) for k in lowest]
    plan = plan_expert_bits(experts, (2, 4), budget_bytes=150)  # room for two experts at 4 bits
    assert {plan.bits[(0, 0)], plan.bits[(0, 3)]} == {4}  # each task's most damaging expert (unbalanced: task a's two)


def test_solver_gives_important_experts_more_bits():
    experts = _choices(32, seed=3)
    plan = plan_expert_bits(experts, (2, 4, 8), avg_bits=3.0)
    order = sorted(experts, key=lambda e: e.importance)
    low = np.mean([plan.bits[e.key] for e in order[:8]])
    high = np.mean([plan.bits[e.key] for e in order[-8:]])
    assert high > low


@pytest.fixture(scope="module")
def quant_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    out = {}
    for name, q in {
        "fp16": QuantConfig(scheme="fp16", eval_samples=4),
        "int8": QuantConfig(scheme="int8", eval_samples=4),
        "int8-dynamic": QuantConfig(scheme="int8-dynamic", eval_samples=4),
        "int4": QuantConfig(scheme="int4", eval_samples=4),
        "mixed": QuantConfig(avg_bits=3.0, eval_samples=4),
    }.items():
        compile_model(CompileConfig("m3vit-micro", quant=q, calib_samples=4), root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("scheme", ["fp16", "int8", "int8-dynamic", "int4", "mixed"])
def test_each_scheme_runs_through_the_runtime(quant_bundles, bundle_factory, scheme):
    bundle = quant_bundles[scheme]
    m = read_manifest(bundle)
    fp32 = read_manifest(bundle_factory("m3vit-micro"))
    assert m["totals"]["expert_bytes_bundle"] < fp32["totals"]["expert_bytes_bundle"]
    session = Session(bundle, "semseg")
    x = sample_input(m["input"], batch=2, seed=1)
    ref = Session(bundle_factory("m3vit-micro"), "semseg").run(x)
    got = session.run(x)
    cos = (got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref)
    assert cos > {"fp16": 0.99999, "int8-dynamic": 0.999}.get(scheme, 0.98), cos
    assert not np.array_equal(got, ref)  # it really ran quantized weights
    acc = m["accuracy"]["tasks"]["semseg"]
    assert acc["metric_name"] == "miou" and 0 <= acc["metric"] <= 1 and 0 <= acc["metric_fp32"] <= 1
    assert m["accuracy"]["bundle_bytes"] < m["accuracy"]["bundle_bytes_fp32"]
    for layer in m["moe_layers"]:
        for e in layer["experts"]:
            assert e["kernel"] in m["graphs"] and "bits" in e


def test_bits_follow_the_scheme(quant_bundles):
    bits = {
        name: {e["bits"] for layer in read_manifest(b)["moe_layers"] for e in layer["experts"]}
        for name, b in quant_bundles.items()
    }
    assert bits["fp16"] == {16} and bits["int8"] == {8} and bits["int8-dynamic"] == {8} and bits["int4"] == {4}
    assert bits["mixed"] <= {2, 4, 8}
    mp = read_manifest(quant_bundles["mixed"])["quantization"]
    assert mp["avg_expert_bits"] <= 3.0 + 1e-9 and mp["mixed_precision"]["solve_seconds"] < 5
    assert mp["scheme"] == "mixed" and mp["dense_scheme"] == "int8"  # not "fp32", the uniform scheme's default
    assert {read_manifest(b)["quantization"]["scheme"] for n, b in quant_bundles.items() if n != "mixed"} <= {
        "fp16", "int8", "int8-dynamic", "int4"
    }  # fmt: skip


def test_no_unreferenced_files_after_quantization(quant_bundles):
    for bundle in quant_bundles.values():
        m = read_manifest(bundle)
        listed = {g["file"] for g in m["graphs"].values()}
        listed |= {e["file"] for layer in m["moe_layers"] for e in layer["experts"]}
        on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"manifest.json"}
        assert listed == on_disk


def test_inspect_and_verify_report_bits_and_accuracy(quant_bundles, run_cli):
    bundle = quant_bundles["mixed"]
    res = run_cli("inspect", bundle, "--json", "--check")
    assert res.exit_code == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["bundle_bytes"] > 0 and d["accuracy"]["tasks"]["depth"]["metric_name"]
    assert all("bits" in e for layer in d["moe_layers"] for e in layer["experts"])
    rep = verify_bundle(bundle, samples=2, timing_runs=1, eval_samples=2)
    assert rep.passed and rep.tolerance is None
    t = rep.to_json()["tasks"]["semseg"]
    assert {"metric", "metric_fp32", "metric_name"} <= set(t)
    strict = run_cli("verify", bundle, "--tolerance", "1e-6", "-q")
    assert strict.exit_code == 10


def test_weight_budget_flag(run_cli, tmp_path, bundle_factory):
    fp32_bytes = read_manifest(bundle_factory("m3vit-micro"))["totals"]["expert_bytes_bundle"]
    budget = fp32_bytes // 6
    res = run_cli("compile", "m3vit-micro", "--weight-budget", str(budget), "-o", tmp_path / "b", "--json")
    assert res.exit_code == 0, res.stderr
    m = read_manifest(tmp_path / "b")
    assert m["quantization"]["mixed_precision"]["expert_bytes"] <= budget
    bad = run_cli("compile", "m3vit-micro", "--weight-budget", "1KB", "-o", tmp_path / "c")
    assert bad.exit_code == 4 and "below" in bad.stderr
    assert not (tmp_path / "c").exists()


def test_percentile_calibrator(tmp_path):
    q = QuantConfig(scheme="int8", calibrator="percentile", percentile=99.9, eval_samples=2)
    m = compile_model(CompileConfig("m3vit-micro", quant=q, calib_samples=2), tmp_path / "b")
    assert m["quantization"]["calibrator"] == "percentile" and m["quantization"]["dense_calibrator"] == "minmax"
    rec = m["moe_layers"][0]["experts"][0]
    assert {"w1.act_scale", "w1.act_zp", "w2.act_scale"} <= {t["name"] for t in rec["tensors"]}
    x = sample_input(m["input"], batch=1, seed=0)
    assert np.isfinite(Session(tmp_path / "b", "depth").run(x)).all()


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def test_int8_dense_quantizes_weight_matmuls_only(quant_bundles):
    import onnx

    bundle = quant_bundles["int8"]
    m = read_manifest(bundle)
    weight_mm = act_mm = 0
    for g in m["graphs"].values():
        if g["kind"] not in ("segment", "head"):
            continue
        model = onnx.load(str(bundle / g["file"]))
        made_by = _producers(model)
        int8 = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8}
        readers = {x: n for n in model.graph.node for x in n.input}
        for node in (n for n in model.graph.node if n.op_type == "MatMul"):
            dq = [made_by.get(x) for x in node.input]
            dq = [p for p in dq if p is not None and p.op_type == "DequantizeLinear"]
            if any(p.input[0] in int8 for p in dq):
                weight_mm += 1
                assert len(dq) == 2, node.name  # weight and activation both int8
            else:
                act_mm += 1
                assert not dq, node.name  # attention's activation x activation matmuls stay float
            # No Q/DQ after a matmul: its consumers are float ops.
            assert readers[node.output[0]].op_type != "QuantizeLinear", node.name
    assert weight_mm and act_mm  # micro: qkv, proj, fc1, fc2, head projections; q @ k^T, attn @ v


def test_int8_expert_kernel_is_an_integer_matmul(quant_bundles):
    """The int8 kernel computes quantize(x) x int8 weights in integers, exactly as the numpy reference."""
    import math

    import onnx

    from edgemoe.bundle.format import decode_expert, read_verified
    from edgemoe.runtime.executor import get_executor

    bundle = quant_bundles["int8"]
    m = read_manifest(bundle)
    layer = m["moe_layers"][0]
    record = layer["experts"][0]
    kernel_record = m["graphs"][record["kernel"]]
    ops = [n.op_type for n in onnx.load(str(bundle / kernel_record["file"])).graph.node]
    # No float MatMul over dequantized weights: onnxruntime only fuses that into int8 with constant scales.
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops and "DequantizeLinear" not in ops
    w = decode_expert(read_verified(bundle, record), record["tensors"])
    x = np.random.default_rng(0).standard_normal((7, w["w1.q"].shape[0])).astype(np.float32)
    kernel = get_executor(m["target"]["executor"]).load(bundle, kernel_record)
    (got,) = kernel.run(x, *(w[n] for n in kernel.input_names[1:]))

    def qmatmul(a, name):
        s, zp = np.float64(w[f"{name}.act_scale"][0]), np.float64(w[f"{name}.act_zp"][0])
        aq = np.clip(np.rint(a / s) + zp, 0, 255) - zp
        return (aq @ w[f"{name}.q"].astype(np.float64)) * s * w[f"{name}.scale"]

    h = qmatmul(x.astype(np.float64), "w1") + w["b1"]
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    want = qmatmul(h, "w2") + w["b2"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
