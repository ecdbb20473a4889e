"""Stage ``plan`` (``compile --memory-budget``): check the budget and store a swap schedule.

Runs on the staged bundle, after quantization (expert bytes are final), before it is renamed into
place: a budget that cannot work fails the compile and leaves nothing at the output. The check is
:func:`~edgemoe.swap.budget.check_budget`, the very one a session runs at start.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..bundle.format import read_manifest
from ..config import CompileConfig
from ..devices import DeviceProfile
from ..schedule.planner import plan_bundle
from ..stages import CompileState, Progress, Stage
from ..swap.budget import parse_budget
from .write_manifest import write_manifest


def check_budget_text(text: str) -> None:
    """Refuse a malformed budget (``25%``, ``6MB``, ``100000``) before the compile starts.

    Raises:
        ConfigError: Not a percentage or a byte size.
    """
    parse_budget(text, {"moe_layers": []})  # the bundle's bytes are not known yet: the syntax only


def plan_schedule(
    staging: Path, manifest: dict, budget: str, device: DeviceProfile, progress: Progress = lambda _msg: None
) -> dict:
    """Check ``budget`` against the staged bundle's experts and store the planner's schedule in its manifest.

    Args:
        staging: The complete staged bundle.
        manifest: Its manifest (written first: earlier stages may hold changes not on disk yet).
        budget: ``NN%`` of routed expert bytes, or a byte size.
        device: Device profile to plan for.
        progress: Called with a short message per step.

    Returns:
        The manifest with its ``schedule``.

    Raises:
        ConfigError: The budget is below shared experts + resident set + largest expert, or above
            the device's weight memory.

    Warns:
        ThrashWarning: The cache is below a layer's top-k working set (the message has the numbers).
    """
    write_manifest(staging, manifest)
    progress(f"plan expert swapping for a memory budget of {budget} on {device.name}")
    result = plan_bundle(staging, device, budget, write=True)
    progress(
        f"schedule: budget {result['budget_bytes']} B, cache {result['cache_bytes']} B, "
        f"policy {result['policy']}, prefetch {result['predictor'] or 'none'}"
    )
    return read_manifest(staging)


def plan_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``plan``: the swap schedule for ``cfg.memory_budget`` on the final expert bytes."""
    manifest = plan_schedule(state.staging, state.manifest, cfg.memory_budget, state.device, state.progress)
    return dataclasses.replace(state, manifest=manifest)


STAGE = Stage("plan", plan_stage, lambda s: s.manifest["schedule"], applies=lambda cfg: cfg.memory_budget is not None)
