"""The compile pipeline: model → IR → profile → expert sets → partitions → bundle."""

from __future__ import annotations

import warnings
from pathlib import Path

from .config import CompileConfig
from .devices import get_device
from .errors import ConfigError, EdgeMoEWarning
from .passes.calibrate_activations import AdapterCalibration, calibrate_activations
from .passes.capture_model import capture_model
from .passes.check_finite_weights import check_finite_weights
from .passes.measure_accuracy import bundle_bytes, measure_accuracy
from .passes.partition_model import partition_model
from .passes.plan_schedule import check_budget_text, plan_schedule
from .passes.profile_routing import profile_routing
from .passes.prune_experts import prune_experts
from .passes.quantize_bundle import quantize_bundle
from .passes.write_bundle import Progress, check_output_path, write_bundle, write_manifest


def compile_model(cfg: CompileConfig, out: str | Path, progress: Progress = lambda _msg: None) -> dict:
    """Compile a model into a bundle folder.

    Args:
        cfg: What to compile, for which target and device.
        out: Bundle folder to write (created atomically; an existing bundle is replaced).
        progress: Called with one short message per step.

    Returns:
        The bundle's manifest.
    """
    from .targets import get_target

    out = Path(out)
    check_output_path(out)  # fail before minutes of work, not after
    cfg.quant.validate()
    if cfg.calib_samples < 1:
        raise ConfigError(f"calibration needs at least one sample, got {cfg.calib_samples}")
    if cfg.memory_budget is not None:
        check_budget_text(cfg.memory_budget)
    target = get_target(cfg.target)
    device = get_device(cfg.device)
    target.check_device(device)
    target.check_model(cfg)
    if device.fpga is not None and target.name != "hls":
        warnings.warn(
            EdgeMoEWarning(
                f"{device.name}'s programmable logic ({device.fpga.part}) stays unused with --target {target.name}: "
                "the bundle runs on its CPU; --target hls builds an accelerator for it"
            ),
            stacklevel=2,
        )
    progress(f"capture {cfg.model}")
    captured = capture_model(cfg)
    for note in captured.source.get("weights_notes", ()):
        progress(f"checkpoint: {note}")
    for name in check_finite_weights(captured, cfg.allow_nonfinite):
        warnings.warn(EdgeMoEWarning(f"non-finite weights compiled as asked: {name}"), stacklevel=2)
    progress(f"profile routing on {cfg.calib_samples} calibration inputs x {len(captured.tasks)} tasks")
    profile = profile_routing(captured, cfg.calib_samples, cfg.calib_seed)
    expert_sets = prune_experts(captured, profile, cfg.prune, cfg.prune_below)
    plan = partition_model(captured, expert_sets, cfg.max_seq)

    def quantize(staging: Path, manifest: dict) -> dict:
        fp32_bytes = bundle_bytes(staging, manifest)
        reader = AdapterCalibration(captured.adapter, cfg.calib_samples, cfg.calib_seed)
        calib = calibrate_activations(staging, manifest, reader, progress=progress)
        manifest = quantize_bundle(staging, manifest, cfg.quant, target, calib, profile, progress)
        write_manifest(staging, manifest)
        manifest["accuracy"] = measure_accuracy(
            staging, manifest, captured.adapter, cfg.quant.eval_samples, fp32_bytes=fp32_bytes, progress=progress
        )
        return manifest

    def finalize(staging: Path, manifest: dict) -> dict:
        if cfg.quant.active:
            manifest = quantize(staging, manifest)
        if cfg.memory_budget is not None:  # on final expert bytes, before the bundle is installed
            manifest = plan_schedule(staging, manifest, cfg.memory_budget, device, progress)
        return manifest

    active = cfg.quant.active or cfg.memory_budget is not None
    return write_bundle(out, cfg, captured, profile, plan, target, device, progress, finalize if active else None)
