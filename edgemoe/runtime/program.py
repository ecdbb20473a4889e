"""A task loaded on an executor: the compute a :class:`~edgemoe.runtime.Session` drives.

The session owns what is the same on every backend — input checks, the expert cache, prefetch,
task switches, statistics — and drives a :class:`TaskProgram` through one run::

    run = program.start(x)                      # trunk up to MoE layer 0's input
    for layer in range(layers):
        experts, scores = program.route(run, layer)
        for e in routed experts (ascending):    # the cache pins each one's weights meanwhile
            program.expert(run, layer, e, tokens, slots, weights)
        program.finish_layer(run, layer)        # shared experts, then up to the next MoE input
    y = program.output(run)

:class:`GraphProgram` runs a bundle of graphs (one per partition: ONNX, TVM); an executor that
runs the whole model as one design (the FPGA accelerator) implements the same steps its own way.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..bundle.describe import check_graph
from ..bundle.format import decode_expert, read_verified
from ..bundle.format import graph_bytes as files_bytes
from ..errors import BundleError, EdgeMoEError


class TaskProgram(abc.ABC):
    """One task of a bundle on one executor.

    Attributes:
        task: The task.
        graph_bytes: Bytes of the artifacts the task loaded.
        shared_bytes: Bytes of the always-resident shared experts it loaded.
    """

    task: str
    graph_bytes: int = 0
    shared_bytes: int = 0

    @abc.abstractmethod
    def start(self, x: np.ndarray) -> object:
        """Begin a run on a checked input batch: run the trunk up to the first MoE layer's input.

        Returns:
            The run's state, passed to the other steps (runs may interleave on threads).
        """

    @abc.abstractmethod
    def route(self, run: object, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """The gate of ``layer`` on the run's MoE input: experts (tokens, k) int and their scores (tokens, k)."""

    def pregate(self, run: object, layer: int) -> np.ndarray | None:
        """The experts (tokens, k) the gate of ``layer`` picks on the run's *current* MoE input (pre-gating).

        None: this program cannot pre-gate.
        """
        return None

    @abc.abstractmethod
    def expert(
        self, run: object, layer: int, expert: int, tokens: np.ndarray, slots: np.ndarray, weights: dict
    ) -> None:
        """Apply routed expert ``expert`` of ``layer`` to ``tokens`` (their top-k ``slots``) with its weights."""

    @abc.abstractmethod
    def finish_layer(self, run: object, layer: int) -> None:
        """Add the shared experts and the MoE output, and run on to the next MoE input (or the features)."""

    @abc.abstractmethod
    def output(self, run: object) -> np.ndarray:
        """The task's output (its head on the features)."""

    def reserve(self, capacity: int) -> None:
        """The expert cache may hold ``capacity`` bytes: size any device-side expert memory for it."""
        del capacity  # graphs read experts from host memory the cache owns

    @abc.abstractmethod
    def switch(self, task: str) -> TaskProgram:
        """A program for another task of the bundle, reusing what both tasks share (trunk, kernels)."""

    def decoder(self, batch: int = 1) -> Decoder:
        """Load the bundle's generation graphs and start an empty key/value cache for ``batch`` sequences.

        Raises:
            BundleError: This program cannot generate.
        """
        raise BundleError(f"{type(self).__name__} cannot generate: generation runs on the graphs' host path")

    def start_step(self, x: np.ndarray, decoder: Decoder) -> object:
        """Begin a generation step: the new tokens ``x`` (batch, s) through the first generation graph."""
        raise BundleError(f"{type(self).__name__} cannot generate")


