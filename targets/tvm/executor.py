"""TVM executor: runs the TVM target's libraries in a Relax VirtualMachine.

Each graph is one shared library (``export_library``) holding a Relax VM executable and its
compiled kernels; the device it runs on follows from the code inside (CPU, or CUDA when the
library carries CUDA device code). Expert kernels take their weights as inputs, so one loaded
library serves every expert of its shape.

On a GPU a run keeps its activations there (:class:`ResidentProgram`): the bundle's dispatch graphs
pick each expert's tokens and add its output on the device, and only the gates' outputs (the routing
the host decides) and the task's output come back to numpy.
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
from ...runtime.program import GraphProgram, _GraphRun

# The dispatch graphs a TVM bundle carries (built by .dispatch): token gather, scatter-add, weighted add.
GATHER, COMBINE, ADD = "dispatch_gather", "dispatch_combine", "dispatch_add"


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
        return tuple(o.numpy() for o in self.run_device(*inputs))

    def run_device(self, *inputs) -> tuple:
        """Run on numpy arrays or TVM tensors; the outputs stay TVM tensors on the graph's device."""
        tensor, placed = self._tvm.runtime.tensor, self._tvm.runtime.Tensor
        # Tensors already on the device (placed expert weights, earlier outputs) pass as they are.
        args = [x if isinstance(x, placed) else tensor(np.ascontiguousarray(x), self._device) for x in inputs]
        try:
            with self._lock:
                out = self._main(*args)
        except Exception as exc:  # shape / dtype checks of the VM raise TVM error types
            raise BundleError(f"tvm graph {self.name} rejects its inputs: {_last_line(exc)}") from None
        return (out,) if hasattr(out, "numpy") else tuple(out)


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
        resident: Keep a run's activations in TVM tensors between graphs (:class:`ResidentProgram`).
            None: on a CUDA bundle that carries the dispatch graphs; on the CPU the graphs read numpy
            in place and the host path is as fast.
    """

    name = "tvm"

    def __init__(self, threads: int = 0, providers: tuple[str, ...] = (), resident: bool | None = None):
        self._tvm = import_tvm()
        if providers:
            got = ", ".join(providers)
            raise BundleError(f"executor tvm takes no providers (got {got}): each library names its device")
        if threads:
            # Affinity mode 1 ("big" cores) with `threads` workers: TVM's runtime.config_threadpool.
            self._tvm.get_global_func("runtime.config_threadpool")(1, int(threads))
        self.threads = threads
        self.resident = resident
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

    def program(self, root: Path, manifest: dict, task: str, recorder=None):
        """The task's graphs; device-resident on a CUDA bundle (see ``resident``)."""
        has_dispatch = all(name in manifest["graphs"] for name in (GATHER, COMBINE, ADD))
        resident = self.device_kind(manifest) == "cuda" if self.resident is None else self.resident
        if resident and has_dispatch and recorder is None:  # calibration records host arrays
            return ResidentProgram(self, root, manifest, task)
        if self.resident and not has_dispatch:
            raise BundleError("this TVM bundle has no dispatch graphs (compiled before they existed): recompile it")
        return super().program(root, manifest, task, recorder)

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


class _ResidentRun(_GraphRun):
    __slots__ = ("scores",)


class ResidentProgram(GraphProgram):
    """A task whose activations stay in TVM tensors on the graphs' device from the input to the head.

    The host gets what it decides on (each gate's experts and scores, the shared experts' weights)
    and the task's output; token gather and the weighted scatter-add of expert outputs run as the
    bundle's dispatch graphs. The arithmetic is the host path's: outputs are equal bit for bit.

    Attributes:
        host_copies: Tensors copied back to numpy so far (gate outputs, outputs).
    """

    def __init__(self, executor, root: Path, manifest: dict, task: str, reuse: dict | None = None, shared=None):
        super().__init__(executor, root, manifest, task, None, reuse, shared)
        reuse = reuse or {}
        self._gather, self._combine, self._add = (self._graph(name, reuse) for name in (GATHER, COMBINE, ADD))
        self._device = self.segments[0]._device
        self._tvm = import_tvm()
        self.host_copies = 0

    def switch(self, task: str) -> ResidentProgram:
        return ResidentProgram(
            self.executor, self.root, self.manifest, task, reuse=self._loaded, shared=(self.shared, self.shared_bytes)
        )

    def _host(self, tensor) -> np.ndarray:
        """The one way back to numpy (counted)."""
        self.host_copies += 1
        return tensor.numpy()

    def _upload(self, array: np.ndarray):
        return self._tvm.runtime.tensor(np.ascontiguousarray(array), self._device)

    def decoder(self, batch: int = 1):
        raise BundleError(
            "generation runs on the host path: open the session with resident=False (edgemoe generate does)"
        )

    def start(self, x: np.ndarray) -> _ResidentRun:
        run = _ResidentRun(self.segments[0].run_device(x))
        self._enter(run)
        return run

    def _enter(self, run: _ResidentRun) -> None:
        if self.layers:
            run.hidden, run.moe_in, *run.carried = run.outs
            shape = tuple(int(d) for d in run.moe_in.shape)
            rows = int(np.prod(shape[:-1]))
            run.flat = run.moe_in._create_view((rows, shape[-1]))
            run.out = self._upload(np.zeros((rows, shape[-1]), dtype=str(run.moe_in.dtype)))

    def route(self, run: _ResidentRun, layer: int) -> tuple[np.ndarray, np.ndarray]:
        run.gate_out = self.gates[layer].run_device(run.moe_in)
        idx, scores = self._host(run.gate_out[0]), self._host(run.gate_out[1])
        k = idx.shape[-1]
        run.scores = scores.reshape(-1, k)
        return idx.reshape(-1, k), run.scores

    def pregate(self, run: _ResidentRun, layer: int) -> np.ndarray:
        idx = self._host(self.gates[layer].run_device(run.moe_in)[0])
        return idx.reshape(-1, idx.shape[-1])

    def expert(
        self, run: _ResidentRun, layer: int, expert: int, tokens: np.ndarray, slots: np.ndarray, weights: dict
    ) -> None:
        kernel = self._kernel(layer, expert)
        rows = self._upload(tokens.astype(np.int64))
        (xs,) = self._gather.run_device(run.flat, rows)
        (y,) = kernel.run_device(xs, *(weights[name] for name in kernel.input_names[1:]))
        # Combined in ascending expert order when the layer finishes (as the host path sums).
        run.parts[expert] = (rows, y, run.scores[tokens, slots].astype(np.float32))

    def finish_layer(self, run: _ResidentRun, layer: int) -> None:
        for e in sorted(run.parts):
            (run.out,) = self._combine.run_device(run.out, *run.parts[e])
        run.parts.clear()
        if self.shared[layer]:
            # The gate's third output weighs each shared expert per token (ones where ungated).
            shared_scores = self._host(run.gate_out[2]).reshape(run.scores.shape[0], -1)
            for j, (kernel, w) in enumerate(self.shared[layer]):
                (y,) = kernel.run_device(run.flat, *(w[name] for name in kernel.input_names[1:]))
                (run.out,) = self._add.run_device(run.out, y, np.ascontiguousarray(shared_scores[:, j]))
        moe_out = run.out._create_view(tuple(int(d) for d in run.moe_in.shape))
        run.outs = self.segments[layer + 1].run_device(run.hidden, moe_out, *run.carried)
        if layer + 1 < len(self.layers):
            self._enter(run)

    def output(self, run: _ResidentRun) -> np.ndarray:
        (y,) = self.head.run_device(*run.outs)
        return self._host(y)
