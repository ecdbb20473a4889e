"""Adapter for the M³ViT family (task-level MoE ViT, ``models/m3vit``)."""

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
from ..models.m3vit import M3ViT
from .base import GraphPartition, ModelAdapter

BATCH = {0: "batch"}


class _Segment(nn.Module):
    """Blocks ``start..stop-1`` in full, then the attention half of block ``stop`` (an MoE block).

    The first segment starts from the image; later ones add the previous MoE output to the
    residual stream first. The last segment ends with the final norm instead of an MoE block.
    """

    def __init__(self, model: M3ViT, start: int, stop: int, first: bool, last: bool):
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
    """A task's gate of one MoE layer, with the task embedding and the kept set folded in."""

    def __init__(self, model: M3ViT, block: int, task: int, keep: tuple[int, ...]):
        super().__init__()
        self.gate = model.blocks[block].moe.gates[task]
        cond = model.task_cond(task)
        self.register_buffer("cond", None if cond is None else cond.detach().clone())
        mask = torch.zeros(self.gate.num_experts, dtype=torch.bool)
        mask[list(keep)] = True
        self.register_buffer("keep", mask)

    def forward(self, h: torch.Tensor):
        return self.gate(h, self.cond, self.keep)


class _ExpertKernel(nn.Module):
    """``gelu(x @ w1 + b1) @ w2 + b2`` with every weight a graph input."""

    def forward(self, x, w1, b1, w2, b2):
        return F.gelu(x @ w1 + b1) @ w2 + b2


