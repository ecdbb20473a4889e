"""Building blocks the family adapters share to cut a model into :class:`GraphPartition` objects.

Every family is cut the same way: dense trunk segments between MoE layers, one gate per MoE
layer and task, one head per task and one expert kernel per expert shape. What differs per
family is the torch module computing each piece; the helpers here wrap such a module into its
partition (graph name, example inputs, input/output names, dynamic axes), so these follow one
convention across families and the runtime can rely on them. The torch helpers adapters share
for reference runs (kept-expert masks, recorded routes, exported weights) are here too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..ir import DenseSegmentSpec, ExpertSpec, TensorSpec
from .base import GraphPartition

GATE_OUTPUTS = ("experts", "scores")
SHARED_GATE_OUTPUTS = (*GATE_OUTPUTS, "shared_scores")
KERNEL_EXAMPLE_TOKENS = 5


def example_input(spec: TensorSpec, batch: int = 2, seq: int | None = None) -> torch.Tensor:
    """A deterministic (seed 0) example tensor of ``spec``'s shape to trace a graph with.

    Args:
        spec: The graph input.
        batch: Size of the first (batch) dimension.
        seq: Size of the other dynamic dimensions (the sequence), or None where only the batch is dynamic.

    Returns:
        Standard normal values for float inputs (the scale of normalised activations), uniform
        integers in ``[0, spec.high)`` for token ids.

    Raises:
        ConfigError: ``spec`` has a dynamic dimension after the batch and no ``seq`` was given.
    """
    dims = spec.shape[1:]
    if seq is None and None in dims:
        raise ConfigError(f"example input '{spec.name}' {list(spec.shape)}: a sequence length is needed")
    shape = (batch, *(seq if d is None else d for d in dims))
    gen = torch.Generator().manual_seed(0)
    if spec.dtype == "int64":
        return torch.randint(0, spec.high or 2, shape, generator=gen)
    return torch.randn(*shape, generator=gen)


@dataclass(frozen=True)
class Tracing:
    """How a family's activation graphs (segments, gates, heads) are traced.

    Attributes:
        axes: Dynamic axes of every activation, e.g. ``{0: "batch"}`` or ``{0: "batch", 1: "seq"}``.
        seq: Sequence length of example inputs (None: only the batch is dynamic). It should differ
            from ``batch``, so the exporter cannot confuse the two axes.
        batch: Batch size of example inputs.
    """

    axes: dict
    seq: int | None = None
    batch: int = 2

    def example(self, spec: TensorSpec) -> torch.Tensor:
        """Example input for ``spec`` (see :func:`example_input`)."""
        return example_input(spec, self.batch, self.seq)


def segment_bounds(index: int, moe_blocks: Sequence[int], depth: int) -> tuple[int, int, bool]:
    """Blocks of trunk segment ``index`` when the trunk is cut at each MoE block's expert FFN.

    Returns:
        (start, stop, last): the segment runs blocks ``start..stop-1`` in full, then, unless it is
        the last segment (``stop == depth``), the attention half of MoE block ``stop``.
    """
    last = index == len(moe_blocks)
    start = 0 if index == 0 else moe_blocks[index - 1] + 1
    return start, depth if last else moe_blocks[index], last


def span_descriptions(
    moe_blocks: Sequence[int], depth: int, unit: str = "blocks", embed: str = "", end: str = " + final norm"
) -> list[str]:
    """Descriptions of the segments :func:`segment_bounds` cuts, one per segment.

    Args:
        moe_blocks: Indices of the MoE blocks.
        depth: Number of blocks.
        unit: What the model calls its blocks (plural).
        embed: Prefix of the first segment's description (what it starts with).
        end: Suffix of the last segment's description.
    """
    out = []
    for i in range(len(moe_blocks) + 1):
        start, stop, last = segment_bounds(i, moe_blocks, depth)
        desc = (embed if i == 0 else "") + (f"{unit} {start}..{stop - 1}" if stop > start else f"no full {unit}")
        out.append(desc + (end if last else f" + attention of {unit[:-1]} {stop}"))
    return out


def trunk_segments(
    source: TensorSpec, result: TensorSpec, stream: tuple[int | None, ...], descriptions: Sequence[str]
) -> tuple[DenseSegmentSpec, ...]:
    """Specs of the trunk segments, chained through the MoE layers as the runtime runs them.

    Segment 0 takes the model input; each later segment takes the residual stream and the
    previous MoE layer's output. Every segment but the last outputs the residual stream and the
    next MoE layer's input; the last outputs ``result``.

    Args:
        source: The model input.
        result: The last segment's output (what the heads take).
        stream: Shape of the residual stream and of the MoE layers' inputs and outputs.
        descriptions: One per segment (MoE layers + 1).
    """
    hidden = TensorSpec("hidden", stream)
    residual = TensorSpec("residual", stream)  # a graph's input and output names must differ
    moe_in, moe_out = TensorSpec("moe_input", stream), TensorSpec("moe_output", stream)
    last = len(descriptions) - 1
    return tuple(
        DenseSegmentSpec(
            i, desc, (source,) if i == 0 else (residual, moe_out), (result,) if i == last else (hidden, moe_in)
        )
        for i, desc in enumerate(descriptions)
    )


def segment_partition(spec: DenseSegmentSpec, module: nn.Module, tracing: Tracing) -> GraphPartition:
    """The partition of trunk segment ``spec`` computed by ``module``."""
    inputs, outputs = tuple(s.name for s in spec.inputs), tuple(s.name for s in spec.outputs)
    return GraphPartition(
        name=f"segment_{spec.index}",
        kind="segment",
        module=module,
        example_inputs=tuple(tracing.example(s) for s in spec.inputs),
        input_names=inputs,
        output_names=outputs,
        dynamic_axes={n: tracing.axes for n in inputs + outputs},
    )


def step_partition(
    spec: DenseSegmentSpec,
    module: nn.Module,
    widths: Sequence[tuple[int, tuple[int, int], tuple[int, int]]],
    max_seq: int,
    axes: dict,
) -> GraphPartition:
    """The generation graph of trunk segment ``spec``: ``module`` on a key/value cache of ``max_seq`` positions.

    ``module`` takes the plain segment's inputs, then ``past`` (int64 (1,): positions already
    cached), then each attention layer's key and value buffers; it returns the plain segment's
    outputs, then the updated buffers in the same order.

    Args:
        spec: The plain segment.
        module: The generation segment.
        widths: Per attention layer of the segment: (layer, (key heads, key width), (value heads, value width)).
        max_seq: Cache positions.
        axes: Dynamic axes of the plain segment's activations.
    """
    # Traced with the tokens at the end of a cache whose other slots hold random values, so the
    # graph check sees the mask hide every slot it must.
    seq = min(16, max_seq // 2)
    tracing = Tracing(axes, seq=seq)
    gen = torch.Generator().manual_seed(1)
    caches, names_in, names_out = [], [], []
    for layer, *kv in widths:
        for kind, (heads, width) in zip("kv", kv, strict=True):
            caches.append(torch.randn(tracing.batch, heads, max_seq, width, generator=gen))
            names_in.append(f"cache_{layer}_{kind}")
            names_out.append(f"cache_{layer}_{kind}_out")
    plain_in, plain_out = tuple(s.name for s in spec.inputs), tuple(s.name for s in spec.outputs)
    dynamic = {n: axes for n in plain_in + plain_out}
    dynamic.update({n: {0: "batch"} for n in names_in + names_out})
    return GraphPartition(
        name=f"step_segment_{spec.index}",
        kind="step_segment",
        module=module,
        example_inputs=(*(tracing.example(s) for s in spec.inputs), torch.tensor([max_seq - seq - 1]), *caches),
        input_names=(*plain_in, "past", *names_in),
        output_names=(*plain_out, *names_out),
        dynamic_axes=dynamic,
    )


def check_max_seq(max_seq: int) -> None:
    """Raise a ConfigError if a cache of ``max_seq`` positions is too small to trace generation graphs with."""
    if max_seq < 8:
        raise ConfigError(f"max_seq must be at least 8 positions, got {max_seq}")


def check_kept(layer: int, keep: Sequence[int], top_k: int, task: str | None = None) -> None:
    """Raise a ConfigError if a gate's kept expert set cannot fill its top-k choice."""
    if len(keep) < top_k:
        of_task = "" if task is None else f" of task '{task}'"
        raise ConfigError(f"layer {layer}: kept set {keep}{of_task} is smaller than top-k {top_k}")


