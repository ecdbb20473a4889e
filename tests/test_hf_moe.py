"""Third-party MoE classes (transformers) through the hf adapter: bundle vs the library's own forward."""

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from helpers import read_manifest

import edgemoe
from edgemoe.errors import ConfigError, ModelError
from edgemoe.frontends.hf import HFAdapter
from edgemoe.models import resolve_model
from edgemoe.runtime import Session

ARCHS = [
    "hf-mixtral-micro",
    "hf-qwen2-moe-micro",
    "hf-olmoe-micro",
    "hf-switch-micro",
    "hf-deepseek-v2-micro",
    "hf-deepseek-v3-micro",
    "hf-qwen3-moe-micro",
    "hf-glm4-moe-micro",
    "hf-ernie4-5-moe-micro",
    "hf-phimoe-micro",
    "hf-granitemoe-micro",
    "hf-granitemoeshared-micro",
    "hf-gpt-oss-micro",
    "hf-dbrx-micro",
]
SHARED = [
    "hf-qwen2-moe-micro",
    "hf-deepseek-v2-micro",
    "hf-deepseek-v3-micro",
    "hf-glm4-moe-micro",
    "hf-ernie4-5-moe-micro",
    "hf-granitemoeshared-micro",
]

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


def adapter(name: str) -> HFAdapter:
    return HFAdapter(resolve_model(name).build())


def ids(ad: HFAdapter, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, ad.ir.input.high, (batch, seq))


@pytest.mark.parametrize("name", ARCHS)
def test_bundle_matches_library_forward(name, bundle_factory):
    bundle = bundle_factory(name)
    schema = json.loads((Path(edgemoe.__file__).parent / "bundle" / "manifest.schema.json").read_text())
    jsonschema.validate(read_manifest(bundle), schema)
    ad = adapter(name)
    task = ad.ir.task_names[0]
    session = Session(bundle, task)
    width = ad.ir.task(task).output.shape[-1]
    for seq in (16, 5):  # one graph per partition serves every sequence length
        x = ids(ad, 2, seq, seed=seq)
        got = session.run(x)
        ref = ad.reference(x, task)
        assert got.shape == ref.shape == (2, seq, width)
        assert np.abs(got - ref).max() <= 1e-4, name
        assert np.abs(ref).max() > 0.5  # not a degenerate all-zero output
        # The bundle's gates pick exactly the experts the library's routers pick.
        for li, (experts, _) in enumerate(ad.route(x, task)):
            assert np.array_equal(np.sort(experts, axis=-1), session.last_routing[li]), (name, li)


def test_task_and_layer_layout():
    expect = {
        "hf-mixtral-micro": ("lm", [0, 1, 2]),
        "hf-qwen2-moe-micro": ("lm", [0, 2]),  # layer 1 is in mlp_only_layers
        "hf-olmoe-micro": ("lm", [0, 1, 2]),
        "hf-switch-micro": ("encoder", [1, 3]),  # sparse every 2nd block
        "hf-deepseek-v2-micro": ("lm", [1, 2]),  # first_k_dense_replace = 1
        "hf-deepseek-v3-micro": ("lm", [1, 2]),
        "hf-qwen3-moe-micro": ("lm", [0, 2]),  # layer 1 is in mlp_only_layers
        "hf-glm4-moe-micro": ("lm", [1, 2]),  # first_k_dense_replace = 1
        "hf-ernie4-5-moe-micro": ("lm", [1, 2]),  # moe_layer_start_index = 1
        "hf-phimoe-micro": ("lm", [0, 1, 2]),
        "hf-granitemoe-micro": ("lm", [0, 1, 2]),
        "hf-granitemoeshared-micro": ("lm", [0, 1, 2]),
        "hf-gpt-oss-micro": ("lm", [0, 1, 2]),
        "hf-dbrx-micro": ("lm", [0, 1, 2]),
    }
    for name, (task, blocks) in expect.items():
        ir = adapter(name).ir
        assert ir.family == "hf" and ir.granularity == "token" and ir.name == name
        assert ir.task_names == (task,)
        assert [layer.block for layer in ir.moe_layers] == blocks, name
        assert ir.input.dtype == "int64" and ir.input.shape == (None, None) and ir.input.high == 320


