"""What every backend implements: the compiler-side :class:`Target` and the inputs it builds from.

A target turns a compile's partition plan into the files of a bundle. Most backends emit one graph
file per partition (:meth:`Target.emit`) and leave the expert blobs in fp32; a backend that builds
the whole model as one design (the HLS accelerator) overrides :meth:`Target.emit_bundle`, the one
entry point the pipeline calls, and writes its own artifacts and expert blobs.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..bundle.format import encode_expert, file_record
from ..errors import TargetError

if TYPE_CHECKING:
    from ..config import CompileConfig
    from ..devices import DeviceProfile
    from ..frontends import GraphPartition
    from ..passes.capture_model import CapturedModel
    from ..passes.partition_model import PartitionPlan
    from ..passes.profile_routing import RoutingProfile


@dataclass(frozen=True)
class EmitJob:
    """Everything a target builds a bundle's artifacts from.

    Attributes:
        root: The (staging) bundle folder to write into.
        cfg: The compile configuration.
        captured: The captured model (weights come from its adapter).
        profile: Calibration routing profile.
        plan: The partition plan (graphs to emit, experts to ship).
        device: The device profile built for.
        progress: Called with a short message per step.
    """

    root: Path
    cfg: CompileConfig
    captured: CapturedModel
    profile: RoutingProfile
    plan: PartitionPlan
    device: DeviceProfile
    progress: Callable[[str], None] = lambda _msg: None


@dataclass(frozen=True)
class Emitted:
    """What a target wrote into a bundle, as manifest records.

    Attributes:
        graphs: The manifest's ``graphs`` section (every artifact file, by name).
        experts: Per MoE layer, the records of its routed expert blobs (``index``, file, size, sha256,
            ``dtype``, ``tensors``), in the plan's order.
        shared: Per MoE layer, the records of its shared expert blobs.
        expert_bytes: Per MoE layer, the bytes of one expert as stored.
        sections: Further manifest sections the target adds (e.g. ``hls``), by key.
    """

    graphs: dict[str, dict]
    experts: tuple[tuple[dict, ...], ...]
    shared: tuple[tuple[dict, ...], ...]
    expert_bytes: tuple[int, ...]
    sections: dict = field(default_factory=dict)


# An emitted graph must reproduce its torch module on the example inputs within these bounds.
CHECK_ATOL = 1e-5
CHECK_RTOL = 1e-5


def check_against_torch(target: str, part: GraphPartition, got, want=None) -> None:
    """Compare a compiled graph's outputs on ``part.example_inputs`` with the torch module's (``want``, if computed).

    A gate's expert indices may differ only where router scores tie exactly (either expert is a
    valid top-k choice); its scores output is compared within tolerance, which catches the rest.

    Raises:
        TargetError: An output's count, shape or values differ.
    """
    import numpy as np
    import torch

    if want is None:
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
    """A backend that turns a partition plan into files a runtime executor can load.

    Attributes:
        name: Backend name (``--target``): the name of its folder under ``targets/``.
        executor: Name of the runtime executor that runs this target's artifacts.
        suffix: File suffix of emitted graphs.
        int8_weight_max: Largest magnitude of an int8 expert weight this target's kernels take (127:
            the full range; a target whose integer kernels can overflow narrows it).
    """

    name: str = ""
    executor: str = ""
    suffix: str = ""
    int8_weight_max: int = 127

    @abc.abstractmethod
    def check_device(self, device: DeviceProfile) -> None:
        """Raise :class:`~edgemoe.errors.TargetError` if this target cannot build for ``device``."""

    @abc.abstractmethod
    def describe(self, cfg: CompileConfig) -> dict:
        """The manifest's ``target`` section (name, executor, versions, options)."""

    def check_model(self, cfg: CompileConfig) -> None:
        """Refuse, before any work, options this target cannot build (default: none)."""
        del cfg

    def emit_bundle(self, job: EmitJob) -> Emitted:
        """Write every artifact of the bundle and the expert blobs into ``job.root``.

        The default emits each partition of the plan as one graph (:meth:`emit`) and every kept
        expert as an fp32 blob (``experts/L<l>_E<e>.bin``).
        """
        graphs: dict[str, dict] = {}
        parts = job.plan.graphs()
        for i, part in enumerate(parts, 1):
            job.progress(f"emit {self.name} graph {i}/{len(parts)}: {part.name}")
            path = self.emit(part, job.root / "graphs", job.cfg)
            graphs[part.name] = graph_record(job.root, path, part, self.graph_files(job.root, path))
        experts, shared = write_fp32_experts(job)
        sizes = tuple(layer.expert.param_count * 4 for layer in job.captured.ir.moe_layers)
        return Emitted(graphs, experts, shared, sizes)

    def release(self) -> None:
        """Forget what a compile left in this (process-wide) target; called after every compile."""
        return None

    def emit(self, part: GraphPartition, out_dir: Path, cfg: CompileConfig) -> Path:
        """Write ``part`` as one file under ``out_dir``, check it, and return its path."""
        raise TargetError(f"target {self.name} does not emit single partitions")

    # -- verification (edgemoe verify) ------------------------------------------------------
    # Whether verify applies the fp32 tolerance (False: the target's verify_task decides).
    checks_outputs: bool = False
    # Whether verify times batch-1 runs (False: the target reports its own latency figure).
    timed_in_verify: bool = True

    def verify_inputs(self, manifest: dict, adapter, samples: int, seed: int):
        """The verification batch (default: deterministic sample inputs of the bundle's input spec)."""
        from ..bundle.format import sample_input

        return sample_input(manifest["input"], batch=samples, seed=seed)

    def verify_accuracy(self, bundle: Path, manifest: dict, adapter, samples: int) -> dict:
        """The task metrics on held-out data (default: the bundle run by the runtime)."""
        from ..passes.measure_accuracy import measure_accuracy

        return measure_accuracy(bundle, manifest, adapter, samples)

    def verify_task(self, bundle: Path, manifest: dict, task: str, x, session, reference, accuracy: dict) -> dict:
        """Further checks of a task's run on ``x``; ``passed`` in the result decides the task if given.

        Args:
            bundle: Bundle folder.
            manifest: Its manifest.
            task: The task.
            x: The verification batch.
            session: The session that ran it (``session.run(x)`` was its last run).
            reference: PyTorch's output on ``x``.
            accuracy: The task's entry of :meth:`verify_accuracy`.
        """
        return {}

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

    def graph_files(self, root: Path, path: Path) -> dict:
        """The manifest record of a graph file this target wrote: file, bytes, sha256.

        A target whose graphs read further files (ONNX external data) lists them here, so that the
        runtime checks them like the graph and reads nothing else.
        """
        return file_record(root, path)

    def graph_io(self, path: Path) -> tuple[list[str], list[str]]:
        """Input and output names of a graph file this target wrote (a quantized kernel variant)."""
        raise TargetError(f"target {self.name} cannot list the inputs of {path.name}")


