"""M³ViT / Edge-MoE compatibility: config fields, expert windows, and importing M³ViT checkpoints."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import read_manifest

from edgemoe.errors import ModelError
from edgemoe.frontends.m3vit import M3ViTAdapter
from edgemoe.models import load_checkpoint, resolve_model
from edgemoe.models.m3vit import CONFIGS, build_m3vit
from edgemoe.models.m3vit.model import RAW_PIXELS_MEAN, RAW_PIXELS_STD

# m3vit-micro with what an M³ViT backbone has: patch stem, eps 1e-6, no final norm, backbone tasks.
MICRO_M3VIT = dataclasses.replace(
    CONFIGS["m3vit-micro"],
    name="m3vit-micro-m3vit",
    tasks=(("semseg", 0), ("depth", 0)),
    ln_eps=1e-6,
    final_norm=False,
)

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


def _to_m3vit_layout(model, prefix: str = "module.backbone.") -> dict:
    """``model``'s weights under the key names and shapes M³ViT's training script saves."""
    cfg = model.cfg
    sd = {}
    for key, value in model.state_dict().items():
        if key.startswith("patch_embed."):
            sd[key.replace("patch_embed.", "patch_embed.proj.")] = value
        elif ".moe." not in key:
            sd[key] = value
    for b in cfg.moe_blocks:
        moe = model.blocks[b].moe
        sd[f"blocks.{b}.mlp.experts.htoh4.weight"] = torch.stack([e.fc1.weight for e in moe.experts])
        sd[f"blocks.{b}.mlp.experts.htoh4.bias"] = torch.stack([e.fc1.bias for e in moe.experts])
        sd[f"blocks.{b}.mlp.experts.h4toh.weight"] = torch.stack([e.fc2.weight for e in moe.experts])
        sd[f"blocks.{b}.mlp.experts.h4toh.bias"] = torch.stack([e.fc2.bias for e in moe.experts])
        for t, gate in enumerate(moe.gates):
            sd[f"blocks.{b}.mlp.gate.{t}.w_gate"] = gate.w_gate.weight.T.contiguous()
    return {prefix + k: v.detach().clone() for k, v in sd.items()}


def _save(path, state_dict, **extra):
    torch.save({"epoch": 40, "state_dict": state_dict, "optimizer": {}, **extra}, path)
    return path


def _images(cfg, n=2):
    return torch.rand(n, cfg.in_chans, *cfg.img_size, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("prefix", ["module.backbone.", "backbone.", "module.", ""])
def test_m3vit_checkpoint_reproduces_the_model(tmp_path, prefix):
    source = build_m3vit(MICRO_M3VIT)
    sd = _to_m3vit_layout(source, prefix)
    outer = prefix.removesuffix("backbone.")
    sd[f"{outer}decoders.semseg.conv_0.weight"] = torch.ones(4, 32, 3, 3)  # a PUP decoder: ignored
    # best_result as their training script stores it: numpy scalars (allowed by the safe loader).
    ckpt = _save(tmp_path / "checkpoint.pth.tar", sd, best_result={"multi_task_performance": np.float64(-1.5)})
    target = build_m3vit(dataclasses.replace(MICRO_M3VIT, seed=5))
    notes = load_checkpoint(target, str(ckpt), "m3vit")
    assert any("ignored 1 key" in n and "decoders" in n for n in notes)
    x = _images(MICRO_M3VIT)
    with torch.no_grad():
        for task in MICRO_M3VIT.task_names:
            assert torch.equal(target(x, task), source(x, task))


def test_cls_token_folds_into_pos_embed_without_a_class_token(tmp_path):
    source = build_m3vit(MICRO_M3VIT)
    with torch.no_grad():
        source.cls_token.normal_()
    ckpt = _save(tmp_path / "c.pth", _to_m3vit_layout(source))
    target = build_m3vit(dataclasses.replace(MICRO_M3VIT, cls_token=False))
    notes = load_checkpoint(target, str(ckpt), "m3vit")
    assert any("folded" in n for n in notes)
    x = _images(MICRO_M3VIT)
    with torch.no_grad():
        assert torch.equal(target(x, "depth"), source(x, "depth"))


def test_one_shared_gate_goes_to_every_task(tmp_path):
    source = build_m3vit(MICRO_M3VIT)
    sd = _to_m3vit_layout(source)
    for b in MICRO_M3VIT.moe_blocks:
        sd[f"module.backbone.blocks.{b}.mlp.gate.w_gate"] = sd.pop(f"module.backbone.blocks.{b}.mlp.gate.0.w_gate")
        del sd[f"module.backbone.blocks.{b}.mlp.gate.1.w_gate"]
    target = build_m3vit(MICRO_M3VIT)
    notes = load_checkpoint(target, str(_save(tmp_path / "c.pth", sd)), "m3vit")
    assert any("shared" in n for n in notes)
    for b in MICRO_M3VIT.moe_blocks:
        gates = target.blocks[b].moe.gates
        assert torch.equal(gates[0].w_gate.weight, source.blocks[b].moe.gates[0].w_gate.weight)
        assert torch.equal(gates[1].w_gate.weight, gates[0].w_gate.weight)


def test_expert_count_mismatch_is_refused_as_a_possible_rank_slice(tmp_path):
    sd = _to_m3vit_layout(build_m3vit(MICRO_M3VIT))
    for key in [k for k in sd if ".mlp.experts." in k]:
        sd[key] = sd[key][:4]
    with pytest.raises(ModelError, match=r"4 experts, the config has 8.*rank.*dim 0"):
        load_checkpoint(build_m3vit(MICRO_M3VIT), str(_save(tmp_path / "c.pth", sd)), "m3vit")


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    sd = _to_m3vit_layout(build_m3vit(MICRO_M3VIT))
    del sd["module.backbone.blocks.0.norm1.weight"]
    del sd["module.backbone.blocks.2.attn.proj.bias"]
    sd["module.backbone.gate_task_represent.fc1.weight"] = torch.zeros(3, 2)
    sd["module.backbone.pos_embed"] = torch.zeros(1, 5, 32)
    with pytest.raises(ModelError) as err:
        load_checkpoint(build_m3vit(MICRO_M3VIT), str(_save(tmp_path / "c.pth", sd)), "m3vit")
    msg = str(err.value)
    assert "2 missing key(s): blocks.0.norm1.weight, blocks.2.attn.proj.bias" in msg
    assert "1 unexpected key(s): gate_task_represent.fc1.weight" in msg
    assert "1 mis-shaped key(s): pos_embed (1, 5, 32) (model (1, 9, 32))" in msg


def test_edgemoe_format_errors_name_keys_too(tmp_path):
    from safetensors.torch import save_file

    model = build_m3vit(CONFIGS["m3vit-micro"])
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    removed = list(state)[2:9]  # in the model's order, as the message lists them
    for k in removed:
        del state[k]
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(ModelError) as err:
        load_checkpoint(model, str(tmp_path / "w.safetensors"))
    msg = str(err.value)
    assert "7 missing key(s): " + ", ".join(removed[:5]) + ", ..." in msg
    assert "Error(s) in loading" not in msg


class _Opaque:
    pass


def test_pickled_objects_are_refused_not_unpickled(tmp_path):
    torch.save({"state_dict": {}, "args": _Opaque()}, tmp_path / "c.pth")
    with pytest.raises(ModelError, match=r"weights_only=True\) refuses it .*_Opaque"):
        load_checkpoint(build_m3vit(MICRO_M3VIT), str(tmp_path / "c.pth"), "m3vit")


def test_m3vit_format_refuses_other_stems_and_task_conditioning(tmp_path):
    ckpt = _save(tmp_path / "c.pth", _to_m3vit_layout(build_m3vit(MICRO_M3VIT)))
    with pytest.raises(ModelError, match="patchify stem"):
        load_checkpoint(build_m3vit(dataclasses.replace(MICRO_M3VIT, stem="conv")), str(ckpt), "m3vit")
    with pytest.raises(ModelError, match="task-conditioned"):
        load_checkpoint(build_m3vit(dataclasses.replace(MICRO_M3VIT, task_cond_dim=8)), str(ckpt), "m3vit")
    with pytest.raises(ModelError, match="no 'pos_embed'"):
        load_checkpoint(build_m3vit(MICRO_M3VIT), str(_save(tmp_path / "d.pth", {"x.y": torch.zeros(1)})), "m3vit")


# -- config fields ---------------------------------------------------------------------------------


def test_ln_eps_reaches_every_layernorm_and_changes_the_output():
    cfg = dataclasses.replace(CONFIGS["m3vit-micro"], ln_eps=1e-2)
    model = build_m3vit(cfg)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * cfg.depth + 1 + len(cfg.tasks) and all(m.eps == 1e-2 for m in norms)
    default = build_m3vit(CONFIGS["m3vit-micro"])
    assert all(m.eps == 1e-5 for m in default.modules() if isinstance(m, torch.nn.LayerNorm))
    x = _images(cfg)
    with torch.no_grad():
        assert not torch.allclose(model(x, "semseg"), default(x, "semseg"), atol=1e-5)


def test_backbone_task_outputs_the_last_blocks_tokens():
    cfg = dataclasses.replace(CONFIGS["m3vit-micro"], tasks=(("semseg", 7), ("depth", 0)))
    model = build_m3vit(cfg)
    assert set(model.heads) == {"semseg"} and cfg.backbone_tasks == ("depth",)
    x = _images(cfg)
    with torch.no_grad():
        tokens = model.embed(x)
        for block in model.blocks:
            tokens = block(tokens, 1)
        out = model(x, "depth")
        assert out.shape == (2, cfg.num_tokens, cfg.dim)
        assert torch.equal(out, model.norm(tokens))
        assert model(x, "semseg").shape == (2, 7, *cfg.img_size)
        bare = build_m3vit(dataclasses.replace(cfg, final_norm=False))
        assert not any(k.startswith("norm.") for k in bare.state_dict())
        tokens = bare.embed(x)
        for block in bare.blocks:
            tokens = block(tokens, 1)
        assert torch.equal(bare(x, "depth"), tokens)


def test_no_class_token_parameter_token_zero_is_pos_embed():
    cfg = dataclasses.replace(CONFIGS["m3vit-micro"], cls_token=False)
    model = build_m3vit(cfg)
    assert "cls_token" not in model.state_dict()
    with torch.no_grad():
        tokens = model.embed(_images(cfg, 3))
    assert tokens.shape == (3, cfg.num_tokens, cfg.dim)
    assert torch.equal(tokens[:, 0], model.pos_embed[0, 0].expand(3, -1))


def test_bad_config_values_are_refused():
    for bad in ({"window_layout": "spiral"}, {"ln_eps": 0.0}, {"tasks": [["semseg", -1]]}, {"experts_per_task": 9}):
        with pytest.raises(ModelError, match="bad m3vit config"):
            resolve_model_config({"base": "m3vit-micro", **bad})


def resolve_model_config(raw: dict):
    """Resolve a JSON model config given as a dict (written to a temporary file)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.json"
        path.write_text(json.dumps(raw))
        return resolve_model(str(path))


