"""Stage 1: load a model by name and capture it into the IR through its family adapter."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import CompileConfig
from ..errors import ConfigError, TaskError, did_you_mean
from ..frontends import ModelAdapter, adapter_class
from ..ir import ModelIR
from ..stages import CompileState, Stage


@dataclass(frozen=True)
class CapturedModel:
    """A loaded model, its adapter and its IR.

    Attributes:
        adapter: The family adapter wrapping the loaded model.
        ir: The validated IR.
        tasks: The tasks to build (a subset of the IR's tasks, in model order).
        source: How the model was obtained (registry name, optional checkpoint and its format, what
            importing it noted), for the manifest.
    """

    adapter: ModelAdapter
    ir: ModelIR
    tasks: tuple[str, ...]
    source: dict


def capture_model(cfg: CompileConfig) -> CapturedModel:
    """Build the named model and capture it.

    Args:
        cfg: The compile configuration (model name, optional weights, tasks).

    Returns:
        The captured model.

    Raises:
        ModelError: Unknown model name, bad model config or unusable checkpoint.
        ConfigError: The model breaks an IR invariant (e.g. top-k > experts), or a weights format
            other than edgemoe without a checkpoint.
        TaskError: A requested task is not in the model.
    """
    from ..models import ModelEntry, resolve_model

    if cfg.model_config is None:
        entry = resolve_model(cfg.model)
    else:
        entry = ModelEntry(cfg.model, cfg.model_family, "from a bundle manifest", cfg.model_config)
    if cfg.weights:  # an explicit checkpoint replaces a shipped one
        entry = dataclasses.replace(entry, weights=cfg.weights, weights_format=cfg.weights_format)
    elif cfg.weights_format != "edgemoe":
        raise ConfigError(f"weights format {cfg.weights_format} needs a checkpoint (--weights)")
    if cfg.stream and entry.weights_format != "hf":
        raise ConfigError(
            f"--stream reads a checkpoint folder (config.json + *.safetensors) tensor by tensor; {cfg.model} is not one"
        )
    module, notes = entry.build_with_notes(stream=cfg.stream)
    adapter = adapter_class(entry.family)(module)
    stream = getattr(adapter, "stream", None)
    if stream is not None:
        if cfg.target != "onnx":
            raise ConfigError(
                f"a streamed compile (weights read per partition) emits target onnx, not {cfg.target}: "
                "compile with --no-stream to load the whole model"
            )
        notes = [
            *notes,
            f"streamed: {stream.reader.nbytes / 2**30:.2f} GiB in {len(stream.reader.files)} file(s) stay on disk, "
            "read per partition",
        ]
    ir = adapter.ir
    tasks = cfg.tasks or ir.task_names
    unknown = [t for t in tasks if t not in ir.task_names]
    if unknown:
        raise TaskError(
            f"unknown task '{unknown[0]}' for {ir.name}{did_you_mean(unknown[0], ir.task_names)} "
            f"(model has: {', '.join(ir.task_names)})"
        )
    ordered = tuple(t for t in ir.task_names if t in tasks)
    source = {
        "spec": cfg.model,
        "family": entry.family,
        "config": entry.config,
        "weights": entry.weights,
        "weights_format": entry.weights_format,
        "state_sha256": adapter.state_sha256(),
    }
    if stream is not None:
        source["stream"] = True
    if notes:
        source["weights_notes"] = notes
    return CapturedModel(adapter=adapter, ir=ir, tasks=ordered, source=source)


def capture_bundle_source(manifest: dict) -> CapturedModel:
    """Rebuild the model a bundle was compiled from, as its manifest's ``model.source`` records it.

    Raises:
        KeyError: The manifest's source record lacks ``family`` or ``config``.
    """
    source = manifest["model"].get("source", {})
    return capture_model(
        CompileConfig(
            model=manifest["model"]["name"],
            weights=source.get("weights"),
            weights_format=source.get("weights_format", "edgemoe"),
            stream=bool(source.get("stream")),
            tasks=tuple(manifest["tasks"]),
            model_family=source["family"],
            model_config=source["config"],
        )
    )


def capture_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``capture``: load the model and capture it (:func:`capture_model`)."""
    state.progress(f"capture {cfg.model}")
    captured = capture_model(cfg)
    for note in captured.source.get("weights_notes", ()):
        state.progress(f"checkpoint: {note}")
    return dataclasses.replace(state, captured=captured)


def _summary(state: CompileState) -> dict:
    ir = state.captured.ir
    return {
        "model": ir.name,
        "family": ir.family,
        "granularity": ir.granularity,
        "params": ir.params,
        "tasks": list(state.captured.tasks),
        "moe_layers": [
            {"index": layer.index, "experts": layer.num_experts, "top_k": layer.top_k} for layer in ir.moe_layers
        ],
        "source": state.captured.source,
    }


STAGE = Stage("capture", capture_stage, _summary)
