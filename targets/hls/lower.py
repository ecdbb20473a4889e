"""Lower a captured model to the accelerator: its tensors in the kernels' layout, and the design skeleton.

The HLS kernels implement the M³ViT family (task-level MoE ViT): a patch or conv stem, pre-norm
blocks of multi-head attention and a dense MLP or a task-gated MoE of GELU experts, an optional
final norm, and per task a LayerNorm + linear pixel head or the backbone tokens. Everything else is
refused with what it lacks. BatchNorm folds into the stem's convolutions, a task embedding into a
per-task gate bias, and a non-power-of-two attention scale into the query weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...errors import TargetError
from .design import Design


@dataclass(frozen=True)
class Lowered:
    """A model in the accelerator's terms, before fixed point.

    Attributes:
        design: The design skeleton (no types, tiles or layout yet).
        params: Dense tensors by name (float64), with their tensor class.
        experts: Per MoE layer, per kept expert, its tensors (float64): ``w1`` (hidden, dim),
            ``b1``, ``w2`` (hidden, dim), ``b2``.
    """

    design: Design
    params: dict[str, tuple[np.ndarray, str]]
    experts: dict[tuple[int, int], dict[str, np.ndarray]]


def _refuse(model_name: str, family: str, missing: list[str]) -> TargetError:
    return TargetError(
        f"target hls: the HLS kernels cannot express {model_name} ({family}): missing "
        + "; ".join(missing)
        + ". They implement M³ViT-style task-level MoE ViTs (models of the m3vit family); use --target onnx or tvm"
    )


def lower(captured, expert_sets, plan_experts) -> Lowered:
    """Lower the captured model.

    Args:
        captured: The captured model (its adapter holds the torch module).
        expert_sets: Per task, per MoE layer, the kept experts.
        plan_experts: Per MoE layer, the experts shipped (the union over the built tasks).

    Raises:
        TargetError: A model the kernels cannot express, naming what is missing.
    """
    ir = captured.ir
    if ir.family != "m3vit":
        missing = []
        if ir.granularity == "token":
            missing.append("token-routed MoE (one router for all tasks, per-token top-k over a sequence)")
        if ir.input.dtype.startswith("int"):
            missing.append("token-id inputs (embedding tables)")
        acts = {layer.expert.activation for layer in ir.moe_layers}
        if acts - {"gelu"}:
            missing.append(f"{'/'.join(sorted(acts - {'gelu'}))} experts (the expert unit is Linear-GELU-Linear)")
        if any(layer.shared_experts for layer in ir.moe_layers):
            missing.append("shared experts")
        missing.append(f"its '{ir.family}' blocks (attention variants, norms) in the kernel library")
        raise _refuse(ir.name, ir.family, missing)
    model = captured.adapter.model
    cfg = model.cfg
    import torch

    def arr(t) -> np.ndarray:
        return t.detach().to(torch.float64).cpu().numpy().copy()

    params: dict[str, tuple[np.ndarray, str]] = {}
    eps: dict[str, float] = {}
    stem_channels: list[int] = []
    stem = cfg.stem
    if stem == "patch":
        params["stem.0.w"] = (arr(model.patch_embed.weight), "embed")
        params["stem.0.b"] = (arr(model.patch_embed.bias), "bias")
    else:
        layers = list(model.patch_embed.layers)
        i = 0
        for j in range(0, len(layers) - 1, 3):
            conv, bn = layers[j], layers[j + 1]
            scale = arr(bn.weight) / np.sqrt(arr(bn.running_var) + bn.eps)
            w = arr(conv.weight) * scale[:, None, None, None]
            b = arr(bn.bias) - arr(bn.running_mean) * scale
            params[f"stem.{i}.w"], params[f"stem.{i}.b"] = (w, "embed"), (b, "bias")
            stem_channels.append(int(w.shape[0]))
            i += 1
        proj = layers[-1]
        params[f"stem.{i}.w"] = (arr(proj.weight), "embed")
        params[f"stem.{i}.b"] = (arr(proj.bias), "bias")
    if model.cls_token is not None:
        params["cls"] = (arr(model.cls_token).reshape(-1), "act")
    params["pos"] = (arr(model.pos_embed)[0], "act")
    head_dim = cfg.dim // cfg.heads
    log2 = math.log2(head_dim) / 2
    scale_shift = int(log2) if log2 == int(log2) else -1
    for b, block in enumerate(model.blocks):
        p = f"b{b}"
        for ln, mod in (("ln1", block.norm1), ("ln2", block.norm2)):
            params[f"{p}.{ln}.g"], params[f"{p}.{ln}.b"] = (arr(mod.weight), "norm"), (arr(mod.bias), "norm")
            eps[f"{p}.{ln}"] = float(mod.eps)
        qkv_w, qkv_b = arr(block.attn.qkv.weight), arr(block.attn.qkv.bias)
        if scale_shift < 0:  # fold the scale into q: the kernel then needs no multiplier for it
            qkv_w[: cfg.dim] *= block.attn.scale
            qkv_b[: cfg.dim] *= block.attn.scale
        elif abs(block.attn.scale - 2.0**-scale_shift) > 1e-12:
            raise TargetError(f"target hls: block {b} has attention scale {block.attn.scale}, not head_dim**-0.5")
        params[f"{p}.qkv.w"], params[f"{p}.qkv.b"] = (qkv_w, "weight"), (qkv_b, "attn_bias")
        params[f"{p}.proj.w"] = (arr(block.attn.proj.weight), "weight")
        params[f"{p}.proj.b"] = (arr(block.attn.proj.bias), "attn_bias")
        if not block.is_moe:
            for fc in ("fc1", "fc2"):
                linear = getattr(block.mlp, fc)
                params[f"{p}.{fc}.w"] = (arr(linear.weight), "weight")
                params[f"{p}.{fc}.b"] = (arr(linear.bias), "bias")
    if cfg.final_norm:
        params["norm.g"], params["norm.b"] = (arr(model.norm.weight), "norm"), (arr(model.norm.bias), "norm")
        eps["norm"] = float(model.norm.eps)
    tasks = tuple(t for t in cfg.task_names if t in captured.tasks)
    windows, kept = [], []
    for ti, task in enumerate(tasks):
        t = cfg.task_names.index(task)
        cond = model.task_cond(t)
        win, kp = [], []
        for li, blk in enumerate(cfg.moe_blocks):
            gate = model.blocks[blk].moe.gates[t]
            w = arr(gate.w_gate.weight)
            bias = np.zeros(w.shape[0])
            if cond is not None:  # the task embedding is constant per task: a bias on the logits
                bias = w[:, cfg.dim :] @ arr(cond)
                w = w[:, : cfg.dim]
            params[f"gate{ti}.{li}.w"], params[f"gate{ti}.{li}.b"] = (w, "weight"), (bias, "bias")
            win.append(tuple(int(e) for e in np.nonzero(np.isfinite(arr(gate.window_bias)))[0]))
            kp.append(tuple(int(e) for e in expert_sets.kept[task][li]))
        windows.append(tuple(win))
        kept.append(tuple(kp))
        ch = dict(cfg.tasks)[task]
        if ch:
            head = model.heads[task]
            params[f"head{ti}.ln.g"] = (arr(head.norm.weight), "norm")
            params[f"head{ti}.ln.b"] = (arr(head.norm.bias), "norm")
            eps[f"head{ti}.ln"] = float(head.norm.eps)
            params[f"head{ti}.w"] = (arr(head.proj.weight), "weight")
            params[f"head{ti}.b"] = (arr(head.proj.bias), "bias")
    experts = {}
    for li, blk in enumerate(cfg.moe_blocks):
        for e in plan_experts[li]:
            ex = model.blocks[blk].moe.experts[e]
            experts[(li, e)] = {
                "w1": arr(ex.fc1.weight),
                "b1": arr(ex.fc1.bias),
                "w2": arr(ex.fc2.weight).T.copy(),
                "b2": arr(ex.fc2.bias),
            }
    design = Design(
        name=cfg.name,
        in_chans=cfg.in_chans,
        img_size=tuple(cfg.img_size),
        patch=cfg.patch,
        stem=stem,
        stem_channels=tuple(stem_channels),
        dim=cfg.dim,
        heads=cfg.heads,
        depth=cfg.depth,
        mlp_hidden=cfg.mlp_hidden,
        expert_hidden=cfg.expert_hidden,
        num_experts=cfg.num_experts,
        top_k=cfg.top_k,
        moe_blocks=tuple(cfg.moe_blocks),
        tasks=tasks,
        head_channels=tuple(dict(cfg.tasks)[t] for t in tasks),
        cls_token=model.cls_token is not None,
        final_norm=bool(cfg.final_norm),
        scale_shift=scale_shift,
        eps=eps,
        windows=tuple(windows),
        kept=tuple(kept),
        types={},
    )
    return Lowered(design, params, experts)