@pytest.mark.parametrize("name", SHARED)
def test_shared_experts_are_resident_and_weighted(name, bundle_factory):
    bundle = bundle_factory(name)
    manifest = read_manifest(bundle)
    assert all(len(layer["shared"]) == 1 for layer in manifest["moe_layers"])
    session = Session(bundle)
    stats = session.stats
    # Loaded with the session, before any token is routed.
    assert stats.shared_expert_bytes == manifest["totals"]["shared_expert_bytes"] > 0
    assert stats.experts_loaded == 0 and stats.resident_expert_bytes == stats.shared_expert_bytes
    d = manifest["moe_layers"][0]["expert_shape"]["d_model"]
    h = np.random.default_rng(0).standard_normal((2, 6, d)).astype(np.float32)
    experts, scores, shared = session.program.gates[0].run(h)
    assert experts.dtype == np.int64 and experts.shape[:2] == scores.shape[:2] == shared.shape[:2] == (2, 6)
    if name == "hf-qwen2-moe-micro":  # sigmoid(shared_expert_gate(x)) per token
        assert shared.shape[-1] == 1 and 0 < shared.min() < shared.max() < 1
    else:  # DeepSeek, GLM-4, ERNIE-4.5 and Granite add their shared experts unweighted
        assert np.array_equal(shared, np.ones_like(shared))


