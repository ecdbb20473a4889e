import numpy as np
import pytest
import torch

from edgemoe.errors import ConfigError
from edgemoe.frontends.m3vit import M3ViTAdapter
from edgemoe.ir import validate_ir
from edgemoe.models import model_entries, resolve_model
from edgemoe.models.m3vit import CONFIGS, M3ViTConfig, build_m3vit


def test_tiny_is_the_edge_moe_configuration():
    cfg = CONFIGS["m3vit-tiny"]
    assert cfg.img_size == (128, 256) and cfg.patch == 16 and cfg.num_tokens == 129
    assert (cfg.dim, cfg.heads, cfg.depth, cfg.mlp_hidden, cfg.expert_hidden) == (192, 3, 12, 768, 384)
    assert (cfg.num_experts, cfg.top_k) == (16, 2)
    assert cfg.tasks == (("semseg", 7), ("depth", 1))
    assert cfg.moe_blocks == (1, 3, 5, 7, 9, 11)
    small = CONFIGS["m3vit-small"]
    assert (small.dim, small.heads, small.depth, small.num_experts, small.top_k) == (384, 6, 12, 16, 4)


def test_forward_shapes_and_determinism():
    cfg = CONFIGS["m3vit-micro"]
    a, b = build_m3vit(cfg), build_m3vit(cfg)
    x = torch.randn(2, 3, *cfg.img_size)
    with torch.no_grad():
        ya, yb = a(x, "semseg"), b(x, "semseg")
        assert ya.shape == (2, 7, *cfg.img_size)
        assert a(x, "depth").shape == (2, 1, *cfg.img_size)
    assert torch.equal(ya, yb)  # seeded weights


def test_gate_scores_are_softmax_not_renormalised():
    model = build_m3vit(CONFIGS["m3vit-micro"])
    gate = model.blocks[1].moe.gates[0]
    h = torch.randn(50, 32)
    idx, scores = gate(h)
    probs = torch.softmax(gate.w_gate(h), dim=-1)
    assert torch.allclose(scores, torch.gather(probs, -1, idx))
    assert (scores.sum(-1) < 1).all()
    assert torch.equal(idx, torch.topk(probs, 2, dim=-1).indices)


def test_expert_windows_confine_each_task():
    cfg = CONFIGS["m3vit-micro-windows"]
    assert cfg.expert_window(0) == (0, 1, 2, 3) and cfg.expert_window(1) == (4, 5, 6, 7)
    adapter = M3ViTAdapter(build_m3vit(cfg))
    x = np.random.default_rng(0).standard_normal((3, 3, *cfg.img_size)).astype(np.float32)
    for task, window in (("semseg", {0, 1, 2, 3}), ("depth", {4, 5, 6, 7})):
        for idx, _ in adapter.route(x, task):
            assert set(np.unique(idx)) <= window


def test_task_conditioning_changes_routing():
    cfg = CONFIGS["m3vit-micro-cond"]
    model = build_m3vit(cfg)
    assert model.task_embed is not None
    gate_in = model.blocks[1].moe.gates[0].w_gate.in_features
    assert gate_in == cfg.dim + cfg.task_cond_dim
    assert not torch.equal(model.task_cond(0), model.task_cond(1))


def test_keep_mask_restricts_choice_without_changing_scores():
    model = build_m3vit(CONFIGS["m3vit-micro"])
    gate = model.blocks[1].moe.gates[0]
    h = torch.randn(40, 32)
    keep = torch.tensor([True, True, True, False, False, True, False, False])
    idx, scores = gate(h, None, keep)
    assert keep[idx].all()
    probs = torch.softmax(gate.w_gate(h), dim=-1)
    assert torch.allclose(scores, torch.gather(probs, -1, idx))


def test_ir_validation_rejects_topk_above_experts():
    cfg = M3ViTConfig(
        name="bad", img_size=(32, 32), dim=16, heads=2, depth=2, mlp_hidden=16, expert_hidden=16, num_experts=4, top_k=5
    )
    with pytest.raises(ConfigError, match="top-k 5 must be between 1 and 4"):
        M3ViTAdapter(build_m3vit(cfg))


def test_ir_validation_rejects_mismatched_router_width():
    adapter = M3ViTAdapter(build_m3vit(CONFIGS["m3vit-micro"]))
    ir = adapter.ir
    layer = ir.moe_layers[0]
    bad_router = type(layer.routers[0])(task="semseg", num_experts=7, top_k=2)
    bad_layer = type(layer)(
        layer.index, layer.block, layer.num_experts, layer.top_k, layer.expert, (bad_router, layer.routers[1])
    )
    bad = type(ir)(
        ir.name, ir.family, ir.granularity, ir.input, ir.tasks, ir.segments, (bad_layer, *ir.moe_layers[1:]), ir.params
    )
    with pytest.raises(ConfigError, match="width 7"):
        validate_ir(bad)


def test_ir_describes_segments_and_experts():
    ir = M3ViTAdapter(build_m3vit(CONFIGS["m3vit-tiny"])).ir
    assert len(ir.segments) == len(ir.moe_layers) + 1 == 7
    assert ir.num_experts == 96
    assert ir.moe_layers[0].expert.param_count == 192 * 384 * 2 + 384 + 192
    assert ir.task_names == ("semseg", "depth")


def test_model_config_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"base": "m3vit-micro", "depth": 6, "name": "six"}')
    entry = resolve_model(str(path))
    assert entry.name == "six" and entry.config["depth"] == 6
    assert len(M3ViTAdapter(entry.build()).ir.moe_layers) == 3


def test_registry_lists_reference_models():
    names = set(model_entries())
    assert {"m3vit-tiny", "m3vit-small", "m3vit-micro"} <= names
