"""Host runtime session: runs one task of a bundle, loading only the experts it activates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle.format import decode_expert, read_manifest, read_verified
from ..errors import BundleError, InputError, TaskError
from .executors import Graph, get_executor


@dataclass(frozen=True)
class SessionStats:
    """What a session has loaded so far.

    Attributes:
        experts_loaded: Distinct experts loaded since the session started.
        experts_task: Experts the task may use (its kept sets, all layers).
        experts_bundle: Experts shipped in the bundle.
        experts_total: Experts of the source model.
        expert_bytes_loaded: Bytes of expert weights read from the bundle.
        expert_bytes_task: Bytes of the task's kept experts.
        expert_bytes_total: Bytes of every expert of the source model (fp32).
        resident_expert_bytes: Expert bytes held in memory now (routed and shared experts).
        shared_expert_bytes: Bytes of always-resident shared experts.
        graph_bytes: Bytes of the graphs the task loaded (trunk, gates, head, kernels).
        runs: Calls to :meth:`Session.run`.
    """

    experts_loaded: int
    experts_task: int
    experts_bundle: int
    experts_total: int
    expert_bytes_loaded: int
    expert_bytes_task: int
    expert_bytes_total: int
    resident_expert_bytes: int
    shared_expert_bytes: int
    graph_bytes: int
    runs: int


class _RecordingGraph(Graph):
    """Passes calls through to a graph and hands each call's inputs to a recorder (calibration)."""

    def __init__(self, graph: Graph, name: str, recorder: Callable[[str, tuple[np.ndarray, ...]], None]):
        self._graph, self._name, self._recorder = graph, name, recorder
        self.input_names, self.output_names = graph.input_names, graph.output_names

    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        self._recorder(self._name, inputs)
        return self._graph.run(*inputs)