class Decoder:
    """A generation in progress: the key/value cache of each generation graph and how many tokens it holds.

    Args:
        graphs: The bundle's generation graphs, one per trunk segment.
        records: Their ``generate.segments`` manifest records (cache tensor names and shapes).
        max_seq: Cache positions.
        batch: Sequences generated together.
    """

    def __init__(self, graphs: list, records: list[dict], max_seq: int, batch: int = 1):
        self.graphs, self.max_seq = graphs, int(max_seq)
        self.caches = [[np.zeros((batch, *c["shape"]), np.float32) for c in r["cache"]] for r in records]
        self.past = 0
        self.cache_bytes = sum(a.nbytes for c in self.caches for a in c)

    def run(self, index: int, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run generation graph ``index`` on the step's tokens at positions ``past..``; keep its updated cache."""
        graph, cache = self.graphs[index], self.caches[index]
        if not cache:  # no attention in the segment: the plain segment
            return graph.run(*inputs)
        outs = graph.run(*inputs, np.array([self.past], dtype=np.int64), *cache)
        n = len(outs) - len(cache)
        self.caches[index] = list(outs[n:])
        return outs[:n]

    def advance(self, tokens: int) -> None:
        """The step's ``tokens`` are in every cache now."""
        self.past += int(tokens)


class _RecordingGraph:
    """Passes calls through to a graph and hands each call's inputs to a recorder (calibration)."""

    def __init__(self, graph, name: str, recorder: Callable[[str, tuple[np.ndarray, ...]], None]):
        self._graph, self._name, self._recorder = graph, name, recorder
        self.input_names, self.output_names = graph.input_names, graph.output_names

    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        self._recorder(self._name, inputs)
        return self._graph.run(*inputs)


class _GraphRun:
    """One run's state in a :class:`GraphProgram`."""

    __slots__ = ("carried", "flat", "gate_out", "hidden", "moe_in", "out", "outs", "parts", "step")

    def __init__(self, outs: tuple[np.ndarray, ...], step: Decoder | None = None):
        self.outs, self.step = outs, step
        self.hidden = self.moe_in = self.flat = self.out = None
        self.carried: list[np.ndarray] = []
        self.gate_out: tuple[np.ndarray, ...] = ()
        # The layer's routed experts' outputs by expert, summed in ascending order when the layer
        # finishes: float sums depend on their order, and a step may run its experts in any.
        self.parts: dict[int, tuple] = {}


def _bundle_fault(step):
    """Report a run step's failure that is not edgemoe's own error as the bundle's (a :class:`BundleError`).

    By the time a step runs, the input was checked against the manifest and every file against its
    sha256, so an executor's library refusing a graph's inputs, or a graph answering with outputs of
    another count or shape than the next step takes, means the bundle's graphs do not fit together
    or their manifest: a record naming another graph, or a graph whose bytes were rewritten along
    with their sha256. (Out of memory stays what it is.)
    """

    @functools.wraps(step)
    def wrapper(self, run, *args):
        try:
            return step(self, run, *args)
        except (EdgeMoEError, MemoryError):
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            where = f"{step.__name__} of layer {args[0]}" if args and isinstance(args[0], int) else step.__name__
            raise BundleError(
                f"the bundle's graphs do not fit together or their manifest: {where} failed "
                f"({type(exc).__name__}: {first})"
            ) from exc

    return wrapper


class _LazySegments:
    """A program's trunk segments, each loaded on first use; those not loaded yet have their files checked now."""

    def __init__(self, program: GraphProgram, names: list[str], reuse: dict):
        self._program, self._names = program, list(names)
        self._graphs = [program._graph(n, reuse) if n in reuse else None for n in self._names]
        for name, graph in zip(self._names, self._graphs, strict=True):
            if graph is None:
                check_graph(program.root, program.manifest, program._record(name))

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, i: int):
        if self._graphs[i] is None:
            self._graphs[i] = self._program._graph(self._names[i], {})
        return self._graphs[i]


