"""The executor interface: what the runtime needs from a backend's runtime library.

Executors live with their backend (``targets/<name>/``) and are found by the name a bundle's
manifest gives (``target.executor``), see :mod:`edgemoe.targets`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BundleError, DependencyError

if TYPE_CHECKING:
    from .program import TaskProgram


class Graph(abc.ABC):
    """A loaded graph: positional numpy inputs in, positional numpy outputs out."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abc.abstractmethod
    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run the graph once."""


@dataclass(frozen=True)
class Timing:
    """Times of one graph (``edgemoe bench``).

    Attributes:
        median_ms: Median over the repeats (each the mean of ``number`` calls).
        mean_ms: Mean over the repeats.
        min_ms: Fastest repeat.
        max_ms: Slowest repeat.
        repeat: Repeats measured (after one discarded warm-up call).
        number: Calls averaged per repeat (0: as many as fill 1 ms, chosen by the timer).
    """

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    repeat: int
    number: int

    def to_json(self) -> dict:
        """JSON form."""
        return {k: getattr(self, k) for k in ("median_ms", "mean_ms", "min_ms", "max_ms", "repeat", "number")}


class Executor(abc.ABC):
    """Loads a target's artifacts from a bundle and runs them.

    Implementations must check each file against its manifest record (size and sha256)
    before handing it to their runtime library.
    """

    name: str = ""

    @abc.abstractmethod
    def load(self, root: Path, record: dict) -> Graph:
        """Load the graph described by a manifest ``graphs`` entry."""

    def program(self, root: Path, manifest: dict, task: str, recorder=None) -> TaskProgram:
        """The task's program: what a :class:`~edgemoe.runtime.Session` runs.

        The default loads the task's graphs (trunk segments, gates, head, expert kernels) with
        :meth:`load`; an executor that runs the whole model as one design overrides it.

        Args:
            root: Bundle folder.
            manifest: Its manifest.
            task: Task name (checked by the caller).
            recorder: Called with (graph name, inputs) on every graph call, or None.
        """
        from .program import GraphProgram

        return GraphProgram(self, root, manifest, task, recorder)

    def place(self, weights: dict[str, np.ndarray]) -> dict[str, object]:
        """Put a just-loaded expert's tensors where this executor's graphs read them.

        Called once per expert load (on the loader thread for a prefetch); the expert cache keeps
        what it returns and hands those values to the expert kernels until the expert is evicted
        (then :meth:`unplace`), so an executor on a device copies each expert there once per load,
        not once per call. The default keeps the host arrays (graphs on the host read them in place).
        """
        return weights

    def unplace(self, placed: dict[str, object]) -> None:
        """The expert cache dropped an expert :meth:`place` returned (evicted): free its device memory."""
        del placed  # host arrays: the cache reuses their buffer

    # -- optional capabilities, used by ``edgemoe bench`` ----------------------------------
    @classmethod
    def remote(cls, address: str, timeout: float) -> Executor:
        """An executor that runs this backend's graphs on the remote device at ``address``.

        Raises:
            BundleError: The backend has no remote execution.
        """
        raise BundleError(f"remote runs need a backend with remote execution (--target tvm); this bundle is {cls.name}")

    @classmethod
    def graph_timer(cls, timeout: float) -> Executor | None:
        """An executor whose loaded graphs have ``time(*inputs, repeat=)`` -> :class:`Timing` (None: wall clock)."""
        return None

    @classmethod
    def device_kind(cls, manifest: dict) -> str:
        """What a bundle's code runs on, in a word (``edgemoe bench``)."""
        return "host"


def executor_class(name: str) -> type[Executor]:
    """The executor class a bundle names (from the backend folder that declares it).

    Raises:
        BundleError: No backend declares such an executor.
    """
    from ..targets import executor_class as find

    return find(name)


def get_executor(name: str, **options) -> Executor:
    """Instantiate the executor a bundle asks for.

    Raises:
        BundleError: Unknown executor.
        DependencyError: Its runtime library is not installed (the bundle is fine; this install lacks it).
    """
    try:
        cls = executor_class(name)
        return cls(**options)
    except ImportError as exc:
        raise DependencyError(
            f"executor '{name}' needs the package '{exc.name}', which is not installed here "
            f"(pip install 'edgemoe[{name if name in ('tvm',) else 'runtime'}]')"
        ) from None
