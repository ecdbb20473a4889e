"""Stage 1: load a model by name and capture it into the IR through its family adapter."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import CompileConfig
from ..errors import ModelError, TaskError
from ..frontends import ModelAdapter, adapter_class
from ..ir import ModelIR


@dataclass(frozen=True)
class CapturedModel:
    """A loaded model, its adapter and its IR.

    Attributes:
        adapter: The family adapter wrapping the loaded model.
        ir: The validated IR.
        tasks: The tasks to build (a subset of the IR's tasks, in model order).
        source: How the model was obtained (registry name, optional checkpoint), for the manifest.
    """

    adapter: ModelAdapter
    ir: ModelIR
    tasks: tuple[str, ...]
    source: dict


def load_checkpoint(module, path: str) -> None:
    """Load weights safely: safetensors, or a torch file with ``weights_only=True``.

    Raises:
        ModelError: The file is missing, unreadable or does not fit the model.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint not found: {p}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
        module.load_state_dict(state, strict=True)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load checkpoint {p}: {first}") from None


def capture_model(cfg: CompileConfig) -> CapturedModel:
    """Build the named model and capture it.

    Args:
        cfg: The compile configuration (model name, optional weights, tasks).

    Returns:
        The captured model.

    Raises:
        ModelError: Unknown model name, bad model config or unusable checkpoint.
        ConfigError: The model breaks an IR invariant (e.g. top-k > experts).
        TaskError: A requested task is not in the model.
    """
    from ..models import ModelEntry, resolve_model

    entry = (
        resolve_model(cfg.model)
        if cfg.model_config is None
        else ModelEntry(cfg.model, cfg.model_family, "from a bundle manifest", cfg.model_config)
    )
    module = entry.build()
    if cfg.weights:
        load_checkpoint(module, cfg.weights)
    adapter = adapter_class(entry.family)(module)
    ir = adapter.ir
    tasks = cfg.tasks or ir.task_names
    unknown = [t for t in tasks if t not in ir.task_names]
    if unknown:
        raise TaskError(f"unknown task '{unknown[0]}' for {ir.name} (model has: {', '.join(ir.task_names)})")
    ordered = tuple(t for t in ir.task_names if t in tasks)
    source = {
        "spec": cfg.model,
        "family": entry.family,
        "config": entry.config,
        "weights": cfg.weights,
        "state_sha256": adapter.state_sha256(),
    }
    return CapturedModel(adapter=adapter, ir=ir, tasks=ordered, source=source)
