"""TVM executor: runs the TVM target's libraries in a Relax VirtualMachine.

Each graph is one shared library (``export_library``) holding a Relax VM executable and its
compiled kernels; the device it runs on follows from the code inside (CPU, or CUDA when the
library carries CUDA device code). Expert kernels take their weights as inputs, so one loaded
library serves every expert of its shape.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from ...bundle.format import read_verified
from ...errors import BundleError
from ...runtime.executor import Executor, Graph


def import_tvm():
    """Import ``tvm`` and its Relax VM without dragging torch into a runtime process.

    ``tvm_ffi`` imports torch whenever it is installed (for tensor interop this runtime never
    uses); on a board that carries torch for other work that costs seconds and hundreds of MB.
    Unless torch is already loaded, the import runs with torch masked, and the mask is lifted
    afterwards so a later ``import torch`` works as usual.

    Returns:
        The ``tvm`` module (with ``tvm.runtime.vm`` loaded: the Relax VM, which a runtime-only TVM
        without the compiler library also has; ``tvm.relax`` needs the compiler).
    """
    if "torch" in sys.modules or "tvm" in sys.modules:
        import tvm
        import tvm.runtime.vm

        return tvm
    sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` raise ImportError
    try:
        import tvm
        import tvm.runtime.vm
    finally:
        if sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm


@functools.cache
def _load_cuda_runtime() -> None:
    """Load TVM's CUDA runtime where ``import tvm`` did not.

    A runtime-only TVM (no compiler library, or ``TVM_USE_RUNTIME_LIB=1``) skips its device
    backends, and without ``libtvm_runtime_cuda`` no library holding CUDA kernels loads. Machines
    without CUDA (no libcuda / libcudart) skip it.
    """
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    with contextlib.suppress(OSError, RuntimeError):
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )


# ELF e_machine of the CPUs TVM builds for, by platform.machine() name.
_ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
_MACHINE_NAMES = {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def check_machine(data: bytes, name: str) -> None:
    """Refuse a library built for another CPU (dlopen's own error names no architecture).

    Raises:
        BundleError: ``data`` is an ELF library for a CPU other than this machine's.
    """
    if data[:4] != b"\x7fELF" or len(data) < 20:
        return
    built = _ELF_MACHINES.get(
        int.from_bytes(data[18:20], "little"), f"ELF machine {int.from_bytes(data[18:20], 'little')}"
    )
    here = _MACHINE_NAMES.get(platform.machine(), platform.machine())
    if built != here:
        raise BundleError(
            f"{name} is {built} code and this machine is {here}: run the bundle on the device it was built for"
        )


def _module_kinds(mod) -> set[str]:
    """Kinds of a module and everything it imports (``llvm``, ``library``, ``cuda``, ...)."""
    kinds, todo = set(), [mod]
    while todo:
        m = todo.pop()
        kinds.add(str(m.kind))
        todo.extend(m.imports)
    return kinds


class TvmGraph(Graph):
    """One Relax VirtualMachine over a loaded library; numpy in, numpy out."""

    def __init__(self, vm, device, name: str, input_names, output_names):
        self._tvm = import_tvm()
        self._vm = vm
        self._main = vm["main"]
        self._device = device
        # A VirtualMachine keeps its call frames in the object: one call at a time per graph
        # (a session may be run from several threads, as onnxruntime sessions can).
        self._lock = threading.Lock()
        self.name = name
        self.input_names = tuple(input_names)
        self.output_names = tuple(output_names)

    @classmethod
    def from_path(cls, path: Path, name: str, input_names, output_names) -> TvmGraph:
        """Load a library file (the caller has checked it) into a VM on the device its code is for.

        Raises:
            BundleError: TVM cannot load the library, or it needs a device this machine lacks.
        """
        tvm = import_tvm()
        _load_cuda_runtime()
        try:
            lib = tvm.runtime.load_module(str(path))
        except Exception as exc:  # TVM raises its own error types
            raise BundleError(f"tvm cannot load {name}: {_last_line(exc)}") from None
        kinds = _module_kinds(lib)
        device = tvm.cuda(0) if "cuda" in kinds else tvm.cpu(0)
        if not device.exist:
            raise BundleError(f"{name} holds {', '.join(sorted(kinds))} code, but this machine has no such device")
        return cls(tvm.runtime.vm.VirtualMachine(lib, device), device, name, input_names, output_names)

    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        tensor, placed = self._tvm.runtime.tensor, self._tvm.runtime.Tensor
        # Tensors the executor placed on the device already (expert weights) pass as they are.
        args = [x if isinstance(x, placed) else tensor(np.ascontiguousarray(x), self._device) for x in inputs]
        try:
            with self._lock:
                out = self._main(*args)
        except Exception as exc:  # shape / dtype checks of the VM raise TVM error types
            raise BundleError(f"tvm graph {self.name} rejects its inputs: {_last_line(exc)}") from None
        outs = (out,) if hasattr(out, "numpy") else tuple(out)
        return tuple(o.numpy() for o in outs)


def _last_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return lines[-1] if lines else type(exc).__name__


class TvmExecutor(Executor):
    """Loads verified TVM libraries into Relax VirtualMachines.

    Args:
        threads: Worker threads of TVM's CPU thread pool (0: TVM's default, one per physical
            core). The pool is per process, so this applies to every TVM graph in it.
        providers: Accepted for interface compatibility (the library itself says which device
            it runs on); must be empty.
    """

    name = "tvm"

    def __init__(self, threads: int = 0, providers: tuple[str, ...] = ()):
        self._tvm = import_tvm()
        if providers:
            got = ", ".join(providers)
            raise BundleError(f"executor tvm takes no providers (got {got}): each library names its device")
        if threads:
            # Affinity mode 1 ("big" cores) with `threads` workers: TVM's runtime.config_threadpool.
            self._tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
        self.threads = threads
        self._devices: dict[str, object] = {}  # the devices of the graphs loaded, by name ("cpu:0", "cuda:0")

    @classmethod
    def remote(cls, address: str, timeout: float) -> Executor:
        """The graphs on a board over TVM RPC (see :mod:`.remote` for the address forms)."""
        from .remote import RemoteExecutor

        return RemoteExecutor(address, timeout=timeout)

    @classmethod
    def graph_timer(cls, timeout: float) -> Executor:
        """Graphs timed as on a board: TVM's in-process RPC session and ``time_evaluator``."""
        from .remote import RemoteExecutor

        return RemoteExecutor("local", timeout=timeout)

    @classmethod
    def device_kind(cls, manifest: dict) -> str:
        """``cuda`` or ``cpu``: what the bundle's libraries hold code for."""
        return "cuda" if (manifest["target"].get("tvm_target") or {}).get("kind") == "cuda" else "cpu"

    def place(self, weights: dict[str, np.ndarray]) -> dict[str, object]:
        """Copy an expert to the GPU once per load when the graphs run there (host graphs read numpy)."""
        if len(self._devices) != 1:
            return weights  # no graph loaded yet, or graphs on two devices: copied with each call
        device = next(iter(self._devices.values()))
        if device.dlpack_device_type() == 1:  # kDLCPU
            return weights
        tensor = self._tvm.runtime.tensor
        return {name: tensor(np.ascontiguousarray(w), device) for name, w in weights.items()}

    def load(self, root: Path, record: dict) -> Graph:
        inputs, outputs = record.get("inputs"), record.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise BundleError(f"garbled manifest entry for {record.get('file')}: no input / output names")
        data = read_verified(root, record)
        check_machine(data, record["file"])
        # The checked bytes are what gets mapped: dlopen the private copy, not the bundle file, which
        # could change after the check, and whose path the loader would resolve to a library it
        # already holds if a rebuilt bundle reuses it.
        with tempfile.TemporaryDirectory(prefix="edgemoe-tvm-") as tmp:
            path = Path(tmp) / Path(record["file"]).name
            path.write_bytes(data)
            graph = TvmGraph.from_path(path, record["file"], inputs, outputs)
        self._devices[str(graph._device)] = graph._device
        return graph
