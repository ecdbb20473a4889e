"""Import checkpoints saved by the public M³ViT training code (VITA-Group/M3ViT) into :class:`M3ViT`.

Their training script saves ``{"epoch", "backbone", "state_dict", "best_result", "optimizer"}`` with
``torch.save``; the model is a ``MultiTaskModel(backbone, decoders)`` under DDP, so backbone keys
carry a ``module.backbone.`` prefix (``backbone.``, ``module.`` and none are accepted too). Their
backbone (``VisionTransformerMoE``) maps to this model as:

==================================================  ==================================================
M³ViT                                               edgemoe
==================================================  ==================================================
``patch_embed.proj.{weight,bias}``                  ``patch_embed.{weight,bias}`` (patch stem)
``cls_token``, ``pos_embed``                        the same (without a class token in the config,
                                                    ``cls_token`` is folded into ``pos_embed[0]``)
``blocks.i.{norm1,norm2,attn.qkv,attn.proj}.*``     the same
``blocks.i.mlp.{fc1,fc2}.*`` (dense blocks)         the same
``blocks.i.mlp.experts.htoh4.weight`` (E, H, D)     ``blocks.i.moe.experts.e.fc1.weight`` = ``[e]``
``blocks.i.mlp.experts.htoh4.bias`` (E, H)          ``blocks.i.moe.experts.e.fc1.bias``
``blocks.i.mlp.experts.h4toh.{weight,bias}``        ``blocks.i.moe.experts.e.fc2.*``
``blocks.i.mlp.gate.t.w_gate`` (D, E)               ``blocks.i.moe.gates.t.w_gate.weight`` (transposed)
``blocks.i.mlp.gate.w_gate`` (one shared gate)      every task's gate
==================================================  ==================================================

Their decoders (PUP heads: conv/SyncBN/upsampling stacks) have no counterpart and are ignored with a
note; head parameters in edgemoe's own layout (``heads.<task>.*`` beside the backbone) are taken. The
gates' ``w_gate_aux`` and ``head`` (training-only losses) are ignored too. Task-conditioned gates
(their ``gate_task_represent``: fc-GELU-fc-LayerNorm) differ from edgemoe's task embedding and are
refused. Expert windows (``regu_experts_fromtask``) are not in the state dict: give the config
``experts_per_task`` and ``window_layout="m3vit"``.
"""

from __future__ import annotations

import re

import torch

from edgemoe.errors import ModelError

from .model import M3ViT

PREFIXES = ("module.backbone.", "backbone.", "module.", "")
# Modules of their MultiTaskModel beside the backbone (models/models.py): not imported.
OUTSIDE_BACKBONE = ("decoders.", "decoder.", "tam_model")
_EXPERTS = re.compile(r"blocks\.(\d+)\.mlp\.experts\.(htoh4|h4toh)\.(weight|bias)")
_GATE = re.compile(r"blocks\.(\d+)\.mlp\.gate\.(?:(\d+)\.)?(w_gate|w_gate_aux|head\..+)")


