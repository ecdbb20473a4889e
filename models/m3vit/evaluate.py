"""Held-out metrics of a trained M³ViT on procedural scenes, a constant baseline, and routing specialisation.

Scenes come from the held-out seed range (``scenes.HELD_OUT_START`` upwards; training never
draws there). Reported per model and for a constant predictor (the training scenes' majority
class and mean depth):

* ``semseg``: mIoU over the 7 classes (classes absent from both prediction and truth are
  skipped), pixel accuracy.
* ``depth``: RMSE, AbsRel (mean |pred - true| / true) and δ<1.25 (share of pixels with
  max(pred/true, true/pred) < 1.25; predictions clamped to >= 1e-3).
* routing: per MoE layer and task, how many experts receive >= 1% of the task's routed
  (token, slot) assignments and how many receive any, and the Jaccard overlap of the two
  tasks' expert sets.

``python -m edgemoe.models.m3vit.evaluate`` evaluates the shipped checkpoint and writes
``m3vit-tiny.metrics.json`` beside it (with the training record from ``<ckpt>.train.json``
and the checkpoint's sha256), and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edgemoe.bundle.format import sha256_file

from .configs import CONFIGS
from .model import M3ViT, build_m3vit
from .scenes import CLASSES, HELD_OUT_START, NUM_CLASSES, make_batch

HERE = Path(__file__).parent
DEFAULT_CKPT = HERE / "m3vit-tiny.safetensors"
# The tests recompute metrics on the first CHECK_SCENES held-out scenes and compare them to these.
CHECK_SCENES = 16


class _Accumulator:
    """Running confusion matrix and depth error sums."""

    def __init__(self):
        self.conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        self.sq = self.absrel = self.delta = 0.0
        self.n = 0

    def add_semseg(self, pred: np.ndarray, true: np.ndarray) -> None:
        idx = true.ravel() * NUM_CLASSES + pred.ravel()
        self.conf += np.bincount(idx, minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)

    def add_depth(self, pred: np.ndarray, true: np.ndarray) -> None:
        pred = np.maximum(pred.astype(np.float64), 1e-3)
        true = true.astype(np.float64)
        self.sq += float(((pred - true) ** 2).sum())
        self.absrel += float((np.abs(pred - true) / true).sum())
        self.delta += float((np.maximum(pred / true, true / pred) < 1.25).sum())
        self.n += true.size

    def result(self) -> dict:
        out = {}
        if self.conf.sum():
            tp = np.diag(self.conf).astype(np.float64)
            union = self.conf.sum(0) + self.conf.sum(1) - tp
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
            out["miou"] = float(np.nanmean(iou))
            out["pixel_acc"] = float(tp.sum() / self.conf.sum())
            out["iou_per_class"] = {
                c: (None if np.isnan(v) else round(float(v), 4)) for c, v in zip(CLASSES, iou, strict=True)
            }
        if self.n:
            out["depth_rmse"] = float(np.sqrt(self.sq / self.n))
            out["depth_absrel"] = float(self.absrel / self.n)
            out["depth_delta1"] = float(self.delta / self.n)
        return out


def constant_baseline(cfg, n_train: int = 256) -> tuple[int, float]:
    """Majority class and mean depth of the first ``n_train`` training scenes."""
    _, labels, depth = make_batch(range(n_train), cfg.mean, cfg.std, *cfg.img_size)
    return int(np.bincount(labels.ravel(), minlength=NUM_CLASSES).argmax()), float(depth.mean())


def _set_record(model: M3ViT, on: bool) -> None:
    for m in model.modules():
        if hasattr(m, "record"):
            m.record, m.recorded = on, None


@torch.no_grad()
def evaluate(model: M3ViT, n_scenes: int = 256, start: int = HELD_OUT_START, batch: int = 8) -> dict:
    """Metrics of ``model`` (and of the constant baseline) on held-out scenes, plus routing counts.

    Args:
        model: An M³ViT with tasks ``semseg`` and/or ``depth`` (eval mode is set here).
        n_scenes: Number of held-out scenes.
        start: First scene seed.
        batch: Scenes per forward pass.

    Returns:
        ``{"scenes", "seeds", "model", "baseline", "routing"}``; ``routing[task][layer]`` is the
        per-expert count of routed (token, slot) assignments.
    """
    cfg = model.cfg
    model.eval()
    majority, mean_depth = constant_baseline(cfg)
    acc, base = _Accumulator(), _Accumulator()
    counts = {t: {i: np.zeros(cfg.num_experts, dtype=np.int64) for i in cfg.moe_blocks} for t in cfg.task_names}
    _set_record(model, True)
    try:
        for b0 in range(start, start + n_scenes, batch):
            seeds = range(b0, min(b0 + batch, start + n_scenes))
            x, labels, depth = make_batch(seeds, cfg.mean, cfg.std, *cfg.img_size)
            xt = torch.from_numpy(x)
            for t, task in enumerate(cfg.task_names):
                y = model(xt, task).numpy()
                for i in cfg.moe_blocks:
                    gate = model.blocks[i].moe.gates[t]
                    counts[task][i] += np.bincount(gate.recorded[1].numpy().ravel(), minlength=cfg.num_experts)
                    gate.recorded = None
                if task == "semseg":
                    acc.add_semseg(y.argmax(1), labels)
                    base.add_semseg(np.full_like(labels, majority), labels)
                elif task == "depth":
                    acc.add_depth(y[:, 0], depth)
                    base.add_depth(np.full_like(depth, mean_depth), depth)
    finally:
        _set_record(model, False)
    return {
        "scenes": n_scenes,
        "seeds": [start, start + n_scenes - 1],
        "model": acc.result(),
        "baseline": {"majority_class": majority, "mean_depth": round(mean_depth, 4), **base.result()},
        "routing": {t: {str(i): c.tolist() for i, c in per.items()} for t, per in counts.items()},
    }


def specialisation(routing: dict, threshold: float = 0.01) -> list[dict]:
    """Per MoE layer: experts each task activates (>= ``threshold`` of its assignments, and > 0) and overlaps."""
    tasks = list(routing)
    rows = []
    for layer in routing[tasks[0]]:
        row: dict = {"layer": int(layer)}
        sets_thr, sets_any = {}, {}
        for t in tasks:
            c = np.asarray(routing[t][layer], dtype=np.float64)
            share = c / max(c.sum(), 1)
            sets_thr[t] = {int(e) for e in np.nonzero(share >= threshold)[0]}
            sets_any[t] = {int(e) for e in np.nonzero(c > 0)[0]}
            row[f"{t}_experts_1pct"] = len(sets_thr[t])
            row[f"{t}_experts_any"] = len(sets_any[t])
            row[f"{t}_top_share"] = round(float(share.max()), 4)
        if len(tasks) == 2:
            a, b = tasks

            def jac(x: set, y: set) -> float:
                return round(len(x & y) / max(len(x | y), 1), 4)

            row["jaccard_1pct"] = jac(sets_thr[a], sets_thr[b])
            row["jaccard_any"] = jac(sets_any[a], sets_any[b])
            row["shared_1pct"] = len(sets_thr[a] & sets_thr[b])
        rows.append(row)
    return rows


def reproduction(model: M3ViT, other: Path, config: str, n_scenes: int) -> dict:
    """Held-out metrics of a retrained checkpoint next to the shipped one, and their largest weight difference."""
    from .. import load_checkpoint

    again = build_m3vit(CONFIGS[config])
    load_checkpoint(again, str(other))
    diff = max(
        float((a - b).abs().max()) if a.is_floating_point() else float(a.ne(b).any())
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    res = evaluate(again, n_scenes)
    train_json = other.with_name(other.name.removesuffix(".safetensors") + ".train.json")
    wall = json.loads(train_json.read_text()).get("wall_s") if train_json.is_file() else None
    return {
        "checkpoint_sha256": sha256_file(other),
        "identical_weights": diff == 0.0,
        "max_abs_weight_diff": diff,
        "wall_s": wall,
        "model": res["model"],
    }


def markdown(metrics: dict) -> str:
    """README tables: metrics vs the constant baseline, and routing specialisation per layer."""
    m, b = metrics["heldout"]["model"], metrics["heldout"]["baseline"]
    lines = [
        f"Held-out scenes: {metrics['heldout']['scenes']} (seeds {metrics['heldout']['seeds'][0]}..."
        f"{metrics['heldout']['seeds'][1]})",
        "",
        "| metric | m3vit-tiny (int8 checkpoint) | constant baseline |",
        "|---|---|---|",
        f"| semseg mIoU (7 classes) ↑ | {m['miou']:.3f} | {b['miou']:.3f} |",
        f"| semseg pixel accuracy ↑ | {m['pixel_acc']:.3f} | {b['pixel_acc']:.3f} |",
        f"| depth RMSE ↓ | {m['depth_rmse']:.3f} | {b['depth_rmse']:.3f} |",
        f"| depth AbsRel ↓ | {m['depth_absrel']:.3f} | {b['depth_absrel']:.3f} |",
        f"| depth δ<1.25 ↑ | {m['depth_delta1']:.3f} | {b['depth_delta1']:.3f} |",
        "",
        "| MoE block | semseg experts ≥1% (any) | depth experts ≥1% (any) | shared ≥1% | Jaccard ≥1% (any) |",
        "|---|---|---|---|---|",
    ]
    for r in metrics["specialisation"]:
        lines.append(
            f"| {r['layer']} | {r['semseg_experts_1pct']} ({r['semseg_experts_any']}) | "
            f"{r['depth_experts_1pct']} ({r['depth_experts_any']}) | {r['shared_1pct']} | "
            f"{r['jaccard_1pct']:.2f} ({r['jaccard_any']:.2f}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate a checkpoint and write its metrics JSON."""
    ap = argparse.ArgumentParser(prog="python -m edgemoe.models.m3vit.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    ap.add_argument("--config", default="m3vit-tiny")
    ap.add_argument("--scenes", type=int, default=256, help="held-out scenes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="metrics JSON (default: <checkpoint stem>.metrics.json)")
    ap.add_argument(
        "--reproduced",
        help="a checkpoint retrained with the same command: record its held-out metrics beside the shipped ones",
    )
    args = ap.parse_args(argv)
    from .. import load_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = Path(args.checkpoint)
    model = build_m3vit(CONFIGS[args.config])
    load_checkpoint(model, str(ckpt))
    stem = ckpt.name.removesuffix(".safetensors")
    heldout = evaluate(model, args.scenes)
    check = evaluate(model, CHECK_SCENES)
    train_json = ckpt.with_name(stem + ".train.json")
    training = {}
    if train_json.is_file():
        training = {k: v for k, v in json.loads(train_json.read_text()).items() if k != "history"}
    metrics = {
        "model": args.config,
        "checkpoint": ckpt.name,
        "checkpoint_sha256": sha256_file(ckpt),
        "checkpoint_bytes": ckpt.stat().st_size,
        "training": training,
        "heldout": heldout,
        "check": {k: check[k] for k in ("scenes", "seeds", "model", "baseline")},
        "specialisation": specialisation(heldout["routing"]),
        "evaluate_command": " ".join(
            ["python -m edgemoe.models.m3vit.evaluate", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    if args.reproduced:
        rep = reproduction(model, Path(args.reproduced), args.config, args.scenes)
        rep["same_file"] = rep["checkpoint_sha256"] == metrics["checkpoint_sha256"]
        metrics["reproduction"] = rep
    out = Path(args.out) if args.out else ckpt.with_name(stem + ".metrics.json")
    out.write_text(json.dumps(metrics, indent=1) + "\n")
    print(markdown(metrics))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
