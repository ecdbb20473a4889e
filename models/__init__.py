"""Reference MoE models shipped with edgemoe, by name.

Installed as ``edgemoe.models``. Each entry names its family (the adapter that captures it)
and builds the torch module. Importing this registry does not import torch; building does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelEntry:
    """A named reference model.

    Attributes:
        name: Registry name (``edgemoe compile NAME``).
        family: Adapter family that captures it.
        description: One line for ``edgemoe models``.
        build: Builds the torch module with its default (seeded or shipped) weights.
    """

    name: str
    family: str
    description: str
    build: Callable[[], Any]


def _m3vit_entries() -> list[ModelEntry]:
    from .m3vit.configs import CONFIGS

    def builder(name: str) -> Callable[[], Any]:
        def build():
            from .m3vit import build_m3vit

            return build_m3vit(CONFIGS[name])

        return build

    descriptions = {
        "m3vit-tiny": "Edge-MoE FPGA config: 3x128x256, dim 192, 12 blocks, 16 experts, top-2",
        "m3vit-small": "dim 384, 6 heads, 12 blocks, 16 experts, top-4",
        "m3vit-micro": "tiny test model: 3x32x64, dim 32, 4 blocks, 8 experts, top-2",
        "m3vit-micro-cond": "m3vit-micro with task-conditioned gating",
        "m3vit-micro-windows": "m3vit-micro with per-task expert windows of 4",
        "m3vit-tiny-cond": "m3vit-tiny with task-conditioned gating",
    }
    return [ModelEntry(n, "m3vit", descriptions.get(n, n), builder(n)) for n in CONFIGS]


def model_entries() -> dict[str, ModelEntry]:
    """Every registered reference model, by name."""
    return {e.name: e for e in _m3vit_entries()}
