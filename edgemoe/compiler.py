"""The compile pipeline: one list of stages, each ``stage(state, cfg) -> state``.

check → capture → check-weights → profile → prune → partition → open-bundle → emit →
calibrate → quantize → measure-accuracy → plan → write-manifest. Each stage lives with the pass
it runs in ``passes/``; stages that do not apply to a configuration (quantization without
``--quant``, the swap schedule without ``--memory-budget``) are skipped. The bundle is written into
a hidden staging folder that the last stage renames into place; a failed compile removes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from .bundle.staging import discard_on_failure
from .config import CompileConfig
from .passes import (
    calibrate_activations,
    capture_model,
    check_config,
    check_finite_weights,
    emit_partitions,
    measure_accuracy,
    open_bundle,
    partition_model,
    plan_schedule,
    profile_routing,
    prune_experts,
    quantize_bundle,
    write_manifest,
)
from .stages import CompileState, Progress, Stage

STAGES: tuple[Stage, ...] = (
    check_config.STAGE,
    capture_model.STAGE,
    check_finite_weights.STAGE,
    profile_routing.STAGE,
    prune_experts.STAGE,
    partition_model.STAGE,
    open_bundle.STAGE,
    emit_partitions.STAGE,
    calibrate_activations.STAGE,
    quantize_bundle.STAGE,
    measure_accuracy.STAGE,
    plan_schedule.STAGE,
    write_manifest.STAGE,
)


def run_stages(
    cfg: CompileConfig,
    state: CompileState,
    *,
    until: str | None = None,
    dump_dir: Path | None = None,
    stages: Sequence[Stage] = STAGES,
) -> CompileState:
    """Run the pipeline's stages in order on ``state``.

    Args:
        cfg: The compile configuration.
        state: Where to start (usually ``CompileState(out, progress)``).
        until: Stop after the stage of this name (``edgemoe tune`` stops after ``partition``).
        dump_dir: Write each stage's summary to ``dump_dir/NN-<name>.json`` as it finishes.
        stages: The stages to run.

    Returns:
        The state after the last stage run.

    Raises:
        ConfigError: ``until`` names no stage.
        OutputPathError: The output cannot be written (the staged bundle is removed).
    """
    from .errors import ConfigError

    names = [stage.name for stage in stages]
    if until is not None and until not in names:
        raise ConfigError(f"no compile stage named '{until}' (stages: {', '.join(names)})")
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
    # A failing stage takes the staged bundle with it (the output is never half-written).
    with discard_on_failure(state.out, lambda: state.staging):
        for i, stage in enumerate(stages):
            ran = stage.applies(cfg)
            start = time.perf_counter()
            record = {"stage": stage.name, "ran": ran}
            try:
                if ran:
                    state = stage.run(state, cfg)
                    record["seconds"] = round(time.perf_counter() - start, 3)
                    if dump_dir is not None:
                        record.update(stage.summary(state))
            except Exception as exc:
                record.update(seconds=round(time.perf_counter() - start, 3), error=f"{type(exc).__name__}: {exc}")
                raise
            finally:
                if dump_dir is not None:
                    text = json.dumps(record, indent=1, default=str) + "\n"
                    (dump_dir / f"{i:02d}-{stage.name}.json").write_text(text)
            if stage.name == until:
                break
    return state


def compile_model(
    cfg: CompileConfig,
    out: str | Path,
    progress: Progress = lambda _msg: None,
    dump_stages: str | Path | None = None,
) -> dict:
    """Compile a model into a bundle folder.

    Args:
        cfg: What to compile, for which target and device.
        out: Bundle folder to write (created atomically; an existing bundle is replaced).
        progress: Called with one short message per step.
        dump_stages: Folder to write each stage's summary into (``NN-<name>.json``), or None.

    Returns:
        The bundle's manifest.
    """
    from .targets import get_target, target_names

    try:
        state = run_stages(
            cfg, CompileState(Path(out), progress), dump_dir=None if dump_stages is None else Path(dump_stages)
        )
    finally:
        if cfg.target in target_names():
            get_target(cfg.target).release()  # what the target kept of this compile (TVM: torch partitions)
    return state.manifest
