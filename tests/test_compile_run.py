import numpy as np
import pytest
import torch
from helpers import read_manifest
from safetensors.torch import save_file

from edgemoe.bundle import sample_input
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.errors import ConfigError
from edgemoe.frontends.m3vit import M3ViTAdapter
from edgemoe.models import resolve_model
from edgemoe.runtime import Session
from edgemoe.tools.verify_bundle import verify_bundle

MODELS = [
    "m3vit-micro",
    "m3vit-micro-cond",
    "m3vit-micro-windows",
    pytest.param("m3vit-tiny", marks=pytest.mark.slow),
    pytest.param("m3vit-tiny-cond", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model", MODELS)
def test_bundle_matches_pytorch_for_every_task(bundle_factory, model):
    bundle = bundle_factory(model)
    rep = verify_bundle(bundle, samples=2, seed=3, timing_runs=1)
    assert set(rep.tasks) == {"semseg", "depth"}
    for task, r in rep.tasks.items():
        assert r.max_abs_error <= 1e-4, (task, r)
        assert r.reference_max_abs > 0.1  # the comparison is not between two near-zero outputs
        assert r.passed


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch(bundle_factory, batch):
    bundle = bundle_factory("m3vit-micro-cond")
    adapter = M3ViTAdapter(resolve_model("m3vit-micro-cond").build())
    session = Session(bundle, "depth")
    x = sample_input(session.input_spec, batch=batch, seed=11)
    keep = {i: tuple(s) for i, s in enumerate(read_manifest(bundle)["tasks"]["depth"]["experts"])}
    np.testing.assert_allclose(session.run(x), adapter.reference(x, "depth", keep), atol=1e-4, rtol=0)


def test_single_task_bundle_and_default_task(bundle_factory):
    bundle = bundle_factory("m3vit-micro", tasks=("depth",))
    m = read_manifest(bundle)
    assert list(m["tasks"]) == ["depth"]
    assert not any(g.get("task") == "semseg" for g in m["graphs"].values())
    session = Session(bundle)  # the only task is the default
    assert session.task == "depth"


def test_one_expert_kernel_per_shape(bundle_factory):
    m = read_manifest(bundle_factory("m3vit-tiny"))
    kernels = {layer["kernel"] for layer in m["moe_layers"]}
    assert kernels == {"expert_kernel_192x384"}
    assert sum(g["kind"] == "expert_kernel" for g in m["graphs"].values()) == 1


def _skewed_checkpoint(path):
    """m3vit-micro whose semseg gate in MoE layer 0 can never pick experts 4..7.

    norm2 of block 1 is made (almost) constant (weight 0.01, bias 1) so every token's gate input
    is close to +1, and the gate rows of experts 4..7 are set to -1: their logits sit near -32 while
    experts 0..3 stay near their random values.
    """
    model = resolve_model("m3vit-micro").build()
    with torch.no_grad():
        block = model.blocks[1]
        block.norm2.weight.fill_(0.01)
        block.norm2.bias.fill_(1.0)
        block.moe.gates[0].w_gate.weight[4:] = -1.0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_pruning_drops_unused_experts_and_stays_exact(tmp_path):
    ckpt = tmp_path / "skewed.safetensors"
    _skewed_checkpoint(ckpt)
    pruned = compile_model(CompileConfig("m3vit-micro", weights=str(ckpt)), tmp_path / "pruned")
    kept = pruned["tasks"]["semseg"]["experts"][0]
    assert kept and set(kept) <= {0, 1, 2, 3}
    assert pruned["calibration"]["pruned"] is True
    counts = pruned["tasks"]["semseg"]["expert_counts"][0]
    assert all(counts[e] == 0 for e in range(8) if e not in kept)

    full = compile_model(CompileConfig("m3vit-micro", weights=str(ckpt), prune=False), tmp_path / "full")
    assert full["tasks"]["semseg"]["experts"][0] == list(range(8))

    rep = verify_bundle(tmp_path / "pruned", samples=2, timing_runs=1)
    for r in rep.tasks.values():
        assert r.max_abs_error <= 1e-4
        assert r.max_abs_error_unpruned <= 1e-4  # pruned experts were never chosen here either
    session = Session(tmp_path / "pruned", "semseg")
    session.run(sample_input(session.input_spec, 2, 5))
    assert set(session.loaded_experts[0]) <= set(kept)


def test_verify_reports_pruning_cost_separately(tmp_path):
    """Calibrating on one input prunes experts other inputs need: masked error stays tiny, unpruned does not."""
    compile_model(CompileConfig("m3vit-micro", calib_samples=1), tmp_path / "b")
    m = read_manifest(tmp_path / "b")
    kept = sum(len(s) for t in m["tasks"].values() for s in t["experts"])
    rep = verify_bundle(tmp_path / "b", samples=4, timing_runs=1)
    for r in rep.tasks.values():
        assert r.max_abs_error <= 1e-4
    if kept < 2 * 16:  # something was pruned: the unpruned comparison must see it
        assert max(r.max_abs_error_unpruned for r in rep.tasks.values()) > 1e-4


def test_prune_below_drops_rarely_used_experts(tmp_path):
    """Experts under the share threshold leave the task's set; the masked bundle stays exact."""
    full = compile_model(CompileConfig("m3vit-micro", calib_samples=4), tmp_path / "all")
    counts = np.asarray(full["tasks"]["semseg"]["expert_counts"][0], dtype=np.float64)
    share = counts / counts.sum()
    cut = float(np.sort(share[share > 0])[1]) + 1e-9  # drops the two least used experts
    thin = compile_model(CompileConfig("m3vit-micro", calib_samples=4, prune_below=cut), tmp_path / "thin")
    kept = thin["tasks"]["semseg"]["experts"][0]
    assert kept == [e for e in range(len(share)) if share[e] >= cut]
    assert len(kept) < len(full["tasks"]["semseg"]["experts"][0])
    for r in verify_bundle(tmp_path / "thin", samples=2, timing_runs=1).tasks.values():
        assert r.max_abs_error <= 1e-4
    with pytest.raises(ConfigError, match="no expert"):
        compile_model(CompileConfig("m3vit-micro", calib_samples=4, prune_below=0.99), tmp_path / "none")
    assert not (tmp_path / "none").exists()