class Session:
    """Run one task of a bundle.

    Loads the shared trunk, the task's gates and head and one expert kernel per expert
    shape up front; expert weights are read lazily, on the first token routed to them,
    after checking their size and sha256.

    Args:
        bundle: Bundle folder.
        task: Task to run (may be omitted when the bundle has a single task).
        threads: Intra-op threads for the executor (0: its default).
        providers: Executor-specific accelerator preference (e.g. onnxruntime providers).
        recorder: Called with (graph name, inputs) on every graph call; the compiler uses it to
            collect calibration data for quantization.

    Raises:
        BundleError: Not a bundle, or a garbled manifest.
        IntegrityError: A file is missing or fails its size / sha256 check.
        TaskError: The task is not in the bundle.
    """

    def __init__(
        self,
        bundle: str | Path,
        task: str | None = None,
        threads: int = 0,
        providers: tuple[str, ...] = (),
        recorder: Callable[[str, tuple[np.ndarray, ...]], None] | None = None,
    ):
        self.root = Path(bundle)
        self.manifest = m = read_manifest(self.root)
        tasks = m["tasks"]
        if task is None:
            if len(tasks) != 1:
                raise TaskError(f"bundle has tasks {', '.join(tasks)}: choose one")
            task = next(iter(tasks))
        if task not in tasks:
            raise TaskError(f"unknown task '{task}' (bundle has: {', '.join(tasks)})")
        self.task = task
        self._task = tasks[task]
        self.input_spec = m["input"]
        self.executor = get_executor(m["target"]["executor"], threads=threads, providers=providers)
        self._recorder = recorder
        self._graph_bytes = 0
        self._shared_bytes = 0
        self.segments = [self._load_graph(name) for name in m["segments"]]
        self.gates = [self._load_graph(name) for name in self._task["gates"]]
        self.head = self._load_graph(self._task["head"])
        kernels: dict[str, Graph] = {}
        for name in self._kernel_names(m, self._task["experts"]):
            kernels[name] = self._load_graph(name)
        self._kernels = kernels
        self.layers = m["moe_layers"]
        # Shared experts run on every token: load them now and keep them resident.
        self.shared = [
            [(kernels[e["kernel"]], self._shared_weights(e)) for e in layer.get("shared", [])] for layer in self.layers
        ]
        self._records = [{e["index"]: e for e in layer["experts"]} for layer in self.layers]
        self.kept = [frozenset(s) for s in self._task["experts"]]
        for li, kept in enumerate(self.kept):
            missing = kept - set(self._records[li])
            if missing:
                raise BundleError(
                    f"garbled manifest: task '{task}' keeps experts {sorted(missing)} of layer {li}, "
                    "which the bundle does not list"
                )
        self._experts: dict[tuple[int, int], dict[str, np.ndarray]] = {}
        self._expert_bytes = 0
        self._lock = threading.Lock()
        self._runs = 0
        self.last_routing: list[np.ndarray] = []

    # -- loading ---------------------------------------------------------------------------
    @staticmethod
    def _kernel_names(m: dict, kept: list[list[int]]) -> list[str]:
        """Kernels the task can need: its kept experts' (an expert may override its layer's) and shared ones."""
        names: list[str] = []
        for layer, keep in zip(m["moe_layers"], kept, strict=True):
            routed = [e.get("kernel", layer["kernel"]) for e in layer["experts"] if e["index"] in keep]
            for name in (*routed, *(e["kernel"] for e in layer.get("shared", []))):
                if name not in names:
                    names.append(name)
        return names

    def _shared_weights(self, record: dict) -> dict[str, np.ndarray]:
        weights = decode_expert(read_verified(self.root, record), record["tensors"])
        self._shared_bytes += int(record["bytes"])
        return weights

    def _load_graph(self, name: str) -> Graph:
        try:
            record = self.manifest["graphs"][name]
        except KeyError:
            raise BundleError(f"garbled manifest: graph '{name}' is not listed") from None
        graph = self.executor.load(self.root, record)
        self._graph_bytes += int(record["bytes"])
        return graph if self._recorder is None else _RecordingGraph(graph, name, self._recorder)

    def _expert(self, layer: int, expert: int) -> tuple[Graph, dict[str, np.ndarray]]:
        """The expert's kernel and its weights, loading and checking the blob on first use."""
        key = (layer, expert)
        record = self._records[layer].get(expert)
        weights = self._experts.get(key)
        if weights is not None:
            return self._kernels[record.get("kernel", self.layers[layer]["kernel"])], weights
        if expert not in self.kept[layer]:
            # The gate graph is masked to the kept set, so this means the bundle is inconsistent.
            raise BundleError(f"task '{self.task}' routed to expert {expert} of layer {layer}, outside its kept set")
        with self._lock:
            weights = self._experts.get(key)
            if weights is None:
                weights = decode_expert(read_verified(self.root, record), record["tensors"])
                self._experts[key] = weights
                self._expert_bytes += int(record["bytes"])
        return self._kernels[record.get("kernel", self.layers[layer]["kernel"])], weights

    # -- execution -------------------------------------------------------------------------
    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Validate an input batch against the bundle's input spec (adds a batch axis if missing)."""
        spec = self.input_spec
        x = np.asarray(x)
        if x.ndim == len(spec["shape"]) - 1:
            x = x[None]
        want = list(spec["shape"])
        if x.ndim != len(want) or any(w is not None and w != s for w, s in zip(want, x.shape, strict=True)):
            shown = ["*" if d is None else d for d in want]
            raise InputError(f"input has shape {list(x.shape)}, bundle expects {shown} (* = any size)")
        kind = np.dtype(spec["dtype"]).kind
        if kind == "f":
            if x.dtype.kind not in "fiu":
                raise InputError(f"input has dtype {x.dtype}, bundle expects {spec['dtype']}")
            x = x.astype(spec["dtype"], copy=False)
            if not np.isfinite(x).all():
                raise InputError("input contains NaN or Inf")
        elif kind in "iu":
            if x.dtype.kind not in "iu":
                raise InputError(f"input has dtype {x.dtype}, bundle expects integer ids ({spec['dtype']})")
            high = spec.get("high")
            if x.size and (x.min() < 0 or (high is not None and x.max() >= high)):
                raise InputError(f"input ids must lie in [0, {high}), got [{x.min()}, {x.max()}]")
            x = x.astype(spec["dtype"], copy=False)
        return np.ascontiguousarray(x)

    def _moe(self, layer: int, h: np.ndarray) -> np.ndarray:
        shape = h.shape
        flat = h.reshape(-1, shape[-1])
        gate_out = self.gates[layer].run(h)
        idx, scores = gate_out[0], gate_out[1]
        k = idx.shape[-1]
        idx, scores = idx.reshape(-1, k), scores.reshape(-1, k)
        self.last_routing.append(idx)
        out = np.zeros_like(flat)
        for e in np.unique(idx):
            tok, slot = np.nonzero(idx == e)
            kernel, w = self._expert(layer, int(e))
            # Kernel inputs: the tokens, then the expert's tensors by name (an expert is data).
            (y,) = kernel.run(flat[tok], *(w[name] for name in kernel.input_names[1:]))
            out[tok] += y * scores[tok, slot, None]
        if self.shared[layer]:
            # The gate's third output weighs each shared expert per token (ones where ungated).
            shared_scores = gate_out[2].reshape(flat.shape[0], -1)
            for j, (shared_kernel, w) in enumerate(self.shared[layer]):
                (y,) = shared_kernel.run(flat, *(w[name] for name in shared_kernel.input_names[1:]))
                out += y * shared_scores[:, j : j + 1]
        return out.reshape(shape)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the task on an input batch and return the head's output."""
        x = self.check_input(x)
        self.last_routing = []
        outs = self.segments[0].run(x)
        for layer in range(len(self.layers)):
            # Segments hand on (hidden, moe_input, *carried): carried tensors (e.g. masks) pass through.
            hidden, moe_in, *carried = outs
            outs = self.segments[layer + 1].run(hidden, self._moe(layer, moe_in), *carried)
        (y,) = self.head.run(*outs)
        self._runs += 1
        return y

    def timed_run(self, x: np.ndarray) -> tuple[np.ndarray, float]:
        """:meth:`run`, also returning the wall time in milliseconds."""
        start = time.perf_counter()
        y = self.run(x)
        return y, (time.perf_counter() - start) * 1e3

    @property
    def loaded_experts(self) -> dict[int, tuple[int, ...]]:
        """Experts loaded so far, per layer."""
        out: dict[int, list[int]] = {i: [] for i in range(len(self.layers))}
        for layer, expert in sorted(self._experts):
            out[layer].append(expert)
        return {k: tuple(v) for k, v in out.items()}

    @property
    def stats(self) -> SessionStats:
        """Counters of what was loaded (see :class:`SessionStats`)."""
        totals = self.manifest["totals"]
        task_bytes = sum(int(self._records[li][e]["bytes"]) for li, kept in enumerate(self.kept) for e in kept)
        return SessionStats(
            experts_loaded=len(self._experts),
            experts_task=sum(len(k) for k in self.kept),
            experts_bundle=int(totals["experts_bundle"]),
            experts_total=int(totals["experts_model"]),
            expert_bytes_loaded=self._expert_bytes,
            expert_bytes_task=task_bytes,
            expert_bytes_total=int(totals["expert_bytes_model"]),
            resident_expert_bytes=sum(sum(a.nbytes for a in w.values()) for w in self._experts.values())
            + self._shared_bytes,
            shared_expert_bytes=self._shared_bytes,
            graph_bytes=self._graph_bytes,
            runs=self._runs,
        )
