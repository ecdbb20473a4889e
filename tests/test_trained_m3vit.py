"""The shipped trained m3vit-tiny: checkpoint integrity, held-out metrics, scenes, training, PNG demo."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgemoe.bundle.format import sha256_file
from edgemoe.errors import InputError
from edgemoe.models import load_checkpoint, resolve_model
from edgemoe.models.m3vit import CONFIGS, build_m3vit
from edgemoe.models.m3vit import scenes as S
from edgemoe.models.m3vit.evaluate import CHECK_SCENES, evaluate, specialisation
from edgemoe.models.m3vit.train import FORMAT, forward_tasks, save_checkpoint, train
from edgemoe.runtime.images import input_image, output_image

HERE = Path(__file__).resolve().parents[1] / "models" / "m3vit"
CKPT = HERE / "m3vit-tiny.safetensors"
METRICS = HERE / "m3vit-tiny.metrics.json"


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads(METRICS.read_text())


@pytest.fixture(scope="module")
def trained():
    return resolve_model("m3vit-tiny").build()


def test_checkpoint_is_the_recorded_one(metrics):
    from safetensors import safe_open

    assert metrics["checkpoint_sha256"] == sha256_file(CKPT)
    assert CKPT.stat().st_size <= 30 * 2**20
    with safe_open(str(CKPT), framework="pt") as f:
        assert f.metadata()["format"] == FORMAT
        assert f.get_tensor("blocks.0.attn.qkv.weight").dtype == torch.int8


def test_registry_loads_the_dequantized_checkpoint(trained):
    entry = resolve_model("m3vit-tiny")
    assert entry.weights == str(CKPT)
    assert resolve_model("m3vit-tiny-random").weights is None
    w = trained.blocks[3].moe.experts[5].fc1.weight.detach()
    # Each row is int8 levels times one scale: at most 255 distinct values, all multiples of the row scale.
    scale = w.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-3)
    rand = build_m3vit(CONFIGS["m3vit-tiny-random"])
    assert not torch.allclose(rand.blocks[3].moe.experts[5].fc1.weight, w)


def test_heldout_metrics_match_the_record_and_beat_the_baseline(trained, metrics):
    got = evaluate(trained, CHECK_SCENES)
    rec = metrics["check"]
    assert got["seeds"] == rec["seeds"] and got["seeds"][0] >= S.HELD_OUT_START
    for key in ("miou", "pixel_acc", "depth_rmse", "depth_absrel", "depth_delta1"):
        assert got["model"][key] == pytest.approx(rec["model"][key], abs=5e-3), key
        assert got["baseline"][key] == pytest.approx(rec["baseline"][key], abs=1e-6), key
    m, b = got["model"], got["baseline"]
    # Far better than the constant predictor on both tasks, and every class is found.
    assert m["miou"] > b["miou"] + 0.5
    assert m["pixel_acc"] > b["pixel_acc"] + 0.1
    assert min(m["iou_per_class"].values()) > 0.4
    assert m["depth_rmse"] < 0.4 * b["depth_rmse"]
    assert m["depth_absrel"] < 0.2 * b["depth_absrel"]
    assert m["depth_delta1"] > b["depth_delta1"] + 0.7
    full = metrics["heldout"]
    assert full["scenes"] >= 200 and full["model"]["miou"] > full["baseline"]["miou"] + 0.5
    assert full["model"]["depth_rmse"] < 0.4 * full["baseline"]["depth_rmse"]


def test_routing_specialises_by_task(trained, metrics):
    """Each task routes to its own subset of experts on held-out scenes (recomputed, and as recorded)."""
    rows = specialisation(evaluate(trained, CHECK_SCENES)["routing"])
    assert len(rows) == len(trained.cfg.moe_blocks)
    for rows_ in (rows, metrics["specialisation"]):
        for r in rows_:
            for task in ("semseg", "depth"):
                assert 2 <= r[f"{task}_experts_1pct"] <= 12, r
            assert r["jaccard_1pct"] <= 0.25, r
    # The deployed bundle carries that: a task's pruned expert set is well under all 16 experts.
    assert sum(r["semseg_experts_1pct"] + r["depth_experts_1pct"] for r in rows) <= 1.5 * 16 * len(rows)


def test_scenes_are_deterministic_and_consistent():
    a, b, c = S.make_scene(123), S.make_scene(123), S.make_scene(124)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    image, labels, depth = a
    assert image.shape == (128, 256, 3) and image.dtype == np.uint8
    assert labels.shape == (128, 256) and labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 7
    assert depth.dtype == np.float32 and depth.min() >= S.NEAR * 0.99 and depth.max() <= S.FAR
    assert len(np.unique(labels)) > 1  # shapes were drawn
    # Shapes carry one constant depth each; the ground gets farther towards the top.
    assert depth[-1].mean() < depth[len(depth) // 2].mean()
    cfg = CONFIGS["m3vit-tiny"]
    x, lab, dep = S.make_batch([123, 124], cfg.mean, cfg.std)
    assert x.shape == (2, 3, 128, 256) and x.dtype == np.float32
    ref = (image.astype(np.float32) / 255 - np.array(cfg.mean, np.float32)) / np.array(cfg.std, np.float32)
    assert np.allclose(x[0], ref.transpose(2, 0, 1), atol=1e-6)
    assert np.array_equal(lab[1], c[1]) and np.array_equal(dep[1], c[2])


def test_smoke_training_decreases_the_loss_and_roundtrips(tmp_path):
    model, record = train("m3vit-micro", steps=60, batch=8, lr=3e-3, out=tmp_path / "m.safetensors", log_every=0)
    losses = [h["semseg"] + h["depth"] for h in record["history"]]
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])
    assert all(np.isfinite(h["balance"]) and h["balance"] >= 0 for h in record["history"])
    # The shared-trunk training forward is the model's own forward, per task.
    x = torch.from_numpy(S.make_batch([1, 2], model.cfg.mean, model.cfg.std, *model.cfg.img_size)[0])
    with torch.no_grad():
        outs = forward_tasks(model, x)
        for task, y in outs.items():
            assert torch.equal(y, model(x, task))
    # The int8-rows checkpoint loads back within the quantization error, and gates stop recording.
    loaded = build_m3vit(CONFIGS["m3vit-micro"])
    load_checkpoint(loaded, str(tmp_path / "m.safetensors"))
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        if p.ndim >= 2 and name.endswith("weight"):
            rows = p.reshape(p.shape[0], -1)
            bound = rows.abs().amax(1) / 127 / 2 + 1e-7
            assert ((rows - q.reshape(rows.shape)).abs() <= bound[:, None]).all(), name
        else:
            assert torch.equal(p, q), name
    assert all(not getattr(m, "record", False) for m in model.modules())


def test_int8_save_is_small(tmp_path):
    model = build_m3vit(CONFIGS["m3vit-micro"])
    save_checkpoint(model, tmp_path / "q.safetensors")
    fp32 = sum(t.numel() * 4 for t in model.state_dict().values())
    assert (tmp_path / "q.safetensors").stat().st_size < 0.4 * fp32


def test_run_png_writes_pictures(run_cli, bundle_factory, tmp_path):
    scene = tmp_path / "scene.png"
    assert S.main(["--png", str(scene), "--seed", "7", "--labels-png", str(tmp_path / "t.png")]) == 0
    bundle = bundle_factory("m3vit-micro")
    for task, mode in (("semseg", "RGB"), ("depth", "L")):
        res = run_cli("run", bundle, "--task", task, "--input", scene, "--png", tmp_path / "pics", "--json")
        assert res.exit_code == 0, res.stderr
        out = json.loads(res.stdout)
        assert sorted(Path(p).name for p in out["png_files"]) == sorted(["input.png", f"{task}.png"])
        with Image.open(tmp_path / "pics" / f"{task}.png") as im:
            assert im.size == (64, 32) and im.mode == mode
    with Image.open(tmp_path / "pics" / "input.png") as im, Image.open(scene) as src:
        assert im.size == (64, 32) and im.mode == "RGB"
        # De-normalised input is the scene resized to the model's input size.
        want = np.asarray(src.convert("RGB").resize((64, 32), Image.BILINEAR), dtype=np.int16)
        assert np.abs(np.asarray(im, dtype=np.int16) - want).max() <= 1


def test_png_rejects_non_image_arrays():
    with pytest.raises(InputError, match="image-like"):
        input_image(np.zeros((1, 5, 4, 4), np.float32), {})
    with pytest.raises(InputError, match="dense"):
        output_image(np.zeros((1, 7), np.float32))
    # Class maps use the palette; single channels become greyscale with small values bright.
    y = np.zeros((1, 3, 2, 2), np.float32)
    y[0, 2] = 1
    assert output_image(y).shape == (2, 2, 3)
    d = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], np.float32)
    assert output_image(d)[0, 0] == 255 and output_image(d)[1, 1] == 0
