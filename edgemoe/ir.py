"""The model IR: a framework-free description of an MoE model.

Capture turns a model into a :class:`ModelIR`; every later stage reads it. The IR holds no
weights and imports no framework, so it can be printed, serialised into a manifest and
validated on its own. Weights stay with the adapter that captured the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError, did_you_mean


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of a graph input or output.

    ``None`` in ``shape`` marks a dynamic dimension (the batch).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    high: int | None = None  # integer inputs (token ids): values lie in [0, high)
    sample_shape: tuple[int, ...] | None = None  # sizes of dynamic dims for sample inputs

    def to_json(self) -> dict:
        """Manifest form."""
        out = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.high is not None:
            out["high"] = self.high
        if self.sample_shape is not None:
            out["sample_shape"] = list(self.sample_shape)
        return out


@dataclass(frozen=True)
class ParamSpec:
    """One weight tensor of an expert."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"


@dataclass(frozen=True)
class ExpertSpec:
    """The shape of every expert of one MoE layer (experts of a layer share it).

    Attributes:
        d_model: Input and output width.
        hidden: Hidden width.
        activation: Activation between the two projections.
        params: The weight tensors the expert kernel takes, in kernel argument order.
    """

    d_model: int
    hidden: int
    activation: str
    params: tuple[ParamSpec, ...]

    @property
    def param_count(self) -> int:
        """Parameters of one expert."""
        n = 0
        for p in self.params:
            size = 1
            for d in p.shape:
                size *= d
            n += size
        return n


@dataclass(frozen=True)
class RouterSpec:
    """One router (gate) of an MoE layer.

    Attributes:
        task: The task that uses this router, or ``None`` for a token-level router shared by all.
        num_experts: Width of the router's output.
        top_k: Experts chosen per token.
        score: Score function applied to router logits.
        normalize: Whether the chosen top-k scores are renormalised to sum to one.
        window: Experts this router may choose from (architectural restriction).
        cond_dim: Width of a task embedding concatenated to the router input (0: none).
    """

    task: str | None
    num_experts: int
    top_k: int
    score: str = "softmax"
    normalize: bool = False
    window: tuple[int, ...] = ()
    cond_dim: int = 0


@dataclass(frozen=True)
class MoELayerSpec:
    """An MoE layer: its routers, its experts' shape and where it sits in the model."""

    index: int
    block: int
    num_experts: int
    top_k: int
    expert: ExpertSpec
    routers: tuple[RouterSpec, ...]
    shared_experts: int = 0
    shared_expert: ExpertSpec | None = None  # shape of the always-on shared experts, if any

    def router_for(self, task: str) -> RouterSpec:
        """The router a task uses in this layer."""
        for r in self.routers:
            if r.task == task or r.task is None:
                return r
        raise ConfigError(f"MoE layer {self.index} has no router for task '{task}'")


@dataclass(frozen=True)
class DenseSegmentSpec:
    """A stretch of dense computation between MoE layers (part of the shared trunk)."""

    index: int
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class TaskSpec:
    """A task: its head and what the head produces."""

    name: str
    output: TensorSpec
    kind: str = "dense"


