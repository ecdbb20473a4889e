"""Adapter for the M³ViT family (task-level MoE ViT, ``models/m3vit``)."""

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
from ..models.m3vit import M3ViT
from . import partitions
from .base import GraphPartition, NativeAdapter

# Graphs take any batch size; the image size is fixed.
TRACING = partitions.Tracing({0: "batch"})


class _Gate(nn.Module):
    """A task's gate of one MoE layer, with the task embedding and the kept set folded in."""

    def __init__(self, model: M3ViT, block: int, task: int, keep: tuple[int, ...]):
        super().__init__()
        self.gate = model.blocks[block].moe.gates[task]
        cond = model.task_cond(task)
        self.register_buffer("cond", None if cond is None else cond.detach().clone())
        self.register_buffer("keep", partitions.keep_mask(self.gate.num_experts, keep))

    def forward(self, h: torch.Tensor):
        return self.gate(h, self.cond, self.keep)


class _Tokens(nn.Module):
    """The head of a backbone task: the last segment's tokens, unchanged."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _ExpertKernel(nn.Module):
    """``gelu(x @ w1 + b1) @ w2 + b2`` with every weight a graph input."""

    def forward(self, x, w1, b1, w2, b2):
        return F.gelu(x @ w1 + b1) @ w2 + b2


class M3ViTAdapter(NativeAdapter):
    """Captures an :class:`~edgemoe.models.m3vit.M3ViT` and cuts it into partitions."""

    family = "m3vit"

    # -- capture -------------------------------------------------------------------------
    def _capture(self) -> ModelIR:
        cfg = self.cfg
        n, d = cfg.num_tokens, cfg.dim
        image = TensorSpec("image", (None, cfg.in_chans, *cfg.img_size))
        features = TensorSpec("features", (None, n, d))
        moe_blocks = cfg.moe_blocks
        segments = partitions.trunk_segments(
            image, features, (None, n, d), partitions.span_descriptions(moe_blocks, cfg.depth)
        )
        expert = ExpertSpec(
            d_model=d,
            hidden=cfg.expert_hidden,
            activation="gelu",
            params=(
                ParamSpec("w1", (d, cfg.expert_hidden)),
                ParamSpec("b1", (cfg.expert_hidden,)),
                ParamSpec("w2", (cfg.expert_hidden, d)),
                ParamSpec("b2", (d,)),
            ),
        )
        layers = []
        for li, block in enumerate(moe_blocks):
            gates = self.model.blocks[block].moe.gates
            routers = tuple(
                RouterSpec(
                    task=name,
                    num_experts=gates[t].num_experts,
                    top_k=gates[t].top_k,
                    score="softmax",
                    normalize=False,
                    window=cfg.expert_window(t),
                    cond_dim=cfg.task_cond_dim,
                )
                for t, name in enumerate(cfg.task_names)
            )
            layers.append(
                MoELayerSpec(
                    index=li,
                    block=block,
                    num_experts=len(self.model.blocks[block].moe.experts),
                    top_k=cfg.top_k,
                    expert=expert,
                    routers=routers,
                )
            )
        # A backbone task (0 channels) outputs the last block's tokens: kind "tokens".
        tasks = tuple(
            TaskSpec(name, TensorSpec(name, (None, ch, *cfg.img_size)), kind="dense")
            if ch
            else TaskSpec(name, TensorSpec(name, (None, n, d)), kind="tokens")
            for name, ch in cfg.tasks
        )
        config = dict(vars(cfg))
        return ModelIR(
            name=cfg.name,
            family=self.family,
            granularity="task",
            input=image,
            tasks=tasks,
            segments=segments,
            moe_layers=tuple(layers),
            params=sum(p.numel() for p in self.model.parameters()),
            config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        )

    # -- reference execution -------------------------------------------------------------
    @torch.no_grad()
    def reference(self, x: np.ndarray, task: str, keep: dict[int, tuple[int, ...]] | None = None) -> np.ndarray:
        self.task_index(task)
        masks = partitions.keep_masks(keep, self.cfg.num_experts, self.cfg.moe_blocks)
        return self.model(torch.from_numpy(np.ascontiguousarray(x)), task, masks).numpy()

    @torch.no_grad()
    def route(self, x: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        t = self.task_index(task)
        gates = [self.model.blocks[b].moe.gates[t] for b in self.cfg.moe_blocks]
        return partitions.record_routes(gates, lambda: self.model(torch.from_numpy(np.ascontiguousarray(x)), task))

    # -- partitions ----------------------------------------------------------------------
    def segment(self, index: int) -> GraphPartition:
        start, stop, last = partitions.segment_bounds(index, self.cfg.moe_blocks, self.cfg.depth)
        module = partitions.PreNormSegment(self.model, start, stop, first=index == 0, last=last)
        return partitions.segment_partition(self._ir.segments[index], module, TRACING)

    def gate(self, layer: int, task: str, keep: tuple[int, ...]) -> GraphPartition:
        t = self.task_index(task)
        spec = self._ir.moe_layers[layer]
        partitions.check_kept(layer, keep, spec.top_k, task)
        module = _Gate(self.model, spec.block, t, keep)
        return partitions.gate_partition(task, layer, module, self._ir.segments[layer].outputs[1], TRACING)

    def head(self, task: str) -> GraphPartition:
        self.task_index(task)
        module = self.model.heads[task] if task in self.model.heads else _Tokens()
        return partitions.head_partition(task, module, self._ir.segments[-1].outputs[0], TRACING)

    def expert_kernel(self, layer: int) -> GraphPartition:
        spec = self._ir.moe_layers[layer].expert
        return partitions.kernel_partition(f"expert_kernel_{spec.d_model}x{spec.hidden}", _ExpertKernel(), spec, layer)

    def expert_weights(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        e = self.model.blocks[self.cfg.moe_blocks[layer]].moe.experts[expert]
        return {
            "w1": partitions.float32_array(e.fc1.weight.T),
            "b1": partitions.float32_array(e.fc1.bias),
            "w2": partitions.float32_array(e.fc2.weight.T),
            "b2": partitions.float32_array(e.fc2.bias),
        }

    # -- evaluation ------------------------------------------------------------------------
    def calibration_inputs(self, samples: int, seed: int) -> np.ndarray:
        """Procedural scenes from the training range, not noise images.

        Routing profiles, pruning and static int8 ranges fitted on noise misfit real scenes (int8
        depth RMSE +2.7 % on the previous checkpoint).
        """
        if set(self.cfg.task_names) - {"semseg", "depth"}:
            return super().calibration_inputs(samples, seed)
        from ..models.m3vit.scenes import make_batch

        start = seed * 1_000  # below scenes.HELD_OUT_START: never an evaluation scene
        return make_batch(range(start, start + samples), self.cfg.mean, self.cfg.std, *self.cfg.img_size)[0]

    def evaluation_data(self, samples: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Held-out procedural scenes (never drawn in training) with class and depth labels.

        Backbone tasks get no labels (their metric is the cosine to the fp32 model's tokens).
        """
        if set(self.cfg.task_names) - {"semseg", "depth"}:
            return super().evaluation_data(samples, seed)
        from ..models.m3vit.scenes import HELD_OUT_START, make_batch

        start = HELD_OUT_START + 10_000 + seed * 1_000
        x, labels, depth = make_batch(range(start, start + samples), self.cfg.mean, self.cfg.std, *self.cfg.img_size)
        targets = {"semseg": labels, "depth": depth}
        headed = {name: targets[name] for name, ch in self.cfg.tasks if ch}
        return x, headed or None

    def task_metric(
        self, task: str, prediction: np.ndarray, target: np.ndarray | None, reference: np.ndarray
    ) -> tuple[str, float, bool]:
        """Task metric: mIoU for ``semseg``, RMSE for ``depth`` (as models/m3vit/evaluate.py computes them)."""
        if target is None:
            return super().task_metric(task, prediction, target, reference)
        if task == "semseg":
            n = prediction.shape[1]
            pred = prediction.argmax(1)
            conf = np.bincount((target * n + pred).ravel(), minlength=n * n).reshape(n, n)
            tp = np.diag(conf).astype(np.float64)
            union = conf.sum(0) + conf.sum(1) - tp
            return "miou", float(np.nanmean(np.where(union > 0, tp / np.maximum(union, 1), np.nan))), True
        pred = np.maximum(prediction[:, 0].astype(np.float64), 1e-3)
        return "depth_rmse", float(np.sqrt(((pred - target) ** 2).mean())), False