class GraphProgram(TaskProgram):
    """A task of a bundle of graphs: trunk segments, the task's gates and head, expert kernels.

    Args:
        executor: Loads the graphs and places shared experts.
        root: Bundle folder.
        manifest: Its manifest.
        task: Task name.
        recorder: Called with (graph name, inputs) on every graph call, or None.
        reuse: Graphs already loaded (by name), e.g. the trunk and kernels of the task switched from.
        shared: Shared experts already loaded (they belong to the layer, not to a task), with their bytes.
    """

    def __init__(
        self,
        executor,
        root: Path,
        manifest: dict,
        task: str,
        recorder: Callable[[str, tuple[np.ndarray, ...]], None] | None = None,
        reuse: dict | None = None,
        shared: tuple[list, int] | None = None,
    ):
        self.executor, self.root, self.manifest, self.task = executor, Path(root), manifest, task
        self._recorder = recorder
        self._loaded: dict[str, object] = {}
        record = manifest["tasks"][task]
        reuse = reuse or {}
        if manifest.get("generate") and recorder is None:
            # A bundle that generates decodes with its generation graphs: its plain trunk segments
            # (the same dense weights again) load on a first plain run only, checked now all the same.
            self.segments = _LazySegments(self, manifest["segments"], reuse)
        else:
            self.segments = [self._graph(name, reuse) for name in manifest["segments"]]
        self.gates = [self._graph(name, reuse) for name in record["gates"]]
        self.head = self._graph(record["head"], reuse)
        self.layers = manifest["moe_layers"]
        self._records = [{e["index"]: e for e in layer["experts"]} for layer in self.layers]
        self._kernels = {name: self._graph(name, reuse) for name in _kernel_names(manifest, record["experts"])}
        self._check_tensors(record["experts"])
        # Shared experts run on every token: load them now and keep them resident.
        if shared is not None:
            self.shared, self.shared_bytes = shared
        else:
            self.shared = [
                [(self._kernels[e["kernel"]], self._shared_weights(e)) for e in layer.get("shared", [])]
                for layer in self.layers
            ]

    def _check_tensors(self, kept: list[list[int]]) -> None:
        """Every expert the task may run holds each tensor its kernel takes (before any run needs one).

        Raises:
            BundleError: An expert record lacks a tensor its kernel's inputs name.
        """
        for li, (layer, keep) in enumerate(zip(self.layers, kept, strict=True)):
            experts = [(f"expert {e}", self._records[li][e], self._kernel(li, e)) for e in keep]
            shared = enumerate(layer.get("shared", []))
            experts += [(f"shared expert {j}", e, self._kernels[e["kernel"]]) for j, e in shared]
            for what, record, kernel in experts:
                missing = set(kernel.input_names[1:]) - {t["name"] for t in record["tensors"]}
                if missing:
                    raise BundleError(
                        f"garbled manifest: {what} of layer {li} has no tensor {', '.join(sorted(missing))[:120]}, "
                        "which its kernel takes"
                    )

    def _record(self, name: str) -> dict:
        """The manifest's ``graphs`` entry of ``name``.

        Raises:
            BundleError: The manifest does not list it.
        """
        try:
            return self.manifest["graphs"][name]
        except KeyError:
            raise BundleError(f"garbled manifest: graph '{name[:120]}' is not listed") from None

    def _graph(self, name: str, reuse: dict):
        record = self._record(name)
        graph = reuse.get(name) or self.executor.load(self.root, record)
        self._loaded[name] = graph
        self.graph_bytes += files_bytes(record)  # the graph and its data files
        return graph if self._recorder is None else _RecordingGraph(graph, name, self._recorder)

    def _shared_weights(self, record: dict) -> dict[str, object]:
        weights = decode_expert(read_verified(self.root, record), record["tensors"])
        self.shared_bytes += int(record["bytes"])
        return self.executor.place(weights)

    def loaded(self) -> dict[str, object]:
        """The graphs this program loaded, by name (unwrapped), to reuse in another task's program."""
        return dict(self._loaded)

    def _kernel(self, layer: int, expert: int):
        return self._kernels[self._records[layer][expert].get("kernel", self.layers[layer]["kernel"])]

    def switch(self, task: str) -> GraphProgram:
        return GraphProgram(
            self.executor,
            self.root,
            self.manifest,
            task,
            self._recorder,
            reuse=self._loaded,
            shared=(self.shared, self.shared_bytes),
        )

    def decoder(self, batch: int = 1) -> Decoder:
        gen = self.manifest.get("generate")
        if not gen:
            raise BundleError("this bundle has no generation graphs: compile the model with --max-seq N")
        graphs = [self._graph(s["graph"], self._loaded) for s in gen["segments"]]
        return Decoder(graphs, gen["segments"], gen["max_seq"], batch)

    # -- a run -----------------------------------------------------------------------------
    @_bundle_fault
    def start(self, x: np.ndarray) -> _GraphRun:
        run = _GraphRun(self.segments[0].run(x))
        self._enter(run)
        return run

    @_bundle_fault
    def start_step(self, x: np.ndarray, decoder: Decoder) -> _GraphRun:
        run = _GraphRun(decoder.run(0, x), decoder)
        self._enter(run)
        return run

    def _enter(self, run: _GraphRun) -> None:
        """Split the last segment's outputs into (hidden, moe_input, *carried) when an MoE layer follows."""
        if self.layers:
            # Segments hand on (hidden, moe_input, *carried): carried tensors (e.g. masks) pass through.
            run.hidden, run.moe_in, *run.carried = run.outs
            run.flat = run.moe_in.reshape(-1, run.moe_in.shape[-1])
            run.out = np.zeros_like(run.flat)

    @_bundle_fault
    def route(self, run: _GraphRun, layer: int) -> tuple[np.ndarray, np.ndarray]:
        run.gate_out = self.gates[layer].run(run.moe_in)
        idx, scores = run.gate_out[0], run.gate_out[1]
        if idx.dtype.kind not in "iu":
            raise BundleError(f"the gate of layer {layer} answers with {idx.dtype} expert ids, not integers")
        k = idx.shape[-1]
        return idx.reshape(-1, k), scores.reshape(-1, k)

    @_bundle_fault
    def pregate(self, run: _GraphRun, layer: int) -> np.ndarray:
        gate = self.gates[layer]
        gate = getattr(gate, "_graph", gate)  # unrecorded: a pre-gating call is not part of the run
        idx = gate.run(run.moe_in)[0]
        return idx.reshape(-1, idx.shape[-1])

    @_bundle_fault
    def expert(
        self, run: _GraphRun, layer: int, expert: int, tokens: np.ndarray, slots: np.ndarray, weights: dict
    ) -> None:
        kernel = self._kernel(layer, expert)
        # Kernel inputs: the tokens, then the expert's tensors by name (an expert is data).
        (y,) = kernel.run(run.flat[tokens], *(weights[name] for name in kernel.input_names[1:]))
        scores = run.gate_out[1].reshape(run.flat.shape[0], -1)
        run.parts[expert] = (tokens, y * scores[tokens, slots, None])

    @_bundle_fault
    def finish_layer(self, run: _GraphRun, layer: int) -> None:
        for e in sorted(run.parts):
            tokens, part = run.parts[e]
            run.out[tokens] += part
        run.parts.clear()
        if self.shared[layer]:
            # The gate's third output weighs each shared expert per token (ones where ungated).
            shared_scores = run.gate_out[2].reshape(run.flat.shape[0], -1)
            for j, (kernel, w) in enumerate(self.shared[layer]):
                (y,) = kernel.run(run.flat, *(w[name] for name in kernel.input_names[1:]))
                run.out += y * shared_scores[:, j : j + 1]
        moe_out = run.out.reshape(run.moe_in.shape)
        inputs = (run.hidden, moe_out, *run.carried)
        run.outs = self.segments[layer + 1].run(*inputs) if run.step is None else run.step.run(layer + 1, *inputs)
        if layer + 1 < len(self.layers):
            self._enter(run)

    @_bundle_fault
    def output(self, run: _GraphRun) -> np.ndarray:
        if run.step is not None:  # generation needs the next token's logits only
            (y,) = self.head.run(run.outs[0][:, -1:])
            return y
        (y,) = self.head.run(*run.outs)
        return y


def _kernel_names(m: dict, kept: list[list[int]]) -> list[str]:
    """Kernels a task can need: its kept experts' (an expert may override its layer's) and shared ones."""
    names: list[str] = []
    for layer, keep in zip(m["moe_layers"], kept, strict=True):
        routed = [e.get("kernel", layer["kernel"]) for e in layer["experts"] if e["index"] in keep]
        for name in (*routed, *(e["kernel"] for e in layer.get("shared", []))):
            if name not in names:
                names.append(name)
    return names
