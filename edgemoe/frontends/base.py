"""The adapter interface: how a model family is captured and cut into partitions.

One module per family implements :class:`ModelAdapter`. The pipeline only talks to this
interface, so adding a family (a token-routed LM, a third-party class) is one new module
plus one registry line in :mod:`edgemoe.frontends`.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelError, TaskError, did_you_mean
from ..ir import ModelIR, validate_ir

if TYPE_CHECKING:
    import torch


def nonfinite_kinds(t: torch.Tensor) -> tuple[str, ...]:
    """Which of ``NaN`` and ``Inf`` the tensor holds (empty if it is finite, or not floating point)."""
    import torch

    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return ()
    return tuple(k for k, f in (("NaN", torch.isnan), ("Inf", torch.isinf)) if bool(f(t).any()))


@dataclass(frozen=True)
class GraphPartition:
    """A piece of the model to be emitted by a target as one graph.

    Attributes:
        name: Unique name; also the artifact's file stem.
        kind: ``segment``, ``gate``, ``head`` or ``expert_kernel``.
        module: The torch module computing it (inputs and outputs are tensors, in order).
        example_inputs: Tensors to trace the module with.
        input_names: Graph input names, in the module's argument order.
        output_names: Graph output names, in the module's output order.
        dynamic_axes: Per input/output name, the axes that vary at run time.
        task: Task this partition belongs to (None: shared by every task).
        layer: MoE layer index for gates and expert kernels.
        weights: Where the module's weights are not in memory (a streamed compile): a context
            manager factory that reads them while a target exports and checks the partition.
    """

    name: str
    kind: str
    module: torch.nn.Module = field(compare=False)
    example_inputs: tuple = field(compare=False)
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict = field(default_factory=dict, compare=False)
    task: str | None = None
    layer: int | None = None
    weights: Callable[[], contextlib.AbstractContextManager] | None = field(default=None, compare=False)

    def loaded(self) -> contextlib.AbstractContextManager:
        """A context in which :attr:`module` has its weights (see :attr:`weights`).

        It yields the module's outputs on :attr:`example_inputs` where entering it ran them (a
        streamed partition reads its weights that way), else None.
        """
        return contextlib.nullcontext() if self.weights is None else self.weights()


class ModelAdapter(abc.ABC):
    """Wraps one loaded model of a family and exposes it to the pipeline."""

    family: str = ""

    @property
    @abc.abstractmethod
    def ir(self) -> ModelIR:
        """The captured model description."""

    def task_index(self, task: str) -> int:
        """Index of ``task`` among the model's tasks (:attr:`ir`'s, in order).

        Raises:
            TaskError: The model has no such task.
        """
        names = [t.name for t in self.ir.tasks]
        if task not in names:
            raise TaskError(f"unknown task '{task}'{did_you_mean(task, names)} (model has: {', '.join(names)})")
        return names.index(task)

    def nonfinite_weights(self) -> dict[str, tuple[str, ...]]:
        """Weights holding NaN or Inf, by name: which of the two (default: ``self.model``'s parameters)."""
        found = {name: nonfinite_kinds(p) for name, p in self.model.named_parameters()}
        return {name: kinds for name, kinds in found.items() if kinds}

    def state_sha256(self) -> str:
        """Digest of the model's weights, so a bundle can be matched to its source later.

        The default hashes ``self.model``'s torch state dict (names and bytes, in name order).
        """
        h = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    @abc.abstractmethod
    def reference(self, x: np.ndarray, task: str, keep: dict[int, tuple[int, ...]] | None = None) -> np.ndarray:
        """Run the framework model for one task.

        Args:
            x: Input batch.
            task: Task name.
            keep: Optional per-MoE-layer expert sets the routers are restricted to.

        Returns:
            The task's output.
        """

    @abc.abstractmethod
    def route(self, x: np.ndarray, task: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """Routing decisions of the unpruned model for one task.

        Returns:
            Per MoE layer, the chosen experts (tokens, top_k) and their scores (tokens, top_k).
        """

    @abc.abstractmethod
    def segment(self, index: int) -> GraphPartition:
        """Dense trunk segment ``index`` (shared by all tasks)."""

    @abc.abstractmethod
    def gate(self, layer: int, task: str, keep: tuple[int, ...]) -> GraphPartition:
        """Router of ``layer`` for ``task``, restricted to the experts in ``keep``."""

    @abc.abstractmethod
    def head(self, task: str) -> GraphPartition:
        """The task's head."""

    @abc.abstractmethod
    def expert_kernel(self, layer: int) -> GraphPartition:
        """One expert of ``layer`` with its weights as graph inputs (shared by the layer's experts)."""

    @abc.abstractmethod
    def expert_weights(self, layer: int, expert: int) -> dict[str, np.ndarray]:
        """Weights of one expert, keyed and shaped as the layer's :class:`~edgemoe.ir.ExpertSpec`."""

    # -- optional ---------------------------------------------------------------------------
    def calibration_inputs(self, samples: int, seed: int) -> np.ndarray:
        """Calibration batch for routing profiles (default: deterministic sample inputs)."""
        from ..bundle.format import sample_input

        return sample_input(self.ir.input.to_json(), batch=samples, seed=seed)

    def tokenizer(self) -> dict | None:
        """How text becomes the model's token ids: ``{"kind": "bytes"}`` (UTF-8 bytes), or None (ids only).

        A checkpoint folder's ``tokenizer.json`` is found by the bundle writer, not here.
        """
        return None

    def step_segment(self, index: int, max_seq: int) -> GraphPartition:
        """Trunk segment ``index`` for generation: new tokens on a key/value cache of ``max_seq`` positions.

        Raises:
            ModelError: The family has no generation graphs.
        """
        raise ModelError(f"the {self.family} family has no generation graphs (no --max-seq): it is not a causal LM")

    def shared_kernel(self, layer: int) -> GraphPartition | None:
        """Kernel of the layer's shared (always-on) experts, or None if it has none."""
        return None

    def shared_expert_weights(self, layer: int, index: int) -> dict[str, np.ndarray]:
        """Weights of shared expert ``index`` of ``layer``, keyed as its kernel's inputs."""
        raise NotImplementedError(f"{type(self).__name__} has no shared experts")

    def evaluation_data(self, samples: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """Held-out inputs and, where the family has labelled data, per-task targets.

        The default draws sample inputs disjoint from calibration (another seed) with no targets;
        task metrics then compare against the fp32 framework model.
        """
        from ..bundle.format import sample_input

        return sample_input(self.ir.input.to_json(), batch=samples, seed=seed + 7919), None

    def task_metric(
        self, task: str, prediction: np.ndarray, target: np.ndarray | None, reference: np.ndarray
    ) -> tuple[str, float, bool]:
        """A task's accuracy metric of ``prediction``.

        Args:
            task: Task name.
            prediction: Model output on the evaluation inputs.
            target: Labels from :meth:`evaluation_data`, or None.
            reference: The fp32 framework model's output on the same inputs.

        Returns:
            (metric name, value, higher is better). Without labels: top-1 agreement with the fp32
            model for token-level outputs (logits), else mean cosine similarity to it.
        """
        p = prediction.reshape(-1, prediction.shape[-1]).astype(np.float64)
        r = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
        if self.ir.granularity == "token" and prediction.shape[-1] > 1 and task == "lm":
            return "top1_agreement", float((p.argmax(-1) == r.argmax(-1)).mean()), True
        p, r = prediction.reshape(len(prediction), -1), reference.reshape(len(reference), -1)
        cos = (p * r).sum(-1) / np.maximum(np.linalg.norm(p, axis=-1) * np.linalg.norm(r, axis=-1), 1e-30)
        return "cosine_to_fp32", float(cos.mean()), True


class NativeAdapter(ModelAdapter):
    """Base of the adapters of edgemoe's own model classes (``models/``): torch modules with a ``cfg``.

    The constructor puts the model in eval mode and captures it once with :meth:`_capture`.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()
        self.cfg = model.cfg
        self._ir = validate_ir(self._capture())

    @abc.abstractmethod
    def _capture(self) -> ModelIR:
        """Describe ``self.model`` (the constructor validates the description)."""

    @property
    def ir(self) -> ModelIR:
        return self._ir