class M3ViTAdapter(ModelAdapter):
    """Captures an :class:`~edgemoe.models.m3vit.M3ViT` and cuts it into partitions."""

    family = "m3vit"

    def __init__(self, model: M3ViT):
        self.model = model.eval()
        self.cfg = model.cfg
        self._ir = validate_ir(self._capture())

    # -- capture -------------------------------------------------------------------------
    def _capture(self) -> ModelIR:
        cfg = self.cfg
        n, d = cfg.num_tokens, cfg.dim
        hidden = TensorSpec("hidden", (None, n, d))
        residual = TensorSpec("residual", (None, n, d))
        moe_in = TensorSpec("moe_input", (None, n, d))
        moe_out = TensorSpec("moe_output", (None, n, d))
        image = TensorSpec("image", (None, cfg.in_chans, *cfg.img_size))
        features = TensorSpec("features", (None, n, d))
        moe_blocks = cfg.moe_blocks
        segments = []
        bounds = [-1, *moe_blocks]
        for i in range(len(moe_blocks) + 1):
            start = bounds[i] + 1
            last = i == len(moe_blocks)
            stop = cfg.depth if last else moe_blocks[i]
            ins = (image,) if i == 0 else (residual, moe_out)
            outs = (features,) if last else (hidden, moe_in)
            desc = f"blocks {start}..{stop - 1}" if stop > start else "no full blocks"
            desc += " + final norm" if last else f" + attention of block {stop}"
            segments.append(DenseSegmentSpec(i, desc, ins, outs))
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
        tasks = tuple(
            TaskSpec(name, TensorSpec(name, (None, ch, *cfg.img_size)), kind="dense") for name, ch in cfg.tasks
        )
        config = dict(vars(cfg))
        return ModelIR(
            name=cfg.name,
            family=self.family,
            granularity="task",
            input=image,
            tasks=tasks,
            segments=tuple(segments),
            moe_layers=tuple(layers),
            params=sum(p.numel() for p in self.model.parameters()),
            config={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        )

    @property
    def ir(self) -> ModelIR:
        return self._ir

    # -- reference execution -------------------------------------------------------------
    def _task(self, task: str) -> int:
        if task not in self.cfg.task_names:
            raise TaskError(f"unknown task '{task}' (model has: {', '.join(self.cfg.task_names)})")
        return self.cfg.task_names.index(task)

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
        self._task(task)
        return self.model(torch.from_numpy(np.ascontiguousarray(x)), task, self._keep_masks(keep)).numpy()

    @torch.no_grad()
    def route(self, x: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        t = self._task(task)
        records: list[tuple[np.ndarray, np.ndarray]] = []
        hooks = [
            self.model.blocks[b]
            .moe.gates[t]
            .register_forward_hook(lambda _m, _i, out: records.append((out[0].numpy().copy(), out[1].numpy().copy())))
            for b in self.cfg.moe_blocks
        ]
        try:
            self.model(torch.from_numpy(np.ascontiguousarray(x)), task)
        finally:
            for h in hooks:
                h.remove()
        return records

    # -- partitions ----------------------------------------------------------------------
    def _example(self, spec: TensorSpec, batch: int = 2) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        return torch.randn(batch, *spec.shape[1:], generator=gen)

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
            dynamic_axes={n: BATCH for n in names[0] + names[1]},
        )

    def gate(self, layer: int, task: str, keep: tuple[int, ...]) -> GraphPartition:
        t = self._task(task)
        spec = self._ir.moe_layers[layer]
        if len(keep) < spec.top_k:
            raise ConfigError(f"layer {layer}: kept set {keep} of task '{task}' is smaller than top-k {spec.top_k}")
        moe_in = self._ir.segments[layer].outputs[1]
        return GraphPartition(
            name=f"gate_{task}_{layer}",
            kind="gate",
            module=_Gate(self.model, spec.block, t, keep),
            example_inputs=(self._example(moe_in),),
            input_names=("moe_input",),
            output_names=("experts", "scores"),
            dynamic_axes={"moe_input": BATCH, "experts": BATCH, "scores": BATCH},
            task=task,
            layer=layer,
        )

    def head(self, task: str) -> GraphPartition:
        self._task(task)
        features = self._ir.segments[-1].outputs[0]
        return GraphPartition(
            name=f"head_{task}",
            kind="head",
            module=self.model.heads[task],
            example_inputs=(self._example(features),),
            input_names=("features",),
            output_names=(task,),
            dynamic_axes={"features": BATCH, task: BATCH},
            task=task,
        )

    def expert_kernel(self, layer: int) -> GraphPartition:
        spec = self._ir.moe_layers[layer].expert
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(5, spec.d_model, generator=gen)
        # Weights at a realistic scale (1/sqrt(fan-in)), so the export check sees realistic values.
        params = tuple(torch.randn(*p.shape, generator=gen) / p.shape[0] ** 0.5 for p in spec.params)
        return GraphPartition(
            name=f"expert_kernel_{spec.d_model}x{spec.hidden}",
            kind="expert_kernel",
            module=_ExpertKernel(),
            example_inputs=(x, *params),
            input_names=("x", *(p.name for p in spec.params)),
            output_names=("y",),
            dynamic_axes={"x": {0: "tokens"}, "y": {0: "tokens"}},
            layer=layer,
        )

    def expert_weights(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        block = self.cfg.moe_blocks[layer]
        e = self.model.blocks[block].moe.experts[expert]

        def arr(t: torch.Tensor) -> np.ndarray:
            return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))

        return {
            "w1": arr(e.fc1.weight.T),
            "b1": arr(e.fc1.bias),
            "w2": arr(e.fc2.weight.T),
            "b2": arr(e.fc2.bias),
        }

    # -- evaluation ------------------------------------------------------------------------
    def evaluation_data(self, samples: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Held-out procedural scenes (never drawn in training) with class and depth labels."""
        if set(self.cfg.task_names) - {"semseg", "depth"}:
            return super().evaluation_data(samples, seed)
        from ..models.m3vit.scenes import HELD_OUT_START, make_batch

        start = HELD_OUT_START + 10_000 + seed * 1_000
        x, labels, depth = make_batch(range(start, start + samples), self.cfg.mean, self.cfg.std, *self.cfg.img_size)
        return x, {"semseg": labels, "depth": depth}

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
