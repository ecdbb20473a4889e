"""Train an M³ViT config on procedural scenes (``semseg`` + ``depth``) and write an int8 checkpoint.

Every step draws a fresh batch of scenes (``scenes.make_batch``, seeds fixed by ``--seed`` and the
step), runs the shared trunk once and each task's routed part, and minimises

    class-weighted cross-entropy(semseg) + L1(depth) + aux * balance + mi * (-MI(task; expert))

summed over the MoE layers. ``balance`` is M³ViT's load-balancing term, cv²(importance) + cv²(load),
where per expert ``importance`` is the summed gate probability of the batch's tokens and ``load``
the probability mass of the tokens actually routed to it (top-k), cv² the squared coefficient of
variation over experts. With ``--routing mi`` (default) importance and load are summed over the
tasks before cv², so the layer as a whole stays balanced while each task is free to use a subset,
and the mutual-information term of Mod-Squad (Chen et al., CVPR 2023) pulls the tasks onto
different experts: MI = Σ_t P(t) Σ_e P(e|t) log(P(e|t) / P(e)), P(e|t) the task's mean gate
probability. That is what makes task-level pruning pay off at deployment. ``--routing per-task``
is M³ViT's original: every task balanced over all experts, so every task uses every expert.
Semseg classes are weighted by inverse square-root pixel frequency (background covers ~77 % of
pixels). AdamW with linear warm-up and cosine decay.

The checkpoint stores every weight matrix (2-D or more) as int8 with one fp32 absmax scale per
output row and everything else as fp32 (safetensors metadata ``format = edgemoe-int8-rows``);
``edgemoe.models.load_checkpoint`` dequantizes it. A ``<out>.train.json`` beside it records the
command, seed, steps, wall time and the loss curve.

Reproduce the shipped checkpoint (2 CPU threads)::

    python -m edgemoe.models.m3vit.train --steps 1500 --lr 1e-3 --seed 0 --threads 2
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # ``python models/m3vit/train.py``: run as the installed package module (relative imports).
    import runpy

    runpy.run_module("edgemoe.models.m3vit.train", run_name="__main__", alter_sys=True)
    sys.exit(0)

import argparse
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .configs import CONFIGS
from .model import M3ViT, build_m3vit
from .scenes import HELD_OUT_START, make_batch

FORMAT = "edgemoe-int8-rows"
SCALE_SUFFIX = ":scale"
DEFAULT_OUT = Path(__file__).with_name("m3vit-tiny.safetensors")


def quantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 per-output-row (symmetric absmax) copies of the weight matrices, fp32 for the rest.

    A quantized tensor ``name`` is stored as int8 plus ``name:scale`` (fp32, one per row of dim 0).
    """
    out = {}
    for name, t in state.items():
        t = t.detach().float().contiguous()
        if t.ndim >= 2 and name.endswith("weight"):
            rows = t.reshape(t.shape[0], -1)
            scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8)
            out[name] = q.reshape(t.shape).contiguous()
            out[name + SCALE_SUFFIX] = scale.contiguous()
        else:
            out[name] = t
    return out


def save_checkpoint(model: M3ViT, path: Path, meta: dict[str, str] | None = None) -> None:
    """Write the model's weights as an int8-rows safetensors file (atomically)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(quantize_state(model.state_dict()), str(tmp), metadata={"format": FORMAT, **(meta or {})})
    tmp.chmod(0o644)  # a shipped package file, readable by everyone
    tmp.replace(path)


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation (variance / mean²) of a 1-D tensor."""
    return x.float().var() / (x.float().mean() ** 2 + 1e-10)


def balance_loss(model: M3ViT, task: int) -> torch.Tensor:
    """M³ViT load-balancing loss of one task's gates (they must have recorded this forward)."""
    total = torch.zeros(())
    for i in model.cfg.moe_blocks:
        gate = model.blocks[i].moe.gates[task]
        probs, idx = gate.recorded
        gate.recorded = None
        window = list(model.cfg.expert_window(task))
        routed = torch.zeros_like(probs).scatter(-1, idx, 1.0)
        importance = probs.sum(0)[window]
        load = (probs * routed).sum(0)[window]
        total = total + cv_squared(importance) + cv_squared(load)
    return total


