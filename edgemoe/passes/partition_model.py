"""Stage 3b: cut the captured model into per-task and per-expert partitions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import CompileConfig
from ..frontends import GraphPartition
from ..stages import CompileState, Stage
from .capture_model import CapturedModel
from .prune_experts import ExpertSets


@dataclass(frozen=True)
class PartitionPlan:
    """The graphs to emit and the experts to ship.

    A task runs ``segments`` (shared trunk), its ``gates`` (one per MoE layer) and its
    ``head``. Experts are data: each layer points at one shared ``kernels`` entry (one per
    distinct expert shape) and ships the weights of ``experts[layer]`` only.

    Attributes:
        segments: Dense trunk segments, in execution order.
        gates: Per task, one gate per MoE layer (masked to the task's kept experts).
        heads: Per task, its head.
        kernels: One expert kernel per distinct expert shape.
        layer_kernel: Per MoE layer, the name of its kernel in ``kernels``.
        layer_shared_kernel: Per MoE layer, the kernel of its shared experts (None: no shared experts).
        experts: Per MoE layer, experts some built task keeps (the others are dropped).
        expert_sets: The per-task expert sets the gates were masked with.
        step_segments: Generation graphs: each trunk segment on a key/value cache (empty: none).
        max_seq: Positions of that cache (0: no generation graphs).
    """

    segments: tuple[GraphPartition, ...]
    gates: dict[str, tuple[GraphPartition, ...]]
    heads: dict[str, GraphPartition]
    kernels: tuple[GraphPartition, ...]
    layer_kernel: tuple[str, ...]
    layer_shared_kernel: tuple[str | None, ...]
    experts: tuple[tuple[int, ...], ...]
    expert_sets: ExpertSets
    step_segments: tuple[GraphPartition, ...] = ()
    max_seq: int = 0

    def graphs(self) -> list[GraphPartition]:
        """Every graph partition, each once."""
        # A segment without attention caches nothing: its generation graph is the plain segment.
        out = list(self.segments) + [s for s in self.step_segments if s not in self.segments]
        for task in self.gates:
            out.extend(self.gates[task])
            out.append(self.heads[task])
        return out + list(self.kernels)


def partition_model(captured: CapturedModel, expert_sets: ExpertSets, max_seq: int | None = None) -> PartitionPlan:
    """Build the partition plan.

    Args:
        captured: The captured model.
        expert_sets: Experts each task keeps per layer.
        max_seq: Also cut generation graphs on a key/value cache of this many positions (None: none).

    Returns:
        The plan: trunk segments, per-task gates and heads, shared expert kernels.
    """
    adapter, ir = captured.adapter, captured.ir
    segments = tuple(adapter.segment(s.index) for s in ir.segments)
    gates = {
        task: tuple(adapter.gate(layer.index, task, expert_sets.kept[task][layer.index]) for layer in ir.moe_layers)
        for task in captured.tasks
    }
    heads = {task: adapter.head(task) for task in captured.tasks}
    kernels: dict[str, GraphPartition] = {}
    layer_kernel, layer_shared = [], []
    for layer in ir.moe_layers:
        kernel = adapter.expert_kernel(layer.index)
        kernels.setdefault(kernel.name, kernel)
        layer_kernel.append(kernel.name)
        shared = adapter.shared_kernel(layer.index) if layer.shared_experts else None
        if shared is not None:
            kernels.setdefault(shared.name, shared)
        layer_shared.append(None if shared is None else shared.name)
    experts = tuple(expert_sets.union(layer.index) for layer in ir.moe_layers)
    steps = () if not max_seq else tuple(adapter.step_segment(s.index, max_seq) for s in ir.segments)
    return PartitionPlan(
        segments=segments,
        gates=gates,
        heads=heads,
        kernels=tuple(kernels.values()),
        layer_kernel=tuple(layer_kernel),
        layer_shared_kernel=tuple(layer_shared),
        experts=experts,
        expert_sets=expert_sets,
        step_segments=steps,
        max_seq=int(max_seq or 0),
    )


def partition_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``partition``: the graphs to emit and the experts to ship (:func:`partition_model`)."""
    return dataclasses.replace(state, plan=partition_model(state.captured, state.expert_sets, cfg.max_seq))


def _summary(state: CompileState) -> dict:
    plan = state.plan
    return {
        "graphs": [
            {"name": p.name, "kind": p.kind, "inputs": list(p.input_names), "outputs": list(p.output_names)}
            for p in plan.graphs()
        ],
        "layer_kernel": list(plan.layer_kernel),
        "experts": [list(e) for e in plan.experts],
        "max_seq": plan.max_seq,
    }


STAGE = Stage("partition", partition_stage, _summary)
