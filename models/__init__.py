"""Reference MoE models shipped with edgemoe, by name, and model config files.

Installed as ``edgemoe.models``. A model is a family plus a config dict. Each family lives in
its own folder with a ``family.py`` that exposes ``NAME``, ``DESCRIPTIONS``, ``WEIGHTS``,
``configs()``, ``normalize(config)`` and ``build(config)``; add a family by adding its module
name to ``_FAMILIES``. ``edgemoe compile`` also accepts a JSON file
``{"base": "<registered name>", ...overrides}`` or ``{"family": ..., ...full config}``, either
with an optional ``"weights"`` checkpoint path (relative to the JSON file) loaded after building.
Importing this module does not import torch; building a model does.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import ModelError

_FAMILIES = ("m3vit", "hf", "moe_lm", "bert_moe")


def seeded_build(factory: Callable[[Any], Any], cfg: Any) -> Any:
    """``factory(cfg)`` with torch's global RNG seeded by ``cfg.seed`` (restored afterwards), in eval mode.

    The same config always gives the same random initialisation, and callers' RNG streams are untouched.
    """
    import torch

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        model = factory(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def normalize_dataclass(cls: type, family: str, config: dict) -> dict:
    """Check a (possibly partial) config dict against a family's config dataclass; return the full dict.

    Raises:
        ModelError: Unknown fields, wrong types, or values the dataclass rejects (TypeError/ValueError).
    """
    import dataclasses

    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ModelError(f"unknown {family} config field(s) {', '.join(unknown)} (valid: {', '.join(sorted(fields))})")
    try:
        return dataclasses.asdict(cls(**config))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"bad {family} config: {exc}") from None


def family_module(name: str) -> ModuleType:
    """The ``family.py`` module of a model family."""
    if name not in _FAMILIES:
        raise ModelError(f"unknown model family '{name}' (known: {', '.join(_FAMILIES)})")
    return importlib.import_module(f"{__name__}.{name}.family")


@dataclass(frozen=True)
class ModelEntry:
    """A resolved model: what to build.

    Attributes:
        name: Model name (registry name, or the config file's ``name``).
        family: Model family (and adapter) name.
        description: One line for ``edgemoe models``.
        config: Full config dict of the family.
        weights: Checkpoint to load after building (a shipped one for registry models), or None.
    """

    name: str
    family: str
    description: str
    config: dict
    weights: str | None = None

    def build(self) -> Any:
        """Build the torch module and load its checkpoint, if any."""
        module = family_module(self.family).build(self.config)
        if self.weights:
            load_checkpoint(module, self.weights)
        return module


def load_checkpoint(module, path: str) -> None:
    """Load weights safely: safetensors, or a torch file with ``weights_only=True``.

    A safetensors file whose metadata says ``format = edgemoe-int8-rows`` holds its weight
    matrices as int8 plus ``<name>:scale`` (fp32, one absmax scale per row of dim 0); they are
    dequantized to fp32 here, so the loaded module is exactly the dequantized model.

    Raises:
        ModelError: The file is missing, unreadable or does not fit the model.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state = load_file(str(p))
            with safe_open(str(p), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
            if fmt == "edgemoe-int8-rows":
                scales = {k.removesuffix(":scale"): state.pop(k) for k in [k for k in state if k.endswith(":scale")]}
                for name, scale in scales.items():
                    q = state[name]
                    state[name] = q.float() * scale.float().reshape(-1, *([1] * (q.ndim - 1)))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load checkpoint {p}: {first}") from None


def model_entries() -> dict[str, ModelEntry]:
    """Every registered reference model, by name."""
    out = {}
    for fam_name in _FAMILIES:
        fam = family_module(fam_name)
        folder = Path(fam.__file__).parent
        for name, config in fam.configs().items():
            weights = fam.WEIGHTS.get(name)
            out[name] = ModelEntry(
                name, fam.NAME, fam.DESCRIPTIONS.get(name, name), config, str(folder / weights) if weights else None
            )
    return out


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
    # Optional checkpoint to load over the built model; a relative path is relative to the config file.
    weights = raw.pop("weights", None)
    if weights is not None and not isinstance(weights, str):
        raise ModelError(f"model config {path}: 'weights' must be a path string")
    if weights:
        weights = str((path.parent / weights).resolve())
    if "base" in raw:
        base = raw.pop("base")
        if base not in entries:
            raise ModelError(f"model config {path}: unknown base model '{base}'")
        family, config = entries[base].family, {**entries[base].config, "name": f"{base}-custom", **raw}
    elif "family" in raw:
        family, config = raw.pop("family"), raw
    else:
        raise ModelError(f"model config {path} needs a 'base' (registered model) or a 'family'")
    config = family_module(family).normalize(config)
    return ModelEntry(config["name"], family, f"from {path}", config, weights)