def mutual_information(p_e_given_t: torch.Tensor) -> torch.Tensor:
    """MI between task and expert for equiprobable tasks, from rows P(e|t) (tasks × experts)."""
    p_e = p_e_given_t.mean(0, keepdim=True)
    eps = 1e-9
    return (p_e_given_t * (torch.log(p_e_given_t + eps) - torch.log(p_e + eps))).sum(1).mean()


def joint_routing_loss(model: M3ViT) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-wide balance (importance and load summed over tasks) and MI(task; expert), summed over layers.

    Every task's gates must have recorded this forward. Returns ``(balance, mi)``.
    """
    balance, mi = torch.zeros(()), torch.zeros(())
    for i in model.cfg.moe_blocks:
        importance, load, cond = 0.0, 0.0, []
        for gate in model.blocks[i].moe.gates:
            probs, idx = gate.recorded
            gate.recorded = None
            routed = torch.zeros_like(probs).scatter(-1, idx, 1.0)
            importance = importance + probs.sum(0)
            load = load + (probs * routed).sum(0)
            cond.append(probs.mean(0))
        balance = balance + cv_squared(importance) + cv_squared(load)
        mi = mi + mutual_information(torch.stack(cond))
    return balance, mi


def class_weights(cfg, n: int = 64) -> torch.Tensor:
    """Semseg class weights ∝ 1/sqrt(pixel frequency) over the first ``n`` training scenes, mean 1."""
    labels = make_batch(range(n), cfg.mean, cfg.std, *cfg.img_size)[1]
    freq = np.bincount(labels.ravel(), minlength=dict(cfg.tasks)["semseg"]).astype(np.float64)
    w = 1.0 / np.sqrt(np.maximum(freq / freq.sum(), 1e-4))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def forward_tasks(model: M3ViT, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every task's head output; the trunk up to the first MoE layer (task-independent) runs once.

    Numerically the same as ``model(x, task)`` per task.
    """
    first = model.cfg.moe_blocks[0]
    h = model.embed(x)
    for i in range(first):
        h = model.blocks[i](h)
    h = model.blocks[first].attend(h)
    outs = {}
    for t, name in enumerate(model.cfg.task_names):
        cond = model.task_cond(t)
        blk = model.blocks[first]
        y = h + blk.moe(blk.norm2(h), t, cond)
        for blk in model.blocks[first + 1 :]:
            y = blk(y, t, cond)
        outs[name] = model.heads[name](model.norm(y))
    return outs