def from_m3vit(raw: object, model: M3ViT) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename an M³ViT checkpoint's tensors to ``model``'s state-dict keys.

    Keys with no counterpart are passed through under their M³ViT name (after the prefix), so the
    caller's strict check names them as unexpected.

    Args:
        raw: What ``torch.load`` returned: the training script's dict, or a bare state dict.
        model: The model to load into (its config says which blocks are MoE, tasks, experts).

    Returns:
        The renamed state dict and notes on what was ignored or folded.

    Raises:
        ModelError: Not an M³ViT backbone, an expert count that differs from the config (maybe one
            rank's slice), a conv stem or task-conditioned gates in the config.
    """
    cfg = model.cfg
    state = raw.get("state_dict") if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict) else raw
    if not isinstance(state, dict):
        raise ModelError(f"not an M³ViT checkpoint: expected a dict with a 'state_dict', got {type(raw).__name__}")
    prefix = next((p for p in PREFIXES if f"{p}pos_embed" in state), None)
    if prefix is None:
        shown = ", ".join(list(map(str, state))[:5])
        raise ModelError(
            f"not an M³ViT backbone: no 'pos_embed' under the prefixes {', '.join(repr(p) for p in PREFIXES)} "
            f"(first keys: {shown})"
        )
    if cfg.stem != "patch":
        raise ModelError(f"{cfg.name}: M³ViT checkpoints have a patchify stem; the config has stem '{cfg.stem}'")
    if cfg.task_cond_dim:
        raise ModelError(
            f"{cfg.name}: task-conditioned gates are not importable (M³ViT's gate_task_represent is "
            "fc-GELU-fc-LayerNorm, edgemoe's task embedding fc-ReLU-fc); use one gate per task (task_cond_dim 0)"
        )
    outer = prefix.removesuffix("backbone.") if prefix.endswith("backbone.") else None
    out: dict[str, torch.Tensor] = _Once()
    ignored: list[str] = []
    notes: list[str] = []
    cls_token = None
    shared_gate = False
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value  # the strict check names it
        elif outer is not None and not key.startswith(prefix):
            rest = key[len(outer) :] if key.startswith(outer) else key
            if rest.startswith("heads."):
                out[rest] = value
            else:
                ignored.append(key)
        else:
            rest = key[len(prefix) :] if key.startswith(prefix) else key
            if outer is None and rest.startswith(OUTSIDE_BACKBONE):
                ignored.append(key)
            elif rest.startswith("heads."):
                out[rest] = value
            elif rest == "cls_token" and not cfg.cls_token:
                cls_token = value
            else:
                mapped = _map_backbone(rest, value, model, out, ignored, key)
                if mapped is None:
                    out[rest] = value
                shared_gate = shared_gate or mapped == "shared gate"
    out = dict(out)  # renamed; the folds below replace entries on purpose
    pos_embed = out.get("pos_embed")
    if cls_token is not None and isinstance(pos_embed, torch.Tensor) and cls_token.numel() == pos_embed.shape[-1]:
        # Token 0 is cls_token + pos_embed[0]; without a class token the model adds a zero token, so
        # the sum moves into pos_embed[0] (the same fp32 addition, done once here).
        pos = out["pos_embed"].clone()
        pos[:, 0] = pos[:, 0] + cls_token.reshape(-1).to(pos.dtype)
        out["pos_embed"] = pos
        notes.append("cls_token folded into pos_embed[0] (the config has no class token)")
    elif cls_token is not None:
        out["cls_token"] = cls_token
    if shared_gate:
        notes.append("one gate shared by all tasks (mlp.gate.w_gate): copied to every task's gate")
    no_bias = []
    for i in range(cfg.depth):
        weight = out.get(f"blocks.{i}.attn.qkv.weight")
        if isinstance(weight, torch.Tensor) and f"blocks.{i}.attn.qkv.bias" not in out:
            out[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
            no_bias.append(i)
    if no_bias:
        notes.append(f"no attn.qkv.bias in blocks {no_bias} (trained with qkv_bias=False): zeros used")
    if ignored:
        roots = sorted({k.split(".")[1] if k.startswith("module.") else k.split(".")[0] for k in ignored})
        notes.append(
            f"ignored {len(ignored)} key(s) outside the backbone or used only in training "
            f"({', '.join(roots[:5])}{', ...' if len(roots) > 5 else ''}): M³ViT's decoders are not imported"
        )
    return out, notes


class _Once(dict):
    """The renamed state dict while it fills: two checkpoint keys that map to one name are refused.

    E.g. ``module.backbone.pos_embed`` beside a bare ``pos_embed``, or ``patch_embed.proj.weight``
    beside ``patch_embed.weight``: one would replace the other silently.
    """

    def __setitem__(self, key: str, value) -> None:
        if key in self:
            raise ModelError(f"the checkpoint names {key} twice (under two prefixes or spellings): which one is meant?")
        super().__setitem__(key, value)


def _map_backbone(
    key: str, value: torch.Tensor, model: M3ViT, out: dict, ignored: list[str], original: str
) -> str | None:
    """Put one backbone tensor under its edgemoe name(s) into ``out``.

    Returns:
        What it was (``"shared gate"`` for a gate shared by all tasks), or None: no mapping, the
        caller keeps the key as it is (fine for keys named alike: norms, attention, dense MLPs).
    """
    cfg = model.cfg
    if key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        out[key.replace(".proj", "")] = value
        return "patch embedding"
    m = _EXPERTS.fullmatch(key)
    if m and int(m[1]) in cfg.moe_blocks:
        block, linear, kind = int(m[1]), m[2], m[3]
        if value.shape[0] != cfg.num_experts:
            raise ModelError(
                f"{original}: {value.shape[0]} experts, the config has {cfg.num_experts}. An expert-parallel "
                "M³ViT checkpoint holds one rank's slice of the experts per file (<rank>.pth); concatenate "
                "the ranks' mlp.experts tensors on dim 0 into one state dict first"
            )
        fc = "fc1" if linear == "htoh4" else "fc2"
        for e in range(cfg.num_experts):
            out[f"blocks.{block}.moe.experts.{e}.{fc}.{kind}"] = value[e].clone()
        return "experts"
    m = _GATE.fullmatch(key)
    if m and int(m[1]) in cfg.moe_blocks:
        block, task, what = int(m[1]), m[2], m[3]
        if what != "w_gate":  # w_gate_aux / head: training-only activations and losses
            ignored.append(original)
            return "training only"
        if task is not None and int(task) >= len(cfg.tasks):
            return None
        for t in range(len(cfg.tasks)) if task is None else [int(task)]:
            out[f"blocks.{block}.moe.gates.{t}.w_gate.weight"] = value.t().contiguous()
        return "shared gate" if task is None else "gate"
    return None
