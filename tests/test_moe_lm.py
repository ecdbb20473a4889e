"""Token-routed MoE language models (family moe_lm): bundles vs PyTorch, routing, shared experts, CLI."""

import json

import numpy as np
import onnx
import pytest
from helpers import read_manifest

from edgemoe.errors import InputError, ModelError
from edgemoe.frontends.moe_lm import MoELMAdapter
from edgemoe.models import model_entries, resolve_model
from edgemoe.models.moe_lm import family
from edgemoe.runtime import Session
from edgemoe.tools.verify_bundle import verify_bundle

MICRO = ["switch-lm-micro", "mixtral-lm-micro", "deepseek-lm-micro"]

_ADAPTERS: dict = {}


def adapter(model: str) -> MoELMAdapter:
    if model not in _ADAPTERS:
        _ADAPTERS[model] = MoELMAdapter(resolve_model(model).build())
    return _ADAPTERS[model]


def ids(model: str, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    vocab = adapter(model).cfg.vocab_size
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int64)


@pytest.mark.parametrize("model", MICRO)
def test_verify_passes(bundle_factory, model):
    rep = verify_bundle(bundle_factory(model), samples=2, seed=3, timing_runs=1)
    (r,) = rep.tasks.values()
    assert r.task == "lm"
    assert r.output_shape == [2, 16, adapter(model).cfg.vocab_size]
    assert r.max_abs_error <= 1e-4 and r.passed
    assert r.reference_max_abs > 0.5  # real logits, not two near-zero outputs
    assert r.experts_total == r.experts_task  # token-level models are not pruned


@pytest.mark.parametrize("model", MICRO)
@pytest.mark.parametrize(("batch", "seq"), [(1, 5), (3, 23), (3, 1)])
def test_dynamic_batch_and_sequence_length(bundle_factory, model, batch, seq):
    session = Session(bundle_factory(model))
    x = ids(model, batch, seq, seed=batch * 100 + seq)
    got = session.run(x)
    assert got.shape == (batch, seq, adapter(model).cfg.vocab_size)
    np.testing.assert_allclose(got, adapter(model).reference(x, "lm"), atol=1e-4, rtol=0)


def test_graphs_have_dynamic_batch_and_sequence_axes(bundle_factory):
    bundle = bundle_factory("deepseek-lm-micro")
    for name in ("segment_0", "gate_lm_0", "head_lm"):
        graph = onnx.load(str(bundle / "graphs" / f"{name}.onnx"))
        for value in (*graph.graph.input, *graph.graph.output):
            dims = value.type.tensor_type.shape.dim
            assert dims[0].dim_param and dims[1].dim_param, (name, value.name)


def test_attention_is_causal(bundle_factory):
    session = Session(bundle_factory("mixtral-lm-micro"))
    x = ids("mixtral-lm-micro", 1, 12, seed=5)
    changed = x.copy()
    changed[0, 8] = (changed[0, 8] + 1) % adapter("mixtral-lm-micro").cfg.vocab_size
    a, b = session.run(x), session.run(changed)
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-5, rtol=0)  # the past ignores the future
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-2  # the changed token and later ones see it


@pytest.mark.parametrize("model", MICRO)
def test_routing_properties(bundle_factory, model):
    cfg = adapter(model).cfg
    session = Session(bundle_factory(model))
    x = ids(model, 2, 9, seed=1)
    outs = session.program.segments[0].run(x)
    gate_out = session.program.gates[0].run(outs[1])
    experts, scores = gate_out[0], gate_out[1]
    assert experts.shape == scores.shape == (2, 9, cfg.top_k)
    flat = experts.reshape(-1, cfg.top_k)
    assert all(len(set(row)) == cfg.top_k for row in flat.tolist())
    assert flat.min() >= 0 and flat.max() < cfg.num_experts
    sums = scores.sum(-1)
    if cfg.normalize:
        np.testing.assert_allclose(sums, 1.0, atol=1e-6)
    else:
        assert (sums < 1 - 1e-3).all()  # raw softmax mass of the chosen experts
    # The bundle's gate picks the experts the PyTorch router picks.
    (torch_experts, torch_scores), *_ = adapter(model).route(x, "lm")
    np.testing.assert_array_equal(flat, torch_experts)
    np.testing.assert_allclose(scores.reshape(-1, cfg.top_k), torch_scores, atol=1e-5, rtol=0)
    if cfg.shared_experts:
        assert len(gate_out) == 3
        np.testing.assert_array_equal(gate_out[2], np.ones((2, 9, cfg.shared_experts), np.float32))
    else:
        assert len(gate_out) == 2