def task_losses(
    outs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    depth: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-task losses: cross-entropy for ``semseg`` (optionally class-weighted), L1 for ``depth``."""
    losses = {}
    if "semseg" in outs:
        losses["semseg"] = F.cross_entropy(outs["semseg"].float(), labels, weight=weights)
    if "depth" in outs:
        losses["depth"] = F.l1_loss(outs["depth"].float()[:, 0], depth)
    return losses


def scene_seeds(seed: int, step: int, batch: int) -> list[int]:
    """Training scene seeds of one step (disjoint from the held-out range)."""
    base = seed * 100_000_000 + step * batch
    seeds = list(range(base, base + batch))
    if seeds[-1] >= HELD_OUT_START:
        raise ValueError("training seeds would reach the held-out range; use a smaller --seed")
    return seeds


def train(
    config: str = "m3vit-tiny",
    steps: int = 1500,
    batch: int = 16,
    seed: int = 0,
    lr: float = 1e-3,
    warmup: float = 0.05,
    weight_decay: float = 0.05,
    aux: float = 0.01,
    mi: float = 0.1,
    routing: str = "mi",
    weighted: bool = True,
    out: Path | None = DEFAULT_OUT,
    save_every: int = 0,
    log_every: int = 10,
    log=print,
) -> tuple[M3ViT, dict]:
    """Train a config from its seeded initialisation.

    Args:
        config: Name in ``CONFIGS``.
        steps: Optimiser steps.
        batch: Scenes per step (every scene trains every task).
        seed: Seed of the model initialisation offset, dropout-free training order and scene seeds.
        lr: Peak learning rate.
        warmup: Fraction of steps of linear warm-up.
        weight_decay: AdamW weight decay (not on biases, norms, embeddings).
        aux: Coefficient of the load-balancing loss.
        mi: Coefficient of the task–expert mutual-information term (``routing="mi"`` only).
        routing: ``"mi"`` (layer-wide balance + MI, tasks specialise) or ``"per-task"`` (M³ViT's
            per-task balance, every task spreads over every expert).
        weighted: Weight semseg classes by inverse square-root frequency.
        out: Checkpoint path (None: do not write).
        save_every: Also write the checkpoint every this many steps (0: only at the end).
        log_every: Log every this many steps.
        log: Line logger.

    Returns:
        The trained model (eval mode) and a training record (losses, wall time).
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown config '{config}' (known: {', '.join(CONFIGS)})")
    if routing not in ("mi", "per-task"):
        raise ValueError(f"unknown routing loss '{routing}' (known: mi, per-task)")
    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    model = build_m3vit(cfg).train()
    if "depth" in cfg.task_names:
        # Start the depth head at the mean scene depth (L1 would need thousands of steps to get there).
        with torch.no_grad():
            sample_depth = make_batch(range(64), cfg.mean, cfg.std, *cfg.img_size)[2]
            model.heads["depth"].proj.bias.fill_(float(np.mean(sample_depth)))
    weights = class_weights(cfg) if weighted and "semseg" in cfg.task_names else None
    for m in model.modules():
        if hasattr(m, "record"):
            m.record = True
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and n.endswith("weight"))]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.999),
    )
    n_warm = max(1, int(warmup * steps))

    def lr_at(step: int) -> float:
        if step < n_warm:
            return lr * (step + 1) / n_warm
        return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, steps - n_warm)))

    history = []
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        arrays = make_batch(scene_seeds(seed, step, batch), cfg.mean, cfg.std, *cfg.img_size)
        x, labels, depth = (torch.from_numpy(a) for a in arrays)
        outs = forward_tasks(model, x)
        losses = task_losses(outs, labels, depth, weights)
        if routing == "mi":
            bal, mi_val = joint_routing_loss(model)
        else:
            bal, mi_val = sum(balance_loss(model, t) for t in range(len(cfg.tasks))), torch.zeros(())
        loss = sum(losses.values()) + aux * bal - mi * mi_val
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        rec = {"step": step + 1, "loss": loss.item(), "balance": bal.item(), "mi": mi_val.item()}
        rec.update({k: v.item() for k, v in losses.items()})
        history.append(rec)
        if log_every and ((step + 1) % log_every == 0 or step == 0 or step + 1 == steps):
            el = time.perf_counter() - t0
            parts = " ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "step")
            log(f"step {step + 1}/{steps} {parts} lr {lr_at(step):.2e} {el:.0f}s ({el / (step + 1):.2f} s/step)")
        if out is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            model.eval()
            save_checkpoint(model, out, {"config": config, "steps_done": str(step + 1), "steps": str(steps)})
            model.train()
            log(f"saved intermediate checkpoint {out} at step {step + 1}")
    wall = time.perf_counter() - t0
    for m in model.modules():
        if hasattr(m, "record"):
            m.record, m.recorded = False, None
    model.eval()
    record = {
        "config": config,
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "lr": lr,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "aux": aux,
        "mi": mi,
        "routing": routing,
        "class_weights": weighted,
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 1),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "history": history,
    }
    if out is not None:
        save_checkpoint(model, out, {"config": config, "steps_done": str(steps), "steps": str(steps)})
    return model, record


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train and write the checkpoint plus ``<out>.train.json``."""
    ap = argparse.ArgumentParser(prog="python -m edgemoe.models.m3vit.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="m3vit-tiny", help="config name (default m3vit-tiny)")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16, help="scenes per step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss coefficient")
    ap.add_argument("--mi", type=float, default=0.1, help="task-expert mutual-information coefficient")
    ap.add_argument("--routing", choices=("mi", "per-task"), default="mi", help="routing loss (see above)")
    ap.add_argument("--no-class-weights", action="store_true", help="plain (unweighted) semseg cross-entropy")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="checkpoint path (.safetensors)")
    ap.add_argument("--save-every", type=int, default=50, help="intermediate checkpoint period in steps (0: off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    _, record = train(
        args.config,
        args.steps,
        args.batch,
        args.seed,
        args.lr,
        aux=args.aux,
        mi=args.mi,
        routing=args.routing,
        weighted=not args.no_class_weights,
        out=out,
        save_every=args.save_every,
    )
    record["command"] = "python -m edgemoe.models.m3vit.train " + " ".join(argv_list)
    side = out.with_name(out.name.removesuffix(".safetensors") + ".train.json")
    side.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} and {side} in {record['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
