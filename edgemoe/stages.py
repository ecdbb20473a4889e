"""What the compile pipeline's stages share: the state they pass on and the record of one stage.

A stage is ``run(state, cfg) -> state``: it reads what earlier stages left in the
:class:`CompileState` and returns a copy with its own result added. Each stage lives in the module
of the pass it runs (``passes/``); :data:`edgemoe.compiler.STAGES` lists them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import CompileConfig
    from .devices import DeviceProfile
    from .passes.calibrate_activations import CalibrationSet
    from .passes.capture_model import CapturedModel
    from .passes.partition_model import PartitionPlan
    from .passes.profile_routing import RoutingProfile
    from .passes.prune_experts import ExpertSets
    from .targets.base import Target

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CompileState:
    """Everything the stages have produced so far (None: not yet, or the stage does not apply).

    Attributes:
        out: The bundle folder to write (None: stop before emitting, as ``edgemoe tune`` does).
        progress: Called with one short message per step.
        target: The backend (``check``).
        device: The device profile (``check``).
        captured: The model, its adapter and IR (``capture``).
        profile: Routing traces on calibration inputs (``profile``).
        expert_sets: The experts each task keeps (``prune``).
        plan: The partitions to emit (``partition``).
        staging: The hidden folder the bundle is written into (``emit``); renamed to ``out`` last.
        manifest: The bundle's manifest as built so far (``emit`` on).
        fp32_bytes: Bytes of the fp32 bundle before quantization (``calibrate``).
        calib: Activation samples of every quantized input (``calibrate``).
    """

    out: Path | None
    progress: Progress = lambda _msg: None
    target: Target | None = None
    device: DeviceProfile | None = None
    captured: CapturedModel | None = None
    profile: RoutingProfile | None = None
    expert_sets: ExpertSets | None = None
    plan: PartitionPlan | None = None
    staging: Path | None = None
    manifest: dict | None = None
    fp32_bytes: int | None = None
    calib: CalibrationSet | None = None


@dataclass(frozen=True)
class Stage:
    """One step of the compile pipeline.

    Attributes:
        name: Short name (``--dump-stages`` files are ``NN-<name>.json``).
        run: ``run(state, cfg) -> state``.
        summary: What the stage produced, as JSON (``--dump-stages``), from the state it returned.
        applies: Whether the stage runs for a configuration (default: always).
    """

    name: str
    run: Callable[[CompileState, CompileConfig], CompileState]
    summary: Callable[[CompileState], dict[str, Any]]
    applies: Callable[[CompileConfig], bool] = lambda _cfg: True
