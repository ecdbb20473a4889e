"""Stage: create the hidden staging folder the bundle is written into (renamed into place last)."""

from __future__ import annotations

import dataclasses

from ..bundle.staging import open_staging
from ..config import CompileConfig
from ..stages import CompileState, Stage


def open_bundle(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Open the staging folder beside ``state.out`` (see :mod:`edgemoe.bundle.staging`).

    Raises:
        OutputPathError: The output path is taken by something that is not a bundle, or its
            folder cannot be written.
    """
    del cfg
    return dataclasses.replace(state, staging=open_staging(state.out))


STAGE = Stage("open-bundle", open_bundle, lambda s: {"out": str(s.out), "staging": s.staging.name})
