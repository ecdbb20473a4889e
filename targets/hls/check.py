"""Checks of an HLS bundle against PyTorch and against its own emulator (``edgemoe verify``).

The emulator reads the bundle's files (``params.bin``, the expert blobs, sha256-checked) and the
manifest's design, so it checks exactly what the accelerator loads; C simulation's raw outputs
must equal its outputs bit for bit, and then the emulator stands for the accelerator on the
held-out data (metrics) without a C++ compiler.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...bundle.format import decode_expert, read_verified
from . import emulate
from .design import Design, read_params, unpack

# An HLS bundle passes verify when its output MSE against fp32 PyTorch is at most this.
MSE_TOLERANCE = 1e-3


class Emulator:
    """The bit-exact emulator of an accelerator: its design, dense tensors (raw) and expert weights (raw).

    Args:
        design: The design.
        params: Raw dense tensors by name.
        expert: (layer, expert) -> raw tensors (``w1``, ``b1``, ``w2``, ``b2``).
    """

    def __init__(self, design: Design, params: dict, expert):
        self.design, self.params, self._expert = design, params, expert

    @classmethod
    def from_bundle(cls, root: Path, manifest: dict) -> Emulator:
        """Load what the accelerator loads: the manifest's design, ``params.bin``, expert blobs (checked)."""
        d = Design.from_json(manifest["hls"]["design"])
        image = read_params(Path(root), manifest)
        params = {name: unpack(image, t, d.types[t.cls]) for name, t in d.params.items()}
        records = {(li, e["index"]): e for li, layer in enumerate(manifest["moe_layers"]) for e in layer["experts"]}
        cache: dict = {}

        def expert(layer: int, e: int) -> dict:
            if (layer, e) not in cache:
                record = records[(layer, e)]
                tensors = decode_expert(read_verified(Path(root), record), record["tensors"])
                cache[(layer, e)] = {k: v.astype(np.int64) for k, v in tensors.items()}
            return cache[(layer, e)]

        return cls(d, params, expert)

    def raw(self, x: np.ndarray, task: str, batch: int = 4) -> np.ndarray:
        """The accelerator's raw outputs (activation type) for a batch."""
        fm = emulate.FixedMath(self.design)
        return np.concatenate(
            [
                emulate.forward(self.design, fm, x[i : i + batch], task, self.params.__getitem__, self._expert)
                for i in range(0, len(x), batch)
            ]
        )

    def run(self, x: np.ndarray, task: str) -> np.ndarray:
        """The accelerator's outputs as float32 (what the runtime returns)."""
        return (self.raw(x, task) / 2.0 ** self.design.types["act"].frac).astype(np.float32)


def accuracy(emulator: Emulator, adapter, samples: int, seed: int = 99) -> dict:
    """Each task's metric for the accelerator (emulator) and for fp32 PyTorch on held-out data, and its errors."""
    d = emulator.design
    x, targets = adapter.evaluation_data(samples, seed)
    tasks = {}
    for t, task in enumerate(d.tasks):
        keep = dict(enumerate(d.kept[t]))
        ref = np.concatenate([adapter.reference(x[i : i + 4], task, keep) for i in range(0, len(x), 4)])
        pred = emulator.run(x, task)
        target = None if targets is None else targets.get(task)
        name, value, higher = adapter.task_metric(task, pred, target, ref)
        _, value_fp32, _ = adapter.task_metric(task, ref, target, ref)
        diff = pred.astype(np.float64) - ref
        tasks[task] = {
            "metric_name": name,
            "metric": value,
            "metric_fp32": value_fp32,
            "higher_is_better": higher,
            "mse_vs_fp32": float((diff**2).mean()),
            "max_abs_error_vs_fp32": float(np.abs(diff).max()),
        }
    return {"samples": len(x), "seed": seed, "tasks": tasks, "by": "emulator (bit-exact with C simulation)"}
