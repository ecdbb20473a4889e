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
