"""Token dispatch kernels: what keeps a run's activations on the device between graphs.

A run of graphs hands activations from graph to graph. On a GPU, copying them to numpy to pick each
expert's tokens and add its weighted output costs more than the graphs themselves (on an H100,
most of a 24 ms m3vit-tiny run). Three small graphs do that work where the activations are:

- ``dispatch_gather(x (N, D), tokens (n,)) -> (n, D)``: the rows an expert's kernel reads;
- ``dispatch_add(acc (N, D), y (N, D), w (N,)) -> acc + w * y``: a shared expert's output, weighed per token;
- ``dispatch_combine(acc (N, D), tokens (n,), y (n, D), w (n,)) -> acc + w * y`` scattered to
  the rows (a token reaches an expert at most once per layer, so rows never collide; the sum is
  a one-hot product, exact since each row has one nonzero term).

All three are symbolic in N, n and D, so one set serves every MoE layer of a bundle. They are torch
modules so that they pass through the same export, compile and numerics check as every other graph;
:class:`~.executor.ResidentProgram` runs them.
"""

from __future__ import annotations

import torch

from ...frontends.base import GraphPartition
from .executor import ADD, COMBINE, GATHER


class _Gather(torch.nn.Module):
    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, tokens)


class _Combine(torch.nn.Module):
    def forward(self, acc: torch.Tensor, tokens: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # acc + onehot(tokens)ᵀ (w * y): each row of the sum has one nonzero term, so it equals the
        # host's `acc[tokens] += w * y` bit for bit (Relax's scatter, IndexPut, logs at every import).
        rows = torch.arange(acc.shape[0], device=acc.device)
        onehot = (rows.unsqueeze(1) == tokens.unsqueeze(0)).to(acc.dtype)
        return acc + onehot @ (y * w.unsqueeze(1))


class _Add(torch.nn.Module):
    def forward(self, acc: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return acc + y * w.unsqueeze(1)


def dispatch_partitions(dim: int = 8) -> list[GraphPartition]:
    """The gather, combine and add graphs, traced at width ``dim`` (every axis stays symbolic)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, dim, generator=gen)
    tokens = torch.tensor([1, 4, 7, 10], dtype=torch.int64)
    y, w = torch.randn(4, dim, generator=gen), torch.rand(4, generator=gen)
    rows, n = {0: "rows", 1: "width"}, {0: "tokens", 1: "width"}
    full = {0: "rows"}
    return [
        GraphPartition(
            GATHER,
            "dispatch",
            _Gather(),
            (x, tokens),
            ("x", "tokens"),
            ("y",),
            {"x": rows, "tokens": {0: "tokens"}},
        ),
        GraphPartition(
            COMBINE,
            "dispatch",
            _Combine(),
            (x, tokens, y, w),
            ("acc", "tokens", "y", "w"),
            ("out",),
            {"acc": rows, "tokens": {0: "tokens"}, "y": n, "w": {0: "tokens"}},
        ),
        GraphPartition(
            ADD,
            "dispatch",
            _Add(),
            (x, x * 0.5, torch.rand(12, generator=gen)),
            ("acc", "y", "w"),
            ("out",),
            {"acc": rows, "y": rows, "w": full},
        ),
    ]