# -- expert windows --------------------------------------------------------------------------------


def _windows(**kw):
    cfg = dataclasses.replace(CONFIGS["m3vit-tiny-patch"], window_layout="m3vit", **kw)
    return [cfg.expert_window(t) for t in range(len(cfg.tasks))], cfg


def test_m3vit_window_starts_accumulate_and_stop_at_the_last_expert():
    three = (("semseg", 7), ("depth", 1), ("normals", 3))
    windows, cfg = _windows(tasks=three, experts_per_task=8)
    assert cfg.m3vit_window_starts() == (0, 4, 12)
    assert windows == [tuple(range(0, 8)), tuple(range(4, 12)), tuple(range(12, 16))]
    windows, cfg = _windows(experts_per_task=8)
    assert cfg.m3vit_window_starts() == (0, 8) and windows[1] == tuple(range(8, 16))
    # 3 tasks of 6: increments int(i * 10 / 2) = 0, 5, 10 -> starts 0, 5, 15, a 1-expert window.
    with pytest.raises(ModelError, match=r"'normals' would be experts 15\.\.20, of which 1 exist"):
        _windows(tasks=three, experts_per_task=6)
    with pytest.raises(ModelError, match="2 or more tasks"):
        _windows(tasks=(("semseg", 7),), experts_per_task=8)
    even = dataclasses.replace(cfg, window_layout="even", tasks=three)
    assert [even.expert_window(t)[0] for t in range(3)] == [0, 4, 8]


