"""Executor registry (imported lazily: a device installs only the backends it uses)."""

from __future__ import annotations

import importlib

from ...errors import BundleError
from .base import Executor, Graph

_EXECUTORS: dict[str, str] = {
    "onnxruntime": "edgemoe.runtime.executors.onnxruntime:OrtExecutor",
    "tvm": "edgemoe.runtime.executors.tvm:TvmExecutor",
}


def get_executor(name: str, **options) -> Executor:
    """Instantiate the executor a bundle asks for.

    Raises:
        BundleError: Unknown executor, or its runtime library is not installed.
    """
    if name not in _EXECUTORS:
        raise BundleError(f"bundle needs executor '{name}', which this edgemoe does not have")
    module, cls = _EXECUTORS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)(**options)
    except ImportError as exc:
        raise BundleError(f"executor '{name}' needs a package that is not installed: {exc.name}") from None


__all__ = ["Executor", "Graph", "get_executor"]
