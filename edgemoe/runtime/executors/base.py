"""The executor interface: what the runtime needs from a backend's runtime library."""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np


class Graph(abc.ABC):
    """A loaded graph: positional numpy inputs in, positional numpy outputs out."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    @abc.abstractmethod
    def run(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """Run the graph once."""


class Executor(abc.ABC):
    """Loads a target's graph files from a bundle.

    Implementations must check each file against its manifest record (size and sha256)
    before handing it to their runtime library.
    """

    name: str = ""

    @abc.abstractmethod
    def load(self, root: Path, record: dict) -> Graph:
        """Load the graph described by a manifest ``graphs`` entry."""

    def place(self, weights: dict[str, np.ndarray]) -> dict[str, object]:
        """Put a just-loaded expert's tensors where this executor's graphs read them.

        Called once per expert load (on the loader thread for a prefetch); the expert cache keeps
        what it returns and hands those values to the expert kernels until the expert is evicted,
        so an executor on a device copies each expert there once per load, not once per call. The
        default keeps the host arrays (graphs on the host read them in place).
        """
        return weights
