"""Reference MoE models shipped with edgemoe, by name, and model config files.

Installed as ``edgemoe.models``. A model is a family (which adapter captures it) plus a
config dict; the registry names the reference configs. ``edgemoe compile`` also accepts a
JSON file ``{"base": "<registered name>", ...overrides}`` or ``{"family": ..., ...full config}``.
Importing this module does not import torch; building a model does.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError


@dataclass(frozen=True)
class ModelEntry:
    """A resolved model: what to build.

    Attributes:
        name: Model name (registry name, or the config file's ``name``).
        family: Adapter family that captures it.
        description: One line for ``edgemoe models``.
        config: Full config dict of the family's config class.
    """

    name: str
    family: str
    description: str
    config: dict

    def build(self) -> Any:
        """Build the torch module with its seeded weights."""
        return build_model(self.family, self.config)


def _m3vit_config(config: dict):
    from .m3vit import M3ViTConfig

    fields = {f.name for f in dataclasses.fields(M3ViTConfig)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ModelError(f"unknown m3vit config field(s) {', '.join(unknown)} (valid: {', '.join(sorted(fields))})")
    tupled = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in config.items()
    }
    try:
        return M3ViTConfig(**tupled)
    except TypeError as exc:
        raise ModelError(f"bad m3vit config: {exc}") from None


def build_model(family: str, config: dict) -> Any:
    """Build a model of ``family`` from a config dict."""
    if family == "m3vit":
        from .m3vit import build_m3vit

        return build_m3vit(_m3vit_config(config))
    raise ModelError(f"unknown model family '{family}' (known: m3vit)")


_DESCRIPTIONS = {
    "m3vit-tiny": "Edge-MoE FPGA config: 3x128x256, dim 192, 12 blocks, 16 experts, top-2",
    "m3vit-small": "dim 384, 6 heads, 12 blocks, 16 experts, top-4",
    "m3vit-micro": "tiny test model: 3x32x64, dim 32, 4 blocks, 8 experts, top-2",
    "m3vit-micro-cond": "m3vit-micro with task-conditioned gating",
    "m3vit-micro-windows": "m3vit-micro with per-task expert windows of 4",
    "m3vit-tiny-cond": "m3vit-tiny with task-conditioned gating",
}


def model_entries() -> dict[str, ModelEntry]:
    """Every registered reference model, by name."""
    from .m3vit.configs import CONFIGS

    return {
        name: ModelEntry(name, "m3vit", _DESCRIPTIONS.get(name, name), dataclasses.asdict(cfg))
        for name, cfg in CONFIGS.items()
    }


def resolve_model(spec: str) -> ModelEntry:
    """A registry name, or a path to a JSON model config, resolved to what to build.

    Raises:
        ModelError: Unknown name, unreadable file, or unknown config fields.
    """
    entries = model_entries()
    if spec in entries:
        return entries[spec]
    path = Path(spec)
    if path.suffix != ".json":
        raise ModelError(f"unknown model '{spec}' (known: {', '.join(sorted(entries))}; or a .json model config)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ModelError(f"model config {path} must be a JSON object")
    if "base" in raw:
        base = raw.pop("base")
        if base not in entries:
            raise ModelError(f"model config {path}: unknown base model '{base}'")
        family, config = entries[base].family, {**entries[base].config, "name": f"{base}-custom", **raw}
    elif "family" in raw:
        family, config = raw.pop("family"), raw
    else:
        raise ModelError(f"model config {path} needs a 'base' (registered model) or a 'family'")
    if family == "m3vit":
        config = dataclasses.asdict(_m3vit_config(config))
    else:
        raise ModelError(f"unknown model family '{family}' (known: m3vit)")
    return ModelEntry(config["name"], family, f"from {path}", config)
