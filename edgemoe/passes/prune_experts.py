"""Stage 3a: choose each task's expert set per layer (task-specific expert pruning)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import CompileConfig
from ..errors import ConfigError
from ..stages import CompileState, Stage
from .capture_model import CapturedModel
from .profile_routing import RoutingProfile


@dataclass(frozen=True)
class ExpertSets:
    """Which experts each task keeps, per MoE layer.

    Attributes:
        kept: ``kept[task][layer]`` is the sorted tuple of experts the task's gate may choose.
        pruned: Whether calibration-based pruning was applied (else: every expert in the window).
    """

    kept: dict[str, tuple[tuple[int, ...], ...]]
    pruned: bool

    def union(self, layer: int) -> tuple[int, ...]:
        """Experts of ``layer`` that some task keeps (the ones the bundle must carry)."""
        return tuple(sorted({e for sets in self.kept.values() for e in sets[layer]}))


def prune_experts(captured: CapturedModel, profile: RoutingProfile, prune: bool, min_share: float = 0.0) -> ExpertSets:
    """Keep, per task and layer, the experts its gate can reach and (if pruning) actually chose.

    Experts outside a task's window can never be chosen, so they are dropped even without
    pruning. With pruning, an expert the task never selected on calibration data is dropped
    too, and the task's gate is masked to the kept set. ``min_share`` also drops experts that got
    fewer than that share of the task's (token, slot) assignments: a trained model's gates leak a
    few tokens to other tasks' experts, and keeping an expert for 0.1 % of tokens costs its whole
    blob (the accuracy report measures what dropping them costs). Token-level models (one router for
    every input) are never pruned: unseen experts there are rare, not unused.

    Args:
        captured: The captured model.
        profile: Routing traces on calibration data.
        prune: Whether to drop experts unused on calibration data.
        min_share: With ``prune``: also drop experts below this share of the task's assignments.

    Returns:
        The per-task expert sets.
    """
    ir = captured.ir
    if not 0.0 <= min_share < 1.0:
        raise ConfigError(f"prune share must be in [0, 1), got {min_share}")
    do_prune = prune and ir.granularity == "task"
    kept = {}
    for task in captured.tasks:
        sets = []
        for layer in ir.moe_layers:
            window = layer.router_for(task).window or tuple(range(layer.num_experts))
            experts = set(window)
            if do_prune:
                experts &= set(profile.activated(task, layer.index, layer.num_experts, min_share))
                if not experts:
                    raise ConfigError(
                        f"pruning leaves task '{task}' no expert in MoE layer {layer.index}; lower --prune-below"
                    )
            sets.append(tuple(sorted(experts)))
        kept[task] = tuple(sets)
    return ExpertSets(kept=kept, pruned=do_prune)


def prune_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``prune``: each task's expert set (:func:`prune_experts`)."""
    sets = prune_experts(state.captured, state.profile, cfg.prune, cfg.prune_below)
    return dataclasses.replace(state, expert_sets=sets)


STAGE = Stage(
    "prune",
    prune_stage,
    lambda s: {
        "pruned": s.expert_sets.pruned,
        "kept": {task: [list(layer) for layer in sets] for task, sets in s.expert_sets.kept.items()},
    },
)
