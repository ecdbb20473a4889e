"""Stage 0: refuse a configuration that cannot build, before minutes of work; pick target and device."""

from __future__ import annotations

import dataclasses
import warnings

from ..bundle.staging import check_output_path
from ..config import CompileConfig
from ..devices import get_device
from ..errors import ConfigError, EdgeMoEWarning
from ..stages import CompileState, Stage
from .plan_schedule import check_budget_text


def check_config(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Check the output path, options, target and device; add the target and device to the state.

    Raises:
        OutputPathError: The output path is taken by something that is not a bundle.
        ConfigError: Bad quantization options, no calibration sample, a malformed budget.
        TargetError: Unknown target, or one that cannot build for the device or the options.
        DeviceError: Unknown device.
    """
    from ..targets import get_target

    if state.out is not None:
        check_output_path(state.out)
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
    return dataclasses.replace(state, target=target, device=device)


STAGE = Stage(
    "check",
    check_config,
    lambda s: {"target": s.target.name, "device": s.device.name, "out": None if s.out is None else str(s.out)},
)
