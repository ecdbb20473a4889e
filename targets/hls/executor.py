"""The ``fpga`` executor: runs an HLS bundle's accelerator, keeping expert weights in a DDR pool.

One buffer interface, two drivers: on a Zynq board, PYNQ (:mod:`.pynq_driver`: the bitstream as an
overlay, ``pynq.allocate`` DDR buffers); anywhere else, the C simulation of the bundle's own HLS
sources (:mod:`.csim`), behind the same calls. ``EDGEMOE_FPGA=pynq`` selects the board.

The dense weights are loaded once (``params.bin``). Experts are data: the session's expert cache
decides which are resident; each one it loads is copied into a slot of the DDR expert pool
(:meth:`FpgaExecutor.place`), and freed when it is evicted, so the pool holds only the task's
experts and never more than the memory budget. A run follows the accelerator's stepped protocol
(``OP_START``, then per MoE layer ``OP_EXPERT`` per routed expert and ``OP_NEXT``): between a
layer's gate and its experts the cache makes the routed experts resident, which is what lets a
budget smaller than the task's experts work. Switching task selects the other task's gates with
the task register and swaps the pool as the stored task-switch plan says (the cache does).
Imports numpy and the bundle format only (no compiler code).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ...bundle.format import verified_path
from ...errors import BundleError
from ...runtime.executor import Executor, Graph
from ...runtime.program import TaskProgram
from .design import OP_EXPERT, OP_NEXT, OP_PREGATE, OP_START, Design, read_params
from .fixed import quantize

ENV_DRIVER = "EDGEMOE_FPGA"


class CsimDriver:
    """The accelerator in C simulation: numpy buffers, the library built from the bundle's sources."""

    name = "csim"

    def __init__(self, root: Path, manifest: dict, design: Design):
        from .csim import CsimAccelerator, build_library

        records = manifest["graphs"]
        for rel, record in records.items():
            if record.get("kind") == "accelerator" and rel.startswith("hls/src/"):
                verified_path(root, record)  # the sources compiled are the ones the manifest lists
        self.accelerator = CsimAccelerator(build_library(root / "hls" / "src"), design)

    def alloc(self, words: int, dtype) -> np.ndarray:
        """A zeroed buffer the accelerator can read and write."""
        return np.zeros(words, dtype=dtype)

    def to_device(self, buf: np.ndarray) -> None:
        """Make the host's writes visible to the accelerator (no caches in C simulation)."""

    def from_device(self, buf: np.ndarray) -> None:
        """Make the accelerator's writes visible to the host."""

    def call(self, *args) -> int:
        """One call of ``edgemoe_top`` (see ``edgemoe_top.cpp``)."""
        return self.accelerator.call(*args)


