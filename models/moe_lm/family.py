"""The moe_lm family as the model registry sees it: named configs and a builder."""

from __future__ import annotations

import dataclasses

from .. import normalize_dataclass

NAME = "moe_lm"

DESCRIPTIONS = {
    "switch-lm-micro": "tiny test LM, Switch-style: vocab 256, dim 32, 4 blocks (MoE every other), 8 experts, top-1",
    "mixtral-lm-micro": "tiny test LM, Mixtral-style: vocab 512, dim 64, 3 MoE blocks, 8 experts, top-2 renormalised",
    "deepseek-lm-micro": "tiny test LM, DeepSeekMoE-style: dim 48, 3 blocks (first dense), 16 experts top-4 + 2 shared",
    "mixtral-lm-bytes": "byte-level Mixtral-style LM: dim 64, 4 MoE blocks, 8 experts top-2, trained on Python's docs",
    "mixtral-lm-bytes-local": "mixtral-lm-bytes trained with a routing-locality loss: consecutive bytes share experts",
    "mixtral-lm-tiny": "Mixtral-style LM: vocab 4096, dim 256, 6 MoE blocks, 8 experts (hidden 704), top-2",
    "deepseek-lm-tiny": "DeepSeekMoE-style LM: vocab 4096, dim 256, 6 blocks (1st dense), 32 experts top-4 + 2 shared",
}

# Shipped checkpoints (file names beside this module), by config name.
WEIGHTS: dict[str, str] = {
    "mixtral-lm-bytes": "mixtral-lm-bytes.safetensors",
    "mixtral-lm-bytes-local": "mixtral-lm-bytes-local.safetensors",
}


def config_class():
    """The family's config dataclass."""
    from .model import MoELMConfig

    return MoELMConfig


def configs() -> dict[str, dict]:
    """Every named config as a full config dict."""
    from .configs import CONFIGS

    return {name: dataclasses.asdict(cfg) for name, cfg in CONFIGS.items()}


def normalize(config: dict) -> dict:
    """Validate a (possibly partial) config dict and return the full one.

    Raises:
        ModelError: Unknown fields, wrong types or inconsistent sizes.
    """
    return normalize_dataclass(config_class(), NAME, config)


def build(config: dict):
    """Build the torch module (seeded random weights) from a full config dict."""
    from .model import build_moe_lm

    return build_moe_lm(config_class()(**normalize(config)))