@dataclass(frozen=True)
class ModelIR:
    """An MoE model, captured.

    Execution order is ``segments[0], moe_layers[0], segments[1], ..., segments[-1], head``:
    there is exactly one more dense segment than there are MoE layers.
    """

    name: str
    family: str
    granularity: str  # "task" (a gate per task) or "token" (one router shared by every task)
    input: TensorSpec
    tasks: tuple[TaskSpec, ...]
    segments: tuple[DenseSegmentSpec, ...]
    moe_layers: tuple[MoELayerSpec, ...]
    params: int
    config: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def task_names(self) -> tuple[str, ...]:
        """Task names."""
        return tuple(t.name for t in self.tasks)

    @property
    def num_experts(self) -> int:
        """Experts over all MoE layers."""
        return sum(layer.num_experts for layer in self.moe_layers)

    def task(self, name: str) -> TaskSpec:
        """Look up a task by name."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(
            f"unknown task '{name}'{did_you_mean(name, self.task_names)} (model has: {', '.join(self.task_names)})"
        )


def validate_ir(ir: ModelIR) -> ModelIR:
    """Check the IR's invariants and raise :class:`ConfigError` naming the first broken one.

    Args:
        ir: The captured model.

    Returns:
        The same IR, for chaining.
    """
    if not ir.tasks:
        raise ConfigError(f"{ir.name}: model has no tasks")
    if len(set(ir.task_names)) != len(ir.tasks):
        raise ConfigError(f"{ir.name}: duplicate task names {ir.task_names}")
    if len(ir.segments) != len(ir.moe_layers) + 1:
        raise ConfigError(
            f"{ir.name}: {len(ir.segments)} dense segments for {len(ir.moe_layers)} MoE layers "
            "(expected one more segment than MoE layers)"
        )
    for layer in ir.moe_layers:
        where = f"{ir.name}: MoE layer {layer.index} (block {layer.block})"
        if layer.num_experts < 1:
            raise ConfigError(f"{where}: needs at least one expert, has {layer.num_experts}")
        if not 1 <= layer.top_k <= layer.num_experts:
            raise ConfigError(f"{where}: top-k {layer.top_k} must be between 1 and {layer.num_experts} experts")
        if layer.shared_experts and layer.shared_expert is None:
            raise ConfigError(f"{where}: {layer.shared_experts} shared experts but no shared expert shape")
        if layer.expert.d_model < 1 or layer.expert.hidden < 1:
            raise ConfigError(f"{where}: expert shape {layer.expert.d_model}x{layer.expert.hidden} is empty")
        tasks_routed = {r.task for r in layer.routers}
        if None not in tasks_routed and tasks_routed != set(ir.task_names):
            raise ConfigError(f"{where}: routers cover tasks {sorted(tasks_routed)}, model has {ir.task_names}")
        for r in layer.routers:
            if r.num_experts != layer.num_experts:
                raise ConfigError(
                    f"{where}: router for '{r.task}' has width {r.num_experts}, layer has {layer.num_experts} experts"
                )
            if r.top_k != layer.top_k:
                raise ConfigError(f"{where}: router top-k {r.top_k} differs from layer top-k {layer.top_k}")
            if r.window and not all(0 <= e < layer.num_experts for e in r.window):
                raise ConfigError(f"{where}: router window {r.window} names experts outside 0..{layer.num_experts - 1}")
            if r.window and len(r.window) < r.top_k:
                raise ConfigError(f"{where}: router window of {len(r.window)} experts is smaller than top-k {r.top_k}")
    return ir


def ir_to_json(ir: ModelIR) -> dict:
    """JSON-ready summary of a captured model (``edgemoe inspect MODEL --json``)."""
    layers = []
    for layer in ir.moe_layers:
        layers.append(
            {
                "index": layer.index,
                "block": layer.block,
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "shared_experts": layer.shared_experts,
                "shared_expert_hidden": layer.shared_expert.hidden if layer.shared_expert else 0,
                "expert": {
                    "d_model": layer.expert.d_model,
                    "hidden": layer.expert.hidden,
                    "activation": layer.expert.activation,
                    "params": layer.expert.param_count,
                    "bytes_fp32": layer.expert.param_count * 4,
                },
                "routers": [
                    {
                        "task": r.task,
                        "score": r.score,
                        "normalize": r.normalize,
                        "window": list(r.window),
                        "cond_dim": r.cond_dim,
                    }
                    for r in layer.routers
                ],
            }
        )
    return {
        "kind": "model",
        "name": ir.name,
        "family": ir.family,
        "granularity": ir.granularity,
        "params": ir.params,
        "input": ir.input.to_json(),
        "tasks": [{"name": t.name, "kind": t.kind, "output": t.output.to_json()} for t in ir.tasks],
        "segments": [{"index": s.index, "description": s.description} for s in ir.segments],
        "moe_layers": layers,
        "experts": ir.num_experts,
        "expert_bytes_fp32": sum(layer.expert.param_count * 4 * layer.num_experts for layer in ir.moe_layers),
    }