def gate_partition(
    task: str, layer: int, module: nn.Module, moe_input: TensorSpec, tracing: Tracing, shared: bool = False
) -> GraphPartition:
    """The partition of ``task``'s gate of MoE layer ``layer``, computed by ``module``.

    Args:
        task: Task name.
        layer: MoE layer index.
        module: Maps the MoE input to (experts, scores[, shared_scores]).
        moe_input: The layer's MoE input (the previous segment's second output).
        tracing: Dynamic axes and example sizes.
        shared: Whether the layer has shared experts (the gate then outputs their per-token weight too).
    """
    outputs = SHARED_GATE_OUTPUTS if shared else GATE_OUTPUTS
    return GraphPartition(
        name=f"gate_{task}_{layer}",
        kind="gate",
        module=module,
        example_inputs=(tracing.example(moe_input),),
        input_names=(moe_input.name,),
        output_names=outputs,
        dynamic_axes={n: tracing.axes for n in (moe_input.name, *outputs)},
        task=task,
        layer=layer,
    )


def head_partition(
    task: str,
    module: nn.Module,
    features: TensorSpec,
    tracing: Tracing,
    output: str | None = None,
    output_axes: dict | None = None,
) -> GraphPartition:
    """The partition of ``task``'s head, computed by ``module`` from the last segment's output.

    Args:
        task: Task name.
        module: The head.
        features: The last segment's output.
        tracing: Dynamic axes and example sizes.
        output: Name of the head's output (default: the task's name).
        output_axes: Dynamic axes of the output (default: ``tracing.axes``).
    """
    output = output or task
    return GraphPartition(
        name=f"head_{task}",
        kind="head",
        module=module,
        example_inputs=(tracing.example(features),),
        input_names=(features.name,),
        output_names=(output,),
        dynamic_axes={features.name: tracing.axes, output: tracing.axes if output_axes is None else output_axes},
        task=task,
    )