def test_deepseek_routing_paths(bundle_factory):
    """Group-limited choice, the score-correction bias and the routed scaling reach the bundle's gates."""
    ad = adapter("hf-deepseek-v2-micro")
    session = Session(bundle_factory("hf-deepseek-v2-micro"))
    session.run(ids(ad, 2, 16))
    # V2: 2 groups of 4 experts, top-1 group: both chosen experts always share a group.
    for routing in session.last_routing:
        assert np.all(routing[:, 0] // 4 == routing[:, 1] // 4)

    v3 = adapter("hf-deepseek-v3-micro")
    x = ids(v3, 2, 16)
    session = Session(bundle_factory("hf-deepseek-v3-micro"))
    session.run(x)
    spans = np.concatenate([[len(set(row // 2)) for row in r] for r in session.last_routing])
    assert spans.max() == 2  # 3 experts from at most 2 of the 4 groups (of 2)
    routes = v3.route(x, "lm")
    # Scores are renormalised to sum to 1, then scaled by routed_scaling_factor 2.5.
    np.testing.assert_allclose(routes[0][1].sum(-1), 2.5, rtol=1e-5)
    # The nonzero correction bias changes which experts are chosen (not their weights).
    gate = v3.model.model.layers[1].mlp.gate
    bias = gate.e_score_correction_bias.clone()
    gate.e_score_correction_bias.zero_()
    unbiased = v3.route(x, "lm")
    gate.e_score_correction_bias.copy_(bias)
    assert any(not np.array_equal(np.sort(a[0], -1), np.sort(b[0], -1)) for a, b in zip(routes, unbiased, strict=True))


def test_switch_capacity_drops_tokens_like_the_library(bundle_factory):
    ad = adapter("hf-switch-micro")
    x = ids(ad, 2, 16, seed=3)
    scores = np.concatenate([s for _, s in ad.route(x, "encoder")])
    assert (scores == 0).any() and (scores > 0).any()  # capacity 5 of 16 tokens: some skip the MoE
    got = Session(bundle_factory("hf-switch-micro")).run(x)
    assert np.abs(got - ad.reference(x, "encoder")).max() <= 1e-4


def test_mixtral_sliding_window_is_reproduced(bundle_factory):
    ad = adapter("hf-mixtral-micro")
    x = ids(ad, 2, 16, seed=5)
    windowed = ad.reference(x, "lm")
    ad.model.config.sliding_window = None
    full = ad.reference(x, "lm")
    assert np.abs(windowed - full).max() > 1e-3  # the window (8) matters at 16 tokens
    got = Session(bundle_factory("hf-mixtral-micro")).run(x)
    assert np.abs(got - windowed).max() <= 1e-4


def _no_multipliers(model):
    model.model.embedding_multiplier = 1.0
    for layer in model.model.layers:
        layer.residual_multiplier = 1.0
        layer.self_attn.scaling = layer.self_attn.head_dim**-0.5
    model.config.logits_scaling = 1.0


def _no_window(model):
    model.config.sliding_window = None


def _no_qkv_clip(model):
    for block in model.transformer.blocks:
        block.norm_attn_norm.attn.clip_qkv = 1e9


def _no_choice_bias(model):
    for m in model.modules():
        if isinstance(getattr(m, "e_score_correction_bias", None), torch.Tensor):
            m.e_score_correction_bias.zero_()


def _no_clamp_or_sinks(model):
    for layer in model.model.layers:
        layer.mlp.experts.limit = 1e9
        layer.self_attn.sinks.fill_(-1e4)


# What each arch adds to the blocks the others share, and how to switch it off: with it off, the
# library's output or routing changes, so the bundle's match with the library covers it.
ARCH_FEATURES = [
    ("hf-granitemoe-micro", _no_multipliers, "output"),
    ("hf-granitemoeshared-micro", _no_multipliers, "output"),
    ("hf-phimoe-micro", _no_window, "output"),
    ("hf-gpt-oss-micro", _no_clamp_or_sinks, "output"),
    ("hf-dbrx-micro", _no_qkv_clip, "output"),
    ("hf-glm4-moe-micro", _no_choice_bias, "routing"),
    ("hf-ernie4-5-moe-micro", _no_choice_bias, "routing"),
]


@pytest.mark.parametrize(("name", "switch_off", "changes"), ARCH_FEATURES, ids=[f[0] for f in ARCH_FEATURES])
@torch.no_grad()
def test_arch_features_change_the_library_output_and_reach_the_bundle(name, switch_off, changes, bundle_factory):
    ad = adapter(name)
    x = ids(ad, 2, 16, seed=7)
    ref, routes = ad.reference(x, "lm"), ad.route(x, "lm")
    session = Session(bundle_factory(name))
    assert np.abs(session.run(x) - ref).max() <= 1e-4
    for li, (experts, _) in enumerate(routes):
        assert np.array_equal(np.sort(experts, axis=-1), session.last_routing[li])
    switch_off(ad.model)
    if changes == "output":
        assert np.abs(ad.reference(x, "lm") - ref).max() > 1e-3
    else:
        assert any(
            not np.array_equal(np.sort(a[0], -1), np.sort(b[0], -1))
            for a, b in zip(routes, ad.route(x, "lm"), strict=True)
        )


def test_glm4_routing_is_group_limited(bundle_factory):
    ad = adapter("hf-glm4-moe-micro")
    x = ids(ad, 2, 16)
    session = Session(bundle_factory("hf-glm4-moe-micro"))
    session.run(x)
    for routing in session.last_routing:  # 2 groups of 4 experts, topk_group 1: one group per token
        assert np.all(routing[:, 0] // 4 == routing[:, 1] // 4)
    # Renormalised, then scaled by routed_scaling_factor 1.5.
    np.testing.assert_allclose(ad.route(x, "lm")[0][1].sum(-1), 1.5, rtol=1e-5)


def test_verify_passes(run_cli, bundle_factory):
    result = run_cli("verify", bundle_factory("hf-qwen2-moe-micro"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["tasks"]["lm"]["max_abs_error"] <= 1e-4


def _build(arch: str, **kw):
    from edgemoe.models.hf import family

    tiny = {
        "vocab_size": 64,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
    }
    return family.build({"arch": arch, **tiny, **kw})


def test_unsupported_classes_raise_model_error():
    with pytest.raises(ModelError, match=r"LlamaForCausalLM .*'llama'.* not a mixture-of-experts model"):
        HFAdapter(_build("llama", intermediate_size=16))
    with pytest.raises(ModelError, match=r"MiniMaxForCausalLM .*'minimax'.* no spec .*supported: mixtral"):
        HFAdapter(_build("minimax", intermediate_size=16, num_local_experts=4))
    with pytest.raises(ModelError, match=r"JambaForCausalLM .*not supported: Jamba interleaves Mamba"):
        HFAdapter(_build("jamba", intermediate_size=16, num_experts=4))
    llama4 = _build("llama4_text", intermediate_size=16, intermediate_size_mlp=16, num_local_experts=4, head_dim=8)
    with pytest.raises(ModelError, match=r"Llama4ForCausalLM .*not supported: Llama-4 multiplies each expert's input"):
        HFAdapter(llama4)
    with pytest.raises(ModelError, match=r"has no MoE layer \(no Qwen2MoeSparseMoeBlock"):
        HFAdapter(_build("qwen2_moe", num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0, 1]))

    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(vocab_size=64, d_model=16, d_kv=4, d_ff=16, num_layers=2, num_heads=2, num_experts=2)
    with pytest.raises(ModelError, match=r"captures SwitchTransformersEncoderModel \(the encoder-decoder needs two"):
        HFAdapter(SwitchTransformersForConditionalGeneration(cfg))


def test_bad_hf_configs_raise_model_error(run_cli, tmp_path):
    from edgemoe.models.hf import family

    with pytest.raises(ModelError, match="unknown MixtralConfig field"):
        family.normalize({"arch": "mixtral", "hidden_sise": 32})
    with pytest.raises(ModelError, match="no model type 'mixtrall'"):
        family.normalize({"arch": "mixtrall"})
    with pytest.raises(ModelError, match="bad hf config for arch 'mixtral'"):
        family.normalize({"arch": "mixtral", "hidden_size": "wide"})
    with pytest.raises(ModelError, match="no e_score_correction_bias"):
        family.build(
            {
                "arch": "olmoe",
                "hidden_size": 16,
                "num_attention_heads": 2,
                "num_hidden_layers": 1,
                "router_bias_std": 0.1,
            }
        )
    # From the CLI: an MoE arch without a spec is a model error (exit code 3) naming the arch.
    path = tmp_path / "minimax.json"
    path.write_text(
        json.dumps(
            {
                "family": "hf",
                "arch": "minimax",
                "vocab_size": 64,
                "hidden_size": 16,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            }
        )
    )
    result = run_cli("compile", path, "-o", tmp_path / "out")
    assert result.exit_code == 3, result.output
    assert "minimax" in result.stderr and "no spec" in result.stderr
    assert not (tmp_path / "out").exists()


def test_token_routed_gates_cannot_be_restricted():
    ad = adapter("hf-olmoe-micro")
    with pytest.raises(ConfigError, match="routes over all 8 experts"):
        ad.gate(0, "lm", (0, 1, 2))
    with pytest.raises(ConfigError, match="cannot restrict"):
        ad.reference(ids(ad, 1, 4), "lm", {0: (0, 1)})


# Hand-written configs a user tried: (name, config, what the error must say). Each one used to end in
# an internal error or a message of the library's that named no field.
_MIXTRAL = {
    "arch": "mixtral",
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 16,
    "num_local_experts": 4,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
_DEEPSEEK = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 24,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 8,
    "qk_rope_head_dim": 8,
    "v_head_dim": 8,
    "first_k_dense_replace": 0,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
}
BAD_CONFIGS = [
    ("pad", {**_MIXTRAL, "pad_token_id": 100}, r"pad_token_id 100 lies outside the vocabulary \(vocab_size 64\)"),
    ("kv-heads", {**_MIXTRAL, "num_key_value_heads": 8}, r"num_key_value_heads 8 must divide num_attention_heads 2"),
    ("odd-head", {**_MIXTRAL, "head_dim": 3}, r"head_dim 3 is odd"),
    ("act", {**_MIXTRAL, "hidden_act": "swishy"}, r"hidden_act 'swishy' is not an activation transformers knows"),
    ("rope", {**_MIXTRAL, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, r"rope_type 'dynamic'"),
    ("rope-keys", {**_MIXTRAL, "rope_parameters": {"rope_type": "linear"}}, r"Missing required keys .*factor"),
    ("groups", {"arch": "deepseek_v3", **_DEEPSEEK, "n_group": None}, r"needs n_group and topk_group as integers"),
    ("groups-split", {"arch": "deepseek_v3", **_DEEPSEEK, "n_group": 3, "topk_group": 1}, r"n_group 3 must divide"),
    (
        "sparse-step",
        {"arch": "qwen2_moe", **{k: v for k, v in _MIXTRAL.items() if k not in ("arch", "num_local_experts")}}
        | {"num_experts": 4, "decoder_sparse_step": 0},
        r"cannot build Qwen2MoeForCausalLM .*\(ZeroDivisionError: ",
    ),
    (
        "forward",
        {"arch": "deepseek_v2", **_DEEPSEEK, "topk_method": "bogus"},
        r"DeepseekV2ForCausalLM.forward fails on this config \(UnboundLocalError: ",
    ),
]


@pytest.mark.parametrize(("name", "config", "message"), BAD_CONFIGS, ids=[b[0] for b in BAD_CONFIGS])
def test_hand_written_configs_get_a_model_error_that_names_the_field(run_cli, tmp_path, name, config, message):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"family": "hf", **config}))
    result = run_cli("compile", path, "-o", tmp_path / "out")
    assert result.exit_code == 3, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "internal error" not in result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "[transformers]" not in result.stderr  # the library's own warning is not printed beside ours
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config",
    [
        {"arch": "qwen2_moe", **{k: v for k, v in _MIXTRAL.items() if k not in ("arch", "num_local_experts")}}
        | {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 8,
            "shared_expert_intermediate_size": 0,
        },
        {"arch": "deepseek_v3", **_DEEPSEEK, "n_shared_experts": 0, "n_group": 2, "topk_group": 1},
    ],
    ids=["qwen2-moe", "deepseek-v3"],
)
def test_a_width_0_shared_expert_is_no_shared_expert(bundle_factory, tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"family": "hf", **config}))
    bundle = bundle_factory(str(path))
    m = read_manifest(bundle)
    assert all(not layer.get("shared") for layer in m["moe_layers"]) and m["totals"]["shared_expert_bytes"] == 0
    ad = HFAdapter(resolve_model(str(path)).build())
    x = ids(ad, 2, 6)
    got = Session(bundle, "lm").run(x)
    assert np.abs(got - ad.reference(x, "lm")).max() <= 1e-4
