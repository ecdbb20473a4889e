"""Adapter for the moe_lm family (token-routed decoder-only MoE language models, ``models/moe_lm``).

One router per MoE layer serves every input (granularity ``token``), and the model has a
single task, ``lm``: next-token logits for every position. Graphs take any batch size and
sequence length (dynamic axes 0 and 1).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError, InputError, TaskError
from ..ir import (
    DenseSegmentSpec,
    ExpertSpec,
    ModelIR,
    MoELayerSpec,
    ParamSpec,
    RouterSpec,
    TaskSpec,
    TensorSpec,
    validate_ir,
)
from ..models.moe_lm import MoELM
from .base import GraphPartition, ModelAdapter

TASK = "lm"
TOKENS = {0: "batch", 1: "seq"}
# Sequence length of calibration inputs and of the traced example inputs; the example length
# differs from the example batch so the exporter cannot confuse the two axes.
CALIB_SEQ = 32
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 7


class _Segment(nn.Module):
    """Blocks ``start..stop-1`` in full, then the attention half of block ``stop`` (an MoE block).

    The first segment starts from the token ids; later ones add the previous MoE output to the
    residual stream first. The last segment ends with the final norm instead of an MoE block.
    """

    def __init__(self, model: MoELM, start: int, stop: int, first: bool, last: bool):
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


class _Gate(nn.Module):
    """The router of one MoE layer, with the kept set folded in.

    Layers with shared experts get a third output, one weight per token and shared expert:
    ones, since shared experts are ungated (the runtime multiplies by it).
    """

    def __init__(self, model: MoELM, block: int, keep: tuple[int, ...]):
        super().__init__()
        moe = model.blocks[block].moe
        self.router = moe.router
        self.n_shared = len(moe.shared)
        everything = len(keep) == self.router.num_experts
        mask = torch.zeros(self.router.num_experts, dtype=torch.bool)
        mask[list(keep)] = True
        self.register_buffer("keep", None if everything else mask)

    def forward(self, h: torch.Tensor):
        idx, scores = self.router(h, self.keep)
        if not self.n_shared:
            return idx, scores
        ones = torch.ones_like(h[..., :1])
        return idx, scores, ones.repeat(*([1] * (h.dim() - 1)), self.n_shared)


class _SwiGLUKernel(nn.Module):
    """``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` with every weight a graph input."""

    def forward(self, x, w_gate, w_up, w_down):
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _swiglu_spec(d: int, hidden: int) -> ExpertSpec:
    return ExpertSpec(
        d_model=d,
        hidden=hidden,
        activation="swiglu",
        params=(
            ParamSpec("w_gate", (d, hidden)),
            ParamSpec("w_up", (d, hidden)),
            ParamSpec("w_down", (hidden, d)),
        ),
    )


def _swiglu_weights(expert: nn.Module) -> dict[str, np.ndarray]:
    def arr(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))

    return {
        "w_gate": arr(expert.w_gate.weight.T),
        "w_up": arr(expert.w_up.weight.T),
        "w_down": arr(expert.w_down.weight.T),
    }


class MoELMAdapter(ModelAdapter):
    """Captures a :class:`~edgemoe.models.moe_lm.MoELM` and cuts it into partitions."""

    family = "moe_lm"

    def __init__(self, model: MoELM):
        self.model = model.eval()
        self.cfg = model.cfg
        self._ir = validate_ir(self._capture())

    # -- capture -------------------------------------------------------------------------
    def _capture(self) -> ModelIR:
        cfg = self.cfg
        d = cfg.dim
        ids = TensorSpec("input_ids", (None, None), dtype="int64", high=cfg.vocab_size, sample_shape=(1, 16))
        hidden = TensorSpec("hidden", (None, None, d))
        residual = TensorSpec("residual", (None, None, d))
        moe_in = TensorSpec("moe_input", (None, None, d))
        moe_out = TensorSpec("moe_output", (None, None, d))
        features = TensorSpec("features", (None, None, d))
        moe_blocks = cfg.moe_blocks
        segments = []
        bounds = [-1, *moe_blocks]
        for i in range(len(moe_blocks) + 1):
            start = bounds[i] + 1
            last = i == len(moe_blocks)
            stop = cfg.depth if last else moe_blocks[i]
            ins = (ids,) if i == 0 else (residual, moe_out)
            outs = (features,) if last else (hidden, moe_in)
            desc = "token embedding + " if i == 0 else ""
            desc += f"blocks {start}..{stop - 1}" if stop > start else "no full blocks"
            desc += " + final norm" if last else f" + attention of block {stop}"
            segments.append(DenseSegmentSpec(i, desc, ins, outs))
        expert = _swiglu_spec(d, cfg.expert_hidden)
        shared = _swiglu_spec(d, cfg.shared_width) if cfg.shared_experts else None
        router = RouterSpec(
            task=None, num_experts=cfg.num_experts, top_k=cfg.top_k, score="softmax", normalize=cfg.normalize
        )
        layers = tuple(
            MoELayerSpec(
                index=li,
                block=block,
                num_experts=cfg.num_experts,
                top_k=cfg.top_k,
                expert=expert,
                routers=(router,),
                shared_experts=cfg.shared_experts,
                shared_expert=shared,
            )
            for li, block in enumerate(moe_blocks)
        )
        logits = TensorSpec("logits", (None, None, cfg.vocab_size))
        return ModelIR(
            name=cfg.name,
            family=self.family,
            granularity="token",
            input=ids,
            tasks=(TaskSpec(TASK, logits, kind="lm"),),
            segments=tuple(segments),
            moe_layers=layers,
            params=sum(p.numel() for p in self.model.parameters()),
            config=dict(vars(cfg)),
        )

    @property
    def ir(self) -> ModelIR:
        return self._ir

    # -- reference execution -------------------------------------------------------------
    def _check_task(self, task: str) -> None:
        if task != TASK:
            raise TaskError(f"unknown task '{task}' (model has: {TASK})")

    def _ids(self, x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x)
        if x.ndim != 2 or x.dtype.kind not in "iu":
            raise InputError(f"token ids must be an integer array (batch, seq), got {x.dtype} {list(x.shape)}")
        if x.size and (x.min() < 0 or x.max() >= self.cfg.vocab_size):
            raise InputError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{x.min()}, {x.max()}]")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))

    def _keep_masks(self, keep: dict[int, tuple[int, ...]] | None) -> dict[int, torch.Tensor] | None:
        if keep is None:
            return None
        masks = {}
        for li, experts in keep.items():
            mask = torch.zeros(self.cfg.num_experts, dtype=torch.bool)
            mask[list(experts)] = True
            masks[self.cfg.moe_blocks[li]] = mask
        return masks

    @torch.no_grad()
    def reference(self, x: np.ndarray, task: str, keep: dict[int, tuple[int, ...]] | None = None) -> np.ndarray:
        self._check_task(task)
        return self.model(self._ids(x), self._keep_masks(keep)).numpy()

    @torch.no_grad()
    def route(self, x: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        self._check_task(task)
        records: list[tuple[np.ndarray, np.ndarray]] = []
        hooks = [
            self.model.blocks[b].moe.router.register_forward_hook(
                lambda _m, _i, out: records.append((out[0].numpy().copy(), out[1].numpy().copy()))
            )
            for b in self.cfg.moe_blocks
        ]
        try:
            self.model(self._ids(x))
        finally:
            for h in hooks:
                h.remove()
        return records

    def calibration_inputs(self, samples: int, seed: int) -> np.ndarray:
        """Uniform random token ids, ``samples`` sequences of :data:`CALIB_SEQ` tokens."""
        rng = np.random.default_rng(seed)
        return rng.integers(0, self.cfg.vocab_size, size=(samples, CALIB_SEQ), dtype=np.int64)

    # -- partitions ----------------------------------------------------------------------
    def _example(self, spec: TensorSpec) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        if spec.dtype == "int64":
            return torch.randint(0, spec.high, (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=gen)
        return torch.randn(EXAMPLE_BATCH, EXAMPLE_SEQ, *spec.shape[2:], generator=gen)

    def segment(self, index: int) -> GraphPartition:
        spec = self._ir.segments[index]
        bounds = [-1, *self.cfg.moe_blocks]
        last = index == len(self.cfg.moe_blocks)
        stop = self.cfg.depth if last else self.cfg.moe_blocks[index]
        module = _Segment(self.model, bounds[index] + 1, stop, first=index == 0, last=last)
        names = tuple(s.name for s in spec.inputs), tuple(s.name for s in spec.outputs)
        return GraphPartition(
            name=f"segment_{index}",
            kind="segment",
            module=module,
            example_inputs=tuple(self._example(s) for s in spec.inputs),
            input_names=names[0],
            output_names=names[1],
            dynamic_axes={n: TOKENS for n in names[0] + names[1]},
        )

    def gate(self, layer: int, task: str, keep: tuple[int, ...]) -> GraphPartition:
        self._check_task(task)
        spec = self._ir.moe_layers[layer]
        if len(keep) < spec.top_k:
            raise ConfigError(f"layer {layer}: kept set {keep} is smaller than top-k {spec.top_k}")
        outputs = ("experts", "scores", "shared_scores") if spec.shared_experts else ("experts", "scores")
        return GraphPartition(
            name=f"gate_{task}_{layer}",
            kind="gate",
            module=_Gate(self.model, spec.block, keep),
            example_inputs=(self._example(self._ir.segments[layer].outputs[1]),),
            input_names=("moe_input",),
            output_names=outputs,
            dynamic_axes={n: TOKENS for n in ("moe_input", *outputs)},
            task=task,
            layer=layer,
        )

    def head(self, task: str) -> GraphPartition:
        self._check_task(task)
        features = self._ir.segments[-1].outputs[0]
        return GraphPartition(
            name=f"head_{task}",
            kind="head",
            module=self.model.lm_head,
            example_inputs=(self._example(features),),
            input_names=("features",),
            output_names=("logits",),
            dynamic_axes={"features": TOKENS, "logits": TOKENS},
            task=task,
        )

    def _kernel(self, spec: ExpertSpec, layer: int) -> GraphPartition:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, spec.d_model, generator=gen)
        # Weights at a realistic scale (1/sqrt(fan-in)), so the export check sees realistic values.
        params = tuple(torch.randn(*p.shape, generator=gen) / p.shape[0] ** 0.5 for p in spec.params)
        return GraphPartition(
            name=f"expert_kernel_swiglu_{spec.d_model}x{spec.hidden}",
            kind="expert_kernel",
            module=_SwiGLUKernel(),
            example_inputs=(x, *params),
            input_names=("x", *(p.name for p in spec.params)),
            output_names=("y",),
            dynamic_axes={"x": {0: "tokens"}, "y": {0: "tokens"}},
            layer=layer,
        )

    def expert_kernel(self, layer: int) -> GraphPartition:
        return self._kernel(self._ir.moe_layers[layer].expert, layer)

    def expert_weights(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        return _swiglu_weights(self.model.blocks[self.cfg.moe_blocks[layer]].moe.experts[expert])

    def shared_kernel(self, layer: int) -> GraphPartition | None:
        spec = self._ir.moe_layers[layer]
        return None if spec.shared_expert is None else self._kernel(spec.shared_expert, layer)

    def shared_expert_weights(self, layer: int, index: int) -> dict[str, np.ndarray]:
        shared = self.model.blocks[self.cfg.moe_blocks[layer]].moe.shared
        if not 0 <= index < len(shared):
            raise ConfigError(f"MoE layer {layer} has {len(shared)} shared experts, no shared expert {index}")
        return _swiglu_weights(shared[index])