def kernel_partition(name: str, module: nn.Module, spec: ExpertSpec, layer: int) -> GraphPartition:
    """The partition of an expert kernel: ``module(x, *weights) -> y`` with the weights of ``spec`` as inputs.

    One graph serves every expert of that shape; the runtime feeds each expert's weights.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(KERNEL_EXAMPLE_TOKENS, spec.d_model, generator=gen)
    # Weights at a realistic scale (1/sqrt(fan-in)), so the export check sees realistic values.
    params = tuple(torch.randn(*p.shape, generator=gen) / p.shape[0] ** 0.5 for p in spec.params)
    return GraphPartition(
        name=name,
        kind="expert_kernel",
        module=module,
        example_inputs=(x, *params),
        input_names=("x", *(p.name for p in spec.params)),
        output_names=("y",),
        dynamic_axes={"x": {0: "tokens"}, "y": {0: "tokens"}},
        layer=layer,
    )


class PreNormSegment(nn.Module):
    """Blocks ``start..stop-1`` in full, then the attention half of block ``stop`` (an MoE block).

    For models with ``embed``, ``blocks`` (each with ``attend(x)`` and ``norm2``) and a final
    ``norm``. The first segment starts from the model input; later ones add the previous MoE
    output to the residual stream first. The last segment ends with the final norm instead of an
    MoE block.
    """

    def __init__(self, model: nn.Module, start: int, stop: int, first: bool, last: bool):
        super().__init__()
        self.model = model
        self.start, self.stop, self.first, self.last = start, stop, first, last

    def forward(self, *args: torch.Tensor):
        x = self.model.embed(args[0]) if self.first else args[0] + args[1]
        for i in range(self.start, self.stop):
            x = self.model.blocks[i](x)
        if self.last:
            return self.model.norm(x)
        moe_block = self.model.blocks[self.stop]
        x = moe_block.attend(x)
        return x, moe_block.norm2(x)


class PreNormStepSegment(PreNormSegment):
    """:class:`PreNormSegment` for generation: new tokens at positions ``past..`` on a key/value cache.

    For models whose blocks' ``attn(x, cache)`` takes ``(keys, values, positions)`` and returns
    ``(out, keys, values)`` with the new tokens written in (see ``models.moe_lm``). Inputs and
    outputs as :func:`step_partition` describes.
    """

    @property
    def attention_layers(self) -> range:
        """The blocks whose attention this segment runs (the MoE block it ends at included)."""
        return range(self.start, self.stop + (0 if self.last else 1))

    def forward(self, *args: torch.Tensor):
        n = 1 if self.first else 2
        x = self.model.embed(args[0]) if self.first else args[0] + args[1]
        past, flat = args[n], list(args[n + 1 :])
        pos = past + torch.arange(x.shape[1], device=x.device)
        out_caches = []
        for j, i in enumerate(self.attention_layers):
            block = self.model.blocks[i]
            a, k, v = block.attn(block.norm1(x), (flat[2 * j], flat[2 * j + 1], pos))
            out_caches += [k, v]
            x = x + a
            if i == self.stop:  # the MoE block: its MLP input leaves the segment
                return (x, block.norm2(x), *out_caches)
            x = x + block.mlp(block.norm2(x))
        return (self.model.norm(x), *out_caches)


class SwiGLUKernel(nn.Module):
    """``(act(x @ w_gate) * (x @ w_up)) @ w_down`` with every weight a graph input.

    Args:
        act: The activation: a module (registered as a submodule) or a function.
    """

    def __init__(self, act: nn.Module | Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.act = act

    def forward(self, x, w_gate, w_up, w_down):
        return (self.act(x @ w_gate) * (x @ w_up)) @ w_down


def keep_mask(num_experts: int, keep: Iterable[int]) -> torch.Tensor:
    """Boolean mask over ``num_experts`` experts, true for those in ``keep``."""
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[list(keep)] = True
    return mask


def keep_masks(
    keep: dict[int, tuple[int, ...]] | None, num_experts: int, blocks: Sequence[int] | None = None
) -> dict[int, torch.Tensor] | None:
    """Per-MoE-layer kept expert sets as masks (None stays None).

    Keyed by block index, ``blocks[layer]``, or by the layer itself where ``blocks`` is None.
    """
    if keep is None:
        return None
    return {
        layer if blocks is None else blocks[layer]: keep_mask(num_experts, experts) for layer, experts in keep.items()
    }


def record_routes(
    routers: Iterable[nn.Module], run: Callable[[], object], pick: Callable[[object], tuple] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Routing decisions of ``routers``, recorded by forward hooks while ``run()`` runs the model.

    Args:
        routers: One router module per MoE layer, in layer order.
        run: Runs the model once.
        pick: Turns a router's output into (experts, scores) tensors (default: its first two outputs).

    Returns:
        Per router call, the chosen experts and their scores (fp32).
    """
    records: list[tuple[np.ndarray, np.ndarray]] = []

    def record(_module, _inputs, out):
        experts, scores = (out[0], out[1]) if pick is None else pick(out)
        records.append((experts.numpy().copy(), scores.float().numpy().copy()))

    hooks = [router.register_forward_hook(record) for router in routers]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return records


def float32_array(t: torch.Tensor) -> np.ndarray:
    """A weight as a contiguous fp32 array (as expert weights are stored in bundles)."""
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))
