"""Backends, found by folder name. Installed as ``edgemoe.targets``.

Each backend is one folder ``targets/<name>/`` holding its compiler-side :class:`~.base.Target`
and its runtime executors. The folder's ``__init__.py`` only declares them, as
``"module:attribute"`` strings relative to the folder, so that reading the declarations imports
neither the compiler nor any runtime library::

    TARGET = "target:TARGET"                       # what ``--target <name>`` builds with
    EXECUTORS = {"tvm": "executor:TvmExecutor"}    # executors a bundle's manifest may name

Adding a backend is adding a folder: nothing here, in the CLI or in the packaging lists names one.
The runtime imports this module and the executors' modules only (never a ``target`` module).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from types import ModuleType
from typing import TYPE_CHECKING

from ..errors import BundleError, TargetError

if TYPE_CHECKING:
    from .base import Target


@functools.cache
def _backends() -> dict[str, ModuleType]:
    """Every backend package under this folder, by folder name (declarations only)."""
    out = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.ispkg:
            module = importlib.import_module(f"{__name__}.{info.name}")
            if hasattr(module, "TARGET") or hasattr(module, "EXECUTORS"):
                out[info.name] = module
    return out


def _resolve(package: ModuleType, spec: str):
    module, attr = spec.split(":")
    return getattr(importlib.import_module(f"{package.__name__}.{module}"), attr)


def target_names() -> tuple[str, ...]:
    """Names of the backends that build bundles (``--target``)."""
    return tuple(name for name, pkg in _backends().items() if hasattr(pkg, "TARGET"))


def get_target(name: str) -> Target:
    """The target of backend ``name``.

    Raises:
        TargetError: No backend folder of that name.
    """
    backends = _backends()
    if name not in target_names():
        raise TargetError(f"unknown target '{name}' (known: {', '.join(target_names())})")
    return _resolve(backends[name], backends[name].TARGET)


def executor_names() -> dict[str, str]:
    """Every executor a bundle may name, with the backend folder that provides it."""
    return {ex: backend for backend, pkg in _backends().items() for ex in getattr(pkg, "EXECUTORS", {})}


def executor_class(name: str) -> type:
    """The runtime executor class called ``name``, from the backend folder that declares it.

    Raises:
        BundleError: No backend declares such an executor.
    """
    owners = executor_names()
    if name not in owners:
        raise BundleError(f"bundle needs executor '{name}', which this edgemoe does not have")
    package = _backends()[owners[name]]
    return _resolve(package, package.EXECUTORS[name])