def graph_record(root: Path, path: Path, part: GraphPartition, files: dict | None = None) -> dict:
    """The manifest ``graphs`` entry of a partition's graph file (``files``: its record, if already made)."""
    entry = dict(files) if files is not None else file_record(root, path)
    entry.update(kind=part.kind, inputs=list(part.input_names), outputs=list(part.output_names))
    if part.task is not None:
        entry["task"] = part.task
    if part.layer is not None and part.kind != "expert_kernel":
        entry["layer"] = part.layer
    return entry


def write_fp32_experts(job: EmitJob) -> tuple[tuple[tuple[dict, ...], ...], tuple[tuple[dict, ...], ...]]:
    """Write the plan's routed and shared experts as fp32 blobs; return their records per layer."""
    adapter, plan = job.captured.adapter, job.plan
    expert_dir = job.root / "experts"
    expert_dir.mkdir(exist_ok=True)
    routed, shared = [], []
    for layer in job.captured.ir.moe_layers:
        job.progress(f"write experts of MoE layer {layer.index} ({len(plan.experts[layer.index])}/{layer.num_experts})")
        records = []
        for e in plan.experts[layer.index]:
            blob, tensors = encode_expert(adapter.expert_weights(layer.index, e))
            path = expert_dir / f"L{layer.index}_E{e}.bin"
            path.write_bytes(blob)
            records.append({"index": e, **file_record(job.root, path), "dtype": "float32", "tensors": tensors})
        routed.append(tuple(records))
        records = []
        for j in range(layer.shared_experts):
            blob, tensors = encode_expert(adapter.shared_expert_weights(layer.index, j))
            path = expert_dir / f"L{layer.index}_S{j}.bin"
            path.write_bytes(blob)
            records.append(
                {
                    "index": j,
                    **file_record(job.root, path),
                    "dtype": "float32",
                    "tensors": tensors,
                    "kernel": plan.layer_shared_kernel[layer.index],
                }
            )
        shared.append(tuple(records))
    return tuple(routed), tuple(shared)