class FpgaExecutor(Executor):
    """Runs HLS bundles: one accelerator, one DDR expert pool.

    Args:
        threads: Ignored (the accelerator's parallelism is in the design).
        providers: Must be empty.
        driver: ``csim`` or ``pynq`` (default: ``$EDGEMOE_FPGA``, else ``csim``), or a driver object
            with the same methods (``alloc``, ``to_device``, ``from_device``, ``call``).
    """

    name = "fpga"

    def __init__(self, threads: int = 0, providers: tuple[str, ...] = (), driver=None):
        if providers:
            raise BundleError(f"executor fpga takes no providers (got {', '.join(providers)})")
        self._driver_spec = driver if driver is not None else os.environ.get(ENV_DRIVER, "csim")
        self.driver = None
        self.design: Design | None = None
        self.params = None
        self.root: Path | None = None
        self._lock = threading.Lock()
        self._pool = None
        self._free: list[int] = []
        self._slots = 0

    def load(self, root: Path, record: dict) -> Graph:
        raise BundleError("an HLS bundle runs as one accelerator: open it with Session (edgemoe run), not per graph")

    def program(self, root: Path, manifest: dict, task: str, recorder=None) -> TaskProgram:
        if recorder is not None:
            raise BundleError("an HLS bundle has no graphs to record (quantization calibration does not apply)")
        if "hls" not in manifest:
            raise BundleError("not an HLS bundle (no hls section in the manifest): recompile with --target hls")
        self._open(Path(root), manifest)
        return FpgaProgram(self, manifest, task)

    def _open(self, root: Path, manifest: dict) -> None:
        if self.root is not None:
            if self.root != root.resolve():
                raise BundleError("an fpga executor serves one bundle at a time")
            return
        self.design = Design.from_json(manifest["hls"]["design"])
        spec = self._driver_spec
        if spec == "csim":
            self.driver = CsimDriver(root, manifest, self.design)
        elif spec == "pynq":
            from .pynq_driver import PynqDriver

            self.driver = PynqDriver(root)
        elif isinstance(spec, str):
            raise BundleError(f"unknown fpga driver '{spec}' (known: csim, pynq)")
        else:
            self.driver = spec
        words = read_params(root, manifest)
        self.params = self.driver.alloc(len(words), np.int16)
        self.params[:] = words.view(np.int16)
        self.driver.to_device(self.params)
        self.graph_bytes = int(manifest["graphs"]["params"]["bytes"])
        self.root = root.resolve()

    # -- the expert pool -----------------------------------------------------------------------
    def reserve(self, capacity: int) -> None:
        """Size the DDR expert pool to hold ``capacity`` bytes of experts (it only grows)."""
        slot_bytes = 2 * self.design.expert_words
        slots = max(1, capacity // slot_bytes)
        with self._lock:
            if slots <= self._slots:
                return
            pool = self.driver.alloc(slots * self.design.expert_words, np.int16)
            if self._pool is not None:
                pool[: self._pool.size] = self._pool
                self.driver.to_device(pool)
            self._free += list(range(self._slots, slots))
            self._pool, self._slots = pool, slots

    @property
    def pool(self):
        """The DDR expert pool (slots of ``expert_words`` 16-bit words)."""
        return self._pool

    def place(self, weights: dict[str, np.ndarray]) -> dict[str, object]:
        """Copy a loaded expert into a free pool slot; the cache keeps ``{"slot": n}`` until eviction."""
        d = self.design
        with self._lock:
            if not self._free:
                raise BundleError("the DDR expert pool is full: the memory budget holds fewer experts than loaded")
            slot = self._free.pop(0)
        base = slot * d.expert_words
        for name, t in d.expert.items():
            self._pool[base + t.offset : base + t.offset + t.count] = np.asarray(weights[name]).ravel()
        self.driver.to_device(self._pool)
        return {"slot": slot}

    def unplace(self, placed: dict[str, object]) -> None:
        with self._lock:
            self._free.append(int(placed["slot"]))

    @classmethod
    def device_kind(cls, manifest: dict) -> str:
        return "fpga"


class _Run:
    """One batch's buffers on the accelerator: per image, its input, output and state."""

    def __init__(self, images: int):
        self.inputs: list = [None] * images
        self.outputs: list = [None] * images
        self.states: list = [None] * images


class FpgaProgram(TaskProgram):
    """A task of an HLS bundle on the accelerator (stepped protocol, one image per call)."""

    def __init__(self, executor: FpgaExecutor, manifest: dict, task: str):
        self.executor, self.manifest, self.task = executor, manifest, task
        self.design = d = executor.design
        if task not in d.tasks:
            raise BundleError(f"garbled manifest: task '{task}' is not in the accelerator's tasks {d.tasks}")
        self.task_id = d.tasks.index(task)
        self.graph_bytes = executor.graph_bytes
        self._layout = d.state_layout()
        self._tk = d.tokens * d.top_k
        self._out_shape = d.output_shape(task)
        self._noslots = executor.driver.alloc(1, np.int32)
        self.last_raw: np.ndarray | None = None  # the last run's raw outputs (verify compares them bit for bit)

    def reserve(self, capacity: int) -> None:
        self.executor.reserve(capacity)

    def _call(self, op: int, layer: int, expert: int, slot: int, run: _Run, i: int) -> int:
        ex = self.executor
        status = ex.driver.call(
            op, self.task_id, layer, expert, slot, ex.params, ex.pool, self._noslots,
            run.inputs[i], run.outputs[i], run.states[i],
        )  # fmt: skip
        if status < 0:
            raise BundleError(
                f"the accelerator refused operation {op} (layer {layer}, expert {expert}): status {status}"
            )
        ex.driver.from_device(run.states[i])
        return status

    def start(self, x: np.ndarray) -> _Run:
        d, drv = self.design, self.executor.driver
        run = _Run(len(x))
        raw = quantize(x, d.types["input"]).astype(np.int32).reshape(len(x), -1)
        for i in range(len(x)):
            run.inputs[i] = drv.alloc(raw.shape[1], np.int32)
            run.inputs[i][:] = raw[i]
            drv.to_device(run.inputs[i])
            run.outputs[i] = drv.alloc(int(np.prod(self._out_shape)), np.int32)
            run.states[i] = drv.alloc(self._layout["WORDS"], np.int32)
            self._call(OP_START, 0, 0, 0, run, i)
        return run

    def _routes(self, run: _Run, ids: str, probs: str, layer: int = 0) -> tuple[np.ndarray, np.ndarray]:
        lo = self._layout[ids] + layer * self._tk
        plo = self._layout[probs] + layer * self._tk
        k = self.design.top_k
        idx = np.concatenate([np.asarray(s[lo : lo + self._tk]).reshape(-1, k) for s in run.states])
        p = np.concatenate([np.asarray(s[plo : plo + self._tk]).reshape(-1, k) for s in run.states])
        return idx.astype(np.int64), (p / 2.0**self.design.prob_frac).astype(np.float32)

    def route(self, run: _Run, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self._routes(run, "RE", "RP", layer)

    def pregate(self, run: _Run, layer: int) -> np.ndarray:
        for i in range(len(run.states)):
            self._call(OP_PREGATE, layer, 0, 0, run, i)
        return self._routes(run, "PE", "PP")[0]

    def expert(self, run: _Run, layer: int, expert: int, tokens: np.ndarray, slots: np.ndarray, weights: dict) -> None:
        # The accelerator rebuilds the expert's token queue from the routes it wrote; the images
        # that route a token to it are called.
        for i in np.unique(np.asarray(tokens) // self.design.tokens):
            self._call(OP_EXPERT, layer, expert, int(weights["slot"]), run, int(i))

    def finish_layer(self, run: _Run, layer: int) -> None:
        for i in range(len(run.states)):
            self._call(OP_NEXT, layer, 0, 0, run, i)

    def output(self, run: _Run) -> np.ndarray:
        outs = []
        for buf in run.outputs:
            self.executor.driver.from_device(buf)
            outs.append(np.asarray(buf, dtype=np.int64).reshape(self._out_shape))
        self.last_raw = np.stack(outs)
        return self.to_float(self.last_raw)

    def to_float(self, raw: np.ndarray) -> np.ndarray:
        """Raw outputs (activation type) as float32."""
        return (raw / 2.0 ** self.design.types["act"].frac).astype(np.float32)

    def switch(self, task: str) -> FpgaProgram:
        return FpgaProgram(self.executor, self.manifest, task)
