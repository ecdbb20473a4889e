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

from ..errors import ConfigError, InputError
from ..ir import (
    ExpertSpec,
    ModelIR,
    MoELayerSpec,
    ParamSpec,
    RouterSpec,
    TaskSpec,
    TensorSpec,
)
from ..models.moe_lm import MoELM, text
from . import partitions
from .base import GraphPartition, NativeAdapter

TASK = "lm"
CALIB_SEQ = 32  # sequence length of calibration inputs
TEXT_SEQ = 128  # ... and of calibration and held-out windows of text-trained models (routing has context)
# Graphs take any batch size and sequence length; examples are traced with 2 sequences of 7 tokens.
TRACING = partitions.Tracing({0: "batch", 1: "seq"}, seq=7)


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
        self.register_buffer("keep", None if everything else partitions.keep_mask(self.router.num_experts, keep))

    def forward(self, h: torch.Tensor):
        idx, scores = self.router(h, self.keep)
        if not self.n_shared:
            return idx, scores
        ones = torch.ones_like(h[..., :1])
        return idx, scores, ones.repeat(*([1] * (h.dim() - 1)), self.n_shared)


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
    return {
        "w_gate": partitions.float32_array(expert.w_gate.weight.T),
        "w_up": partitions.float32_array(expert.w_up.weight.T),
        "w_down": partitions.float32_array(expert.w_down.weight.T),
    }


class MoELMAdapter(NativeAdapter):
    """Captures a :class:`~edgemoe.models.moe_lm.MoELM` and cuts it into partitions."""

    family = "moe_lm"

    # -- capture -------------------------------------------------------------------------
    def _capture(self) -> ModelIR:
        cfg = self.cfg
        d = cfg.dim
        ids = TensorSpec("input_ids", (None, None), dtype="int64", high=cfg.vocab_size, sample_shape=(1, 16))
        features = TensorSpec("features", (None, None, d))
        moe_blocks = cfg.moe_blocks
        descriptions = partitions.span_descriptions(moe_blocks, cfg.depth, embed="token embedding + ")
        segments = partitions.trunk_segments(ids, features, (None, None, d), descriptions)
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
            segments=segments,
            moe_layers=layers,
            params=sum(p.numel() for p in self.model.parameters()),
            config=dict(vars(cfg)),
        )

    # -- reference execution -------------------------------------------------------------
    def _ids(self, x: np.ndarray) -> torch.Tensor:
        x = np.asarray(x)
        if x.ndim != 2 or x.dtype.kind not in "iu":
            raise InputError(f"token ids must be an integer array (batch, seq), got {x.dtype} {list(x.shape)}")
        if x.size and (x.min() < 0 or x.max() >= self.cfg.vocab_size):
            raise InputError(f"token ids must lie in [0, {self.cfg.vocab_size}), got [{x.min()}, {x.max()}]")
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))

    @torch.no_grad()
    def reference(self, x: np.ndarray, task: str, keep: dict[int, tuple[int, ...]] | None = None) -> np.ndarray:
        self.task_index(task)
        return self.model(self._ids(x), partitions.keep_masks(keep, self.cfg.num_experts, self.cfg.moe_blocks)).numpy()

    @torch.no_grad()
    def route(self, x: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        self.task_index(task)
        ids = self._ids(x)
        return partitions.record_routes(
            [self.model.blocks[b].moe.router for b in self.cfg.moe_blocks], lambda: self.model(ids)
        )

    def calibration_inputs(self, samples: int, seed: int) -> np.ndarray:
        """``samples`` sequences of :data:`CALIB_SEQ` uniform random token ids.

        For a model trained on text (``models/moe_lm/text.py``): windows of :data:`TEXT_SEQ` bytes of
        the corpus's calibration split (disjoint from its training and held-out parts).
        """
        if text.is_text_model(self.cfg.name):
            return text.windows("calibration", samples, TEXT_SEQ, seed)
        rng = np.random.default_rng(seed)
        return rng.integers(0, self.cfg.vocab_size, size=(samples, CALIB_SEQ), dtype=np.int64)

    def evaluation_data(self, samples: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Held-out inputs.

        For a text-trained model: byte windows of the corpus's held-out split (never trained or
        calibrated on) with their next bytes as ``lm`` targets; else the default, without targets.
        """
        if not text.is_text_model(self.cfg.name):
            return super().evaluation_data(samples, seed)
        w = text.windows("heldout", samples, TEXT_SEQ + 1, seed + 7919)
        return np.ascontiguousarray(w[:, :-1]), {TASK: np.ascontiguousarray(w[:, 1:])}

    def task_metric(
        self, task: str, prediction: np.ndarray, target: np.ndarray | None, reference: np.ndarray
    ) -> tuple[str, float, bool]:
        """Bits per token of the targets under the logits when there are targets (lower is better)."""
        if target is None:
            return super().task_metric(task, prediction, target, reference)
        logits = prediction.reshape(-1, prediction.shape[-1]).astype(np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -logp[np.arange(len(logp)), target.reshape(-1)]
        return "bits_per_token", float(nll.mean() / np.log(2)), False

    # -- partitions ----------------------------------------------------------------------
    def segment(self, index: int) -> GraphPartition:
        start, stop, last = partitions.segment_bounds(index, self.cfg.moe_blocks, self.cfg.depth)
        module = partitions.PreNormSegment(self.model, start, stop, first=index == 0, last=last)
        return partitions.segment_partition(self._ir.segments[index], module, TRACING)

    def tokenizer(self) -> dict | None:
        # The text-trained models read UTF-8 bytes (vocab 256); the random-weight ones have no text.
        return {"kind": "bytes"} if self.ir.name in text.TEXT_MODELS else None

    def step_segment(self, index: int, max_seq: int) -> GraphPartition:
        """Trunk segment ``index`` for generation, on a key/value cache of ``max_seq`` positions."""
        partitions.check_max_seq(max_seq)
        start, stop, last = partitions.segment_bounds(index, self.cfg.moe_blocks, self.cfg.depth)
        module = partitions.PreNormStepSegment(self.model, start, stop, first=index == 0, last=last)
        if not module.attention_layers:  # no attention, nothing cached: the plain segment serves
            return self.segment(index)
        kv = (self.cfg.heads, self.cfg.head_dim)
        widths = [(layer, kv, kv) for layer in module.attention_layers]
        return partitions.step_partition(self._ir.segments[index], module, widths, max_seq, TRACING.axes)

    def gate(self, layer: int, task: str, keep: tuple[int, ...]) -> GraphPartition:
        self.task_index(task)
        spec = self._ir.moe_layers[layer]
        partitions.check_kept(layer, keep, spec.top_k)
        module = _Gate(self.model, spec.block, keep)
        moe_in = self._ir.segments[layer].outputs[1]
        return partitions.gate_partition(task, layer, module, moe_in, TRACING, shared=bool(spec.shared_experts))

    def head(self, task: str) -> GraphPartition:
        self.task_index(task)
        return partitions.head_partition(
            task, self.model.lm_head, self._ir.segments[-1].outputs[0], TRACING, output="logits"
        )

    def _kernel(self, spec: ExpertSpec, layer: int) -> GraphPartition:
        return partitions.kernel_partition(
            f"expert_kernel_swiglu_{spec.d_model}x{spec.hidden}", partitions.SwiGLUKernel(F.silu), spec, layer
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
