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

from ..errors import ConfigError, TaskError
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
from ..models.bert_moe import BertMoE
from ..models.bert_moe.model import mean_pool
from .base import GraphPartition, ModelAdapter

TASK = "embedding"
TOKENS = {0: "batch", 1: "tokens"}


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
        mask = torch.zeros(self.moe.num_experts, dtype=torch.bool)
        mask[list(keep)] = True
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


class BertMoEAdapter(ModelAdapter):
    """Captures a :class:`~edgemoe.models.bert_moe.BertMoE` and cuts it into partitions."""

    family = "bert_moe"

    def __init__(self, model: BertMoE):
        self.model = model.eval()
        self.cfg = model.cfg
        self._ir = validate_ir(self._capture())

    # -- capture -------------------------------------------------------------------------
    def _capture(self) -> ModelIR:
        cfg = self.cfg
        d, h = cfg.hidden_size, cfg.expert_hidden
        ids = TensorSpec("input_ids", (None, None), dtype="int64", high=cfg.vocab_size, sample_shape=(1, 16))
        hidden = TensorSpec("hidden", (None, None, d))
        residual = TensorSpec("residual", (None, None, d))  # a graph input may not share an output's name
        moe_in = TensorSpec("moe_input", (None, None, d))
        moe_out = TensorSpec("moe_output", (None, None, d))
        features = TensorSpec("features", (None, None, d))
        segments = []
        for i in range(cfg.num_layers + 1):
            ins = (ids,) if i == 0 else (residual, moe_out)
            outs = (features,) if i == cfg.num_layers else (hidden, moe_in)
            desc = "embeddings" if i == 0 else f"finish MoE FFN of block {i - 1}"
            desc += " (final token states)" if i == cfg.num_layers else f" + attention of block {i}"
            segments.append(DenseSegmentSpec(i, desc, ins, outs))
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
        return torch.from_numpy(np.ascontiguousarray(x).astype(np.int64, copy=False))

    @torch.no_grad()
    def reference(self, x: np.ndarray, task: str, keep: dict[int, tuple[int, ...]] | None = None) -> np.ndarray:
        self._check_task(task)
        masks = None
        if keep is not None:
            masks = {}
            for li, experts in keep.items():
                mask = torch.zeros(self.cfg.num_experts, dtype=torch.bool)
                mask[list(experts)] = True
                masks[li] = mask
        return self.model(self._ids(x), keep=masks).numpy()

    @torch.no_grad()
    def route(self, x: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        self._check_task(task)
        records = []
        h = self.model.embeddings(self._ids(x))
        for layer in self.model.layers:
            h = layer.attention(h)
            idx, scores = layer.moe.route(h)
            records.append((idx.reshape(-1, idx.shape[-1]).numpy(), scores.reshape(-1, idx.shape[-1]).numpy()))
            h = layer.moe.finish(h, layer.moe.mix(h))
        return records

    # -- partitions ----------------------------------------------------------------------
    def _example(self, spec: TensorSpec, batch: int = 2, tokens: int = 7) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        if spec.dtype == "int64":
            return torch.randint(0, spec.high or 2, (batch, tokens), generator=gen)
        # LayerNorm'd-scale states, as the trunk produces them.
        return torch.randn(batch, tokens, *spec.shape[2:], generator=gen)

    def segment(self, index: int) -> GraphPartition:
        spec = self._ir.segments[index]
        names = tuple(s.name for s in spec.inputs), tuple(s.name for s in spec.outputs)
        return GraphPartition(
            name=f"segment_{index}",
            kind="segment",
            module=_Segment(self.model, index),
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
        return GraphPartition(
            name=f"gate_{task}_{layer}",
            kind="gate",
            module=_Gate(self.model, layer, keep),
            example_inputs=(self._example(self._ir.segments[layer].outputs[1]),),
            input_names=("moe_input",),
            output_names=("experts", "scores"),
            dynamic_axes={"moe_input": TOKENS, "experts": TOKENS, "scores": TOKENS},
            task=task,
            layer=layer,
        )

    def head(self, task: str) -> GraphPartition:
        self._check_task(task)
        return GraphPartition(
            name=f"head_{task}",
            kind="head",
            module=_Head(),
            example_inputs=(self._example(self._ir.segments[-1].outputs[0]),),
            input_names=("features",),
            output_names=(task,),
            dynamic_axes={"features": TOKENS, task: {0: "batch"}},
            task=task,
        )

    def expert_kernel(self, layer: int) -> GraphPartition:
        spec = self._ir.moe_layers[layer].expert
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, spec.d_model, generator=gen)
        # Weights at a realistic scale (1/sqrt(fan-in)), so the export check sees realistic values.
        params = tuple(torch.randn(*p.shape, generator=gen) / p.shape[0] ** 0.5 for p in spec.params)
        return GraphPartition(
            name=f"expert_kernel_gelu_nob2_{spec.d_model}x{spec.hidden}",
            kind="expert_kernel",
            module=_ExpertKernel(),
            example_inputs=(x, *params),
            input_names=("x", *(p.name for p in spec.params)),
            output_names=("y",),
            dynamic_axes={"x": {0: "tokens"}, "y": {0: "tokens"}},
            layer=layer,
        )

    def expert_weights(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        moe = self.model.layers[layer].moe

        def arr(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))

        return {"w1": arr(moe.w1[expert]), "b1": arr(moe.b1[expert]), "w2": arr(moe.w2[expert])}
