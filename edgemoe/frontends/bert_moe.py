"""Adapter for the bert_moe family (a dense BERT sentence encoder moefied by ``edgemoe moefy``).

Token-level MoE: one router per layer, shared by the single task ``embedding`` (mean pooling
over tokens + L2 normalisation, as sentence-transformers does for all-MiniLM-L6-v2). The
bundle takes ``input_ids`` with no padding: one sentence, or sentences of equal length (the
attention mask is all ones). Experts' outputs are summed unweighted, so the gates output
scores of one; the FFN's output bias is applied once, in the next segment.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..ir import (
    ExpertSpec,
    ModelIR,
    MoELayerSpec,
    ParamSpec,
    RouterSpec,
    TaskSpec,
    TensorSpec,
)
from ..models.bert_moe import BertMoE
from ..models.bert_moe.model import mean_pool
from . import partitions
from .base import GraphPartition, NativeAdapter

TASK = "embedding"
# Graphs take any batch size and number of tokens; examples are traced with 2 sentences of 7 tokens.
TRACING = partitions.Tracing({0: "batch", 1: "tokens"}, seq=7)


class _Segment(nn.Module):
    """Finish MoE block ``index - 1`` (residual + output bias + LayerNorm), then attend in block ``index``.

    The first segment starts from token ids (embeddings); the last ends after the final MoE
    block with the token states. Other segments output the attention result twice: as the
    residual stream (``hidden``) and as the MoE input.
    """

    def __init__(self, model: BertMoE, index: int):
        super().__init__()
        self.model, self.index = model, index
        self.first, self.last = index == 0, index == len(model.layers)

    def forward(self, *args: torch.Tensor):
        if self.first:
            x = self.model.embeddings(args[0])
        else:
            x = self.model.layers[self.index - 1].moe.finish(args[0], args[1])
        if self.last:
            return x
        h = self.model.layers[self.index].attention(x)
        return h, h


class _Gate(nn.Module):
    """A layer's router restricted to the experts in ``keep``; scores are ones (unweighted sum)."""

    def __init__(self, model: BertMoE, layer: int, keep: tuple[int, ...]):
        super().__init__()
        self.moe = model.layers[layer].moe
        mask = partitions.keep_mask(self.moe.num_experts, keep)
        self.register_buffer("keep", None if bool(mask.all()) else mask)

    def forward(self, h: torch.Tensor):
        return self.moe.route(h, self.keep)


class _Head(nn.Module):
    """Mean pooling over tokens and L2 normalisation."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return mean_pool(features)


class _ExpertKernel(nn.Module):
    """``gelu(x @ w1 + b1) @ w2`` with every weight a graph input (no per-expert output bias)."""

    def forward(self, x, w1, b1, w2):
        return F.gelu(x @ w1 + b1) @ w2


class BertMoEAdapter(NativeAdapter):
    """Captures a :class:`~edgemoe.models.bert_moe.BertMoE` and cuts it into partitions."""

    family = "bert_moe"

    # -- capture -------------------------------------------------------------------------
    def _capture(self) -> ModelIR:
        cfg = self.cfg
        d, h = cfg.hidden_size, cfg.expert_hidden
        ids = TensorSpec("input_ids", (None, None), dtype="int64", high=cfg.vocab_size, sample_shape=(1, 16))
        features = TensorSpec("features", (None, None, d))
        descriptions = [
            ("embeddings" if i == 0 else f"finish MoE FFN of block {i - 1}")
            + (" (final token states)" if i == cfg.num_layers else f" + attention of block {i}")
            for i in range(cfg.num_layers + 1)
        ]
        segments = partitions.trunk_segments(ids, features, (None, None, d), descriptions)
        expert = ExpertSpec(
            d_model=d,
            hidden=h,
            activation="gelu",
            params=(ParamSpec("w1", (d, h)), ParamSpec("b1", (h,)), ParamSpec("w2", (h, d))),
        )
        router = RouterSpec(task=None, num_experts=cfg.num_experts, top_k=cfg.top_k, score="ones", normalize=False)
        layers = tuple(
            MoELayerSpec(
                index=i, block=i, num_experts=cfg.num_experts, top_k=cfg.top_k, expert=expert, routers=(router,)
            )
            for i in range(cfg.num_layers)
        )
        return ModelIR(
            name=cfg.name,
            family=self.family,
            granularity="token",
            input=ids,
            tasks=(TaskSpec(TASK, TensorSpec(TASK, (None, d)), kind="embedding"),),
            segments=segments,
            moe_layers=layers,
            params=sum(p.numel() for p in self.model.parameters()),
            config=dict(vars(cfg)),
        )

    # -- reference execution -------------------------------------------------------------
    def _ids(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x).astype(np.int64, copy=False))

    @torch.no_grad()
    def reference(self, x: np.ndarray, task: str, keep: dict[int, tuple[int, ...]] | None = None) -> np.ndarray:
        self.task_index(task)
        return self.model(self._ids(x), keep=partitions.keep_masks(keep, self.cfg.num_experts)).numpy()

    @torch.no_grad()
    def route(self, x: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        self.task_index(task)
        records = []
        h = self.model.embeddings(self._ids(x))
        for layer in self.model.layers:
            h = layer.attention(h)
            idx, scores = layer.moe.route(h)
            records.append((idx.reshape(-1, idx.shape[-1]).numpy(), scores.reshape(-1, idx.shape[-1]).numpy()))
            h = layer.moe.finish(h, layer.moe.mix(h))
        return records

    # -- partitions ----------------------------------------------------------------------
    def segment(self, index: int) -> GraphPartition:
        return partitions.segment_partition(self._ir.segments[index], _Segment(self.model, index), TRACING)

    def gate(self, layer: int, task: str, keep: tuple[int, ...]) -> GraphPartition:
        self.task_index(task)
        partitions.check_kept(layer, keep, self._ir.moe_layers[layer].top_k)
        module = _Gate(self.model, layer, keep)
        return partitions.gate_partition(task, layer, module, self._ir.segments[layer].outputs[1], TRACING)

    def head(self, task: str) -> GraphPartition:
        self.task_index(task)
        # One embedding per sentence: the output has no token axis.
        features = self._ir.segments[-1].outputs[0]
        return partitions.head_partition(task, _Head(), features, TRACING, output_axes={0: "batch"})

    def expert_kernel(self, layer: int) -> GraphPartition:
        spec = self._ir.moe_layers[layer].expert
        name = f"expert_kernel_gelu_nob2_{spec.d_model}x{spec.hidden}"
        return partitions.kernel_partition(name, _ExpertKernel(), spec, layer)

    def expert_weights(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        moe = self.model.layers[layer].moe
        return {
            "w1": partitions.float32_array(moe.w1[expert]),
            "b1": partitions.float32_array(moe.b1[expert]),
            "w2": partitions.float32_array(moe.w2[expert]),
        }
