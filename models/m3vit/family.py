"""The m3vit family as the model registry sees it: named configs and a builder."""

from __future__ import annotations

import dataclasses

from .. import normalize_dataclass

NAME = "m3vit"

DESCRIPTIONS = {
    "m3vit-tiny": "Edge-MoE FPGA config + conv stem: 3x128x256, dim 192, 12 blocks, 16 experts, top-2, trained",
    "m3vit-tiny-random": "m3vit-tiny with seeded random weights (no checkpoint)",
    "m3vit-tiny-patch": "m3vit-tiny with the plain 16x16 patchify stem, seeded random weights",
    "m3vit-small": "dim 384, 6 heads, 12 blocks, 16 experts, top-4",
    "m3vit-micro": "tiny test model: 3x32x64, dim 32, 4 blocks, 8 experts, top-2",
    "m3vit-micro-cond": "m3vit-micro with task-conditioned gating",
    "m3vit-micro-windows": "m3vit-micro with per-task expert windows of 4",
    "m3vit-tiny-cond": "m3vit-tiny with task-conditioned gating",
    "m3vit-tiny-edgemoe": "Edge-MoE's model exactly: patch stem, eps 1e-6, no final norm or cls token, "
    "raw pixels, 2 backbone tasks (tokens out), random",
}

# Shipped checkpoints (file names beside this module), by config name.
WEIGHTS: dict[str, str] = {"m3vit-tiny": "m3vit-tiny.safetensors"}


def config_class():
    """The family's config dataclass."""
    from .model import M3ViTConfig

    return M3ViTConfig


def configs() -> dict[str, dict]:
    """Every named config as a full config dict."""
    from .configs import CONFIGS

    return {name: dataclasses.asdict(cfg) for name, cfg in CONFIGS.items()}


def param_count(config: dict) -> int:
    """A lower bound of the parameters a config builds, from its sizes (nothing is built).

    What the host-memory check (``ModelEntry.check_size``) compares: the position embedding (one row
    per token: the image size drives it), every MoE layer's experts and every block's attention.
    """
    full = normalize(config)
    (height, width), patch, dim = full["img_size"], full["patch"], full["dim"]
    tokens = (height // patch) * (width // patch) + 1
    moe_layers = max(full["depth"] // 2, 1)
    return (
        tokens * dim
        + 2 * moe_layers * full["num_experts"] * full["expert_hidden"] * dim
        + 4 * dim * dim * full["depth"]
    )


def normalize(config: dict) -> dict:
    """Validate a (possibly partial) config dict and return the full one.

    Raises:
        ModelError: Unknown fields or wrong types.
    """
    tupled = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in config.items()
    }
    return normalize_dataclass(config_class(), NAME, tupled)


def build(config: dict):
    """Build the torch module (seeded random weights) from a full config dict."""
    from .model import build_m3vit

    full = normalize(config)
    cfg = config_class()(
        **{
            k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list | tuple) else v
            for k, v in full.items()
        }
    )
    return build_m3vit(cfg)