def test_router_styles():
    assert adapter("switch-lm-micro").ir.moe_layers[0].top_k == 1
    assert not adapter("switch-lm-micro").ir.moe_layers[0].routers[0].normalize
    assert adapter("switch-lm-micro").cfg.moe_blocks == (1, 3)  # every other block
    assert adapter("mixtral-lm-micro").ir.moe_layers[0].routers[0].normalize
    ds = adapter("deepseek-lm-micro").ir
    assert ds.granularity == "token"
    assert [layer.block for layer in ds.moe_layers] == [1, 2]  # block 0 is dense
    assert all(layer.shared_experts == 2 and layer.num_experts == 16 for layer in ds.moe_layers)


def test_shared_experts_resident_and_routed_experts_lazy(bundle_factory):
    bundle = bundle_factory("deepseek-lm-micro")
    m = read_manifest(bundle)
    shared_bytes = m["totals"]["shared_expert_bytes"]
    assert shared_bytes > 0
    assert shared_bytes == sum(e["bytes"] for layer in m["moe_layers"] for e in layer["shared"])
    session = Session(bundle)
    stats = session.stats
    assert stats.shared_expert_bytes == shared_bytes  # loaded at session start
    assert stats.experts_loaded == 0 and stats.expert_bytes_loaded == 0
    session.run(ids("deepseek-lm-micro", 1, 1, seed=2))  # one token: top-4 routed experts per layer
    stats = session.stats
    assert stats.experts_loaded == 4 * len(m["moe_layers"]) < stats.experts_task
    assert stats.shared_expert_bytes == shared_bytes  # still resident, counted once
    assert stats.resident_expert_bytes == stats.expert_bytes_loaded + shared_bytes


def test_cli_run_json_on_lm_bundle(bundle_factory, run_cli):
    result = run_cli("run", bundle_factory("switch-lm-micro"), "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["task"] == "lm" and out["input"] == "sample"
    assert out["output_shape"] == [1, 16, 256]
    assert 0 < out["experts_loaded"] <= out["experts_task"] == 16


def test_cli_rejects_out_of_vocab_ids(bundle_factory, run_cli, tmp_path):
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[1, 2, 256]], dtype=np.int64))
    result = run_cli("run", bundle_factory("switch-lm-micro"), "--input", path)
    assert result.exit_code == InputError.exit_code == 9
    assert "[0, 256)" in result.stderr and "Traceback" not in result.stderr


def test_reference_rejects_bad_ids():
    with pytest.raises(InputError):
        adapter("switch-lm-micro").reference(np.array([[0, 300]]), "lm")


def test_registry_and_config_errors():
    entries = model_entries()
    for name in (*MICRO, "mixtral-lm-tiny", "deepseek-lm-tiny"):
        assert entries[name].family == "moe_lm"
    with pytest.raises(ModelError, match="even width"):
        family.normalize({"name": "x", "dim": 30, "heads": 2})
    with pytest.raises(ModelError, match="top_k"):
        family.normalize({"name": "x", "num_experts": 2, "top_k": 3})
    with pytest.raises(ModelError, match="unknown moe_lm config"):
        family.normalize({"name": "x", "experts": 4})


def test_weights_are_seeded():
    a = resolve_model("deepseek-lm-micro").build()
    assert MoELMAdapter(a).state_sha256() == adapter("deepseek-lm-micro").state_sha256()