def test_m3vit_windows_confine_routing():
    cfg = dataclasses.replace(
        CONFIGS["m3vit-micro"],
        tasks=(("semseg", 7), ("depth", 1), ("x", 0)),
        experts_per_task=6,
        window_layout="m3vit",
        num_experts=12,
    )  # increments int(i * 6 / 2): starts 0, 3, 9 -> windows 0..5, 3..8, 9..11
    adapter = M3ViTAdapter(build_m3vit(cfg))
    x = _images(cfg, 4).numpy()
    for t, task in enumerate(cfg.task_names):
        window = set(cfg.expert_window(t))
        assert {int(e) for experts, _ in adapter.route(x, task) for e in experts.ravel()} <= window
    assert [r.window for r in adapter.ir.moe_layers[0].routers][2] == (9, 10, 11)


# -- the Edge-MoE model and the pipeline -----------------------------------------------------------


def test_edgemoe_config_is_edge_moes_model():
    cfg = CONFIGS["m3vit-tiny-edgemoe"]
    assert (cfg.img_size, cfg.patch, cfg.stem, cfg.num_tokens, cfg.dim, cfg.heads, cfg.depth) == (
        (128, 256),
        16,
        "patch",
        129,
        192,
        3,
        12,
    )
    assert (cfg.mlp_hidden, cfg.expert_hidden, cfg.num_experts, cfg.top_k, cfg.moe_blocks) == (
        768,
        384,
        16,
        2,
        (1, 3, 5, 7, 9, 11),
    )
    assert (cfg.ln_eps, cfg.final_norm, cfg.cls_token, cfg.tasks) == (1e-6, False, False, (("semseg", 0), ("depth", 0)))
    # Raw pixels: a byte k read as k/255 then normalised is Edge-MoE's k/256 (to one float32 ulp).
    k = np.arange(256, dtype=np.float32)
    pixels = (k / 255.0 - np.asarray(RAW_PIXELS_MEAN[0], np.float32)) / np.asarray(RAW_PIXELS_STD[0], np.float32)
    assert np.abs(pixels - k / 256).max() <= 6e-8
    assert (cfg.mean, cfg.std) == (RAW_PIXELS_MEAN, RAW_PIXELS_STD)


