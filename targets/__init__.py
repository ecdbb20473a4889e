"""Backends. Each folder exposes one :class:`Target`; the registry finds it by name.

Installed as ``edgemoe.targets``. To add a backend: a folder with a ``TARGET`` object and one
line in ``_TARGETS``. The pipeline never names a backend itself.
"""

from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import TargetError

if TYPE_CHECKING:
    from ..config import CompileConfig
    from ..devices import DeviceProfile
    from ..frontends import GraphPartition


# An emitted graph must reproduce its torch module on the example inputs within these bounds.
CHECK_ATOL = 1e-5
CHECK_RTOL = 1e-5


def check_against_torch(target: str, part: GraphPartition, got) -> None:
    """Compare a compiled graph's outputs on ``part.example_inputs`` with the torch module's.

    A gate's expert indices may differ only where router scores tie exactly (either expert is a
    valid top-k choice); its scores output is compared within tolerance, which catches the rest.

    Raises:
        TargetError: An output's count, shape or values differ.
    """
    import numpy as np
    import torch

    with torch.no_grad():
        want = part.module(*part.example_inputs)
    want = want if isinstance(want, tuple) else (want,)
    if len(got) != len(want):
        raise TargetError(f"target {target}: {part.name} returns {len(got)} outputs, torch gives {len(want)}")
    tie_tolerant = part.kind == "gate"
    for name, g, w in zip(part.output_names, got, want, strict=True):
        w = w.numpy()
        if g.shape != w.shape:
            raise TargetError(f"target {target}: {part.name}.{name} has shape {g.shape}, torch gives {w.shape}")
        if np.issubdtype(w.dtype, np.integer):
            ok = tie_tolerant or np.array_equal(g, w)
        else:
            ok = np.allclose(g, w, rtol=CHECK_RTOL, atol=CHECK_ATOL)
        if not ok:
            err = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64))))
            raise TargetError(f"target {target}: {part.name}.{name} differs from torch by {err:.3g}")


class Target(abc.ABC):
    """A backend that turns graph partitions into files a runtime executor can load.

    Attributes:
        name: Registry name (``--target``).
        executor: Name of the runtime executor that runs this target's artifacts.
        suffix: File suffix of emitted graphs.
    """

    name: str = ""
    executor: str = ""
    suffix: str = ""

    @abc.abstractmethod
    def check_device(self, device: DeviceProfile) -> None:
        """Raise :class:`~edgemoe.errors.TargetError` if this target cannot build for ``device``."""

    @abc.abstractmethod
    def emit(self, part: GraphPartition, out_dir: Path, cfg: CompileConfig) -> Path:
        """Write ``part`` as one file under ``out_dir``, check it, and return its path."""

    @abc.abstractmethod
    def describe(self, cfg: CompileConfig) -> dict:
        """The manifest's ``target`` section (name, executor, versions, options)."""

    # -- quantization (optional: a target that lacks a scheme says so at compile time) ----------
    def quantize_graph(self, path: Path, scheme: str, feeds: list, quant) -> None:
        """Quantize a dense partition file in place (``quant`` is the QuantConfig)."""
        raise TargetError(f"target {self.name} does not support quantization scheme '{scheme}'")

    def quantize_kernel(
        self, src: Path, dst: Path, weights: tuple[str, ...], scheme: str, bits: int, group: int
    ) -> Path:
        """Write a quantized variant of an expert kernel taking quantized weight tensors."""
        raise TargetError(f"target {self.name} does not support quantized expert kernels ('{scheme}')")

    def probe_kernel(self, src: Path, weights: tuple[str, ...]) -> tuple[bytes, list[str]]:
        """The fp32 kernel exposing the activation entering each weight (for calibration)."""
        raise TargetError(f"target {self.name} cannot calibrate expert activations")

    def graph_io(self, path: Path) -> tuple[list[str], list[str]]:
        """Input and output names of a graph file this target wrote (a quantized kernel variant)."""
        raise TargetError(f"target {self.name} cannot list the inputs of {path.name}")


_TARGETS: dict[str, str] = {
    "onnx": "edgemoe.targets.onnx:TARGET",
    "tvm": "edgemoe.targets.tvm:TARGET",
}


def target_names() -> tuple[str, ...]:
    """Registered target names."""
    return tuple(_TARGETS)


def get_target(name: str) -> Target:
    """Look up a target by name."""
    if name not in _TARGETS:
        raise TargetError(f"unknown target '{name}' (known: {', '.join(_TARGETS)})")
    module, attr = _TARGETS[name].split(":")
    return getattr(importlib.import_module(module), attr)