def test_edgemoe_compile_and_verify(run_cli, tmp_path, one_torch_thread):
    out = tmp_path / "bundle"
    result = run_cli("compile", "m3vit-tiny-edgemoe", "-o", out, "--calib-samples", "2", "-q")
    assert result.exit_code == 0, result.output
    m = read_manifest(out)
    assert m["tasks"]["semseg"]["kind"] == "tokens"
    assert m["tasks"]["depth"]["output"]["shape"] == [None, 129, 192]
    assert m["input"]["preprocess"]["mean"] == [0.0, 0.0, 0.0]
    assert max(m["graphs"][f"head_{t}"]["bytes"] for t in ("semseg", "depth")) < 1024  # identity, no weights
    result = run_cli("verify", out, "--json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and {t["metric_name"] for t in report["tasks"].values()} == {"cosine_to_fp32"}


def _has_tvm() -> bool:
    import importlib.util

    return importlib.util.find_spec("tvm") is not None


@pytest.mark.parametrize(
    "target", ["onnx", pytest.param("tvm", marks=pytest.mark.skipif(not _has_tvm(), reason="TVM not installed"))]
)
def test_imported_m3vit_checkpoint_compiles_and_verifies(run_cli, tmp_path, target):
    """``--weights-format m3vit`` end to end; verify rebuilds the model from the same checkpoint."""
    source = build_m3vit(dataclasses.replace(MICRO_M3VIT, seed=9))
    ckpt = _save(tmp_path / "checkpoint.pth.tar", _to_m3vit_layout(source))
    spec = tmp_path / "model.json"
    spec.write_text(json.dumps({"base": "m3vit-micro", **_json_fields(MICRO_M3VIT)}))
    out = tmp_path / "bundle"
    args = ["compile", spec, "-o", out, "--target", target, "--weights", ckpt, "--weights-format", "m3vit", "-q"]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    src = read_manifest(out)["model"]["source"]
    assert src["weights_format"] == "m3vit" and src["weights"] == str(ckpt)
    assert src["state_sha256"] == M3ViTAdapter(source).state_sha256()
    result = run_cli("verify", out, "-q")
    assert result.exit_code == 0, result.output


def _json_fields(cfg) -> dict:
    return {"name": cfg.name, "tasks": [list(t) for t in cfg.tasks], "ln_eps": cfg.ln_eps, "final_norm": cfg.final_norm}


def test_weights_format_needs_weights(run_cli, tmp_path):
    result = run_cli("compile", "m3vit-micro", "-o", tmp_path / "b", "--weights-format", "m3vit", "-q")
    assert result.exit_code == 4
    assert "needs a checkpoint" in result.output


def test_json_model_config_takes_a_weights_format(tmp_path):
    source = build_m3vit(dataclasses.replace(MICRO_M3VIT, seed=9))
    ckpt = _save(tmp_path / "c.pth", _to_m3vit_layout(source))
    entry = resolve_model_config(
        {"base": "m3vit-micro", **_json_fields(MICRO_M3VIT), "weights": str(ckpt), "weights_format": "m3vit"}
    )
    assert entry.weights_format == "m3vit"
    model, notes = entry.build_with_notes()
    assert torch.equal(model.pos_embed, source.pos_embed) and notes == []
