"""Last stage: write the final manifest into the staged bundle and rename the bundle into place."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..bundle.format import MANIFEST
from ..bundle.staging import install
from ..config import CompileConfig
from ..stages import CompileState, Stage


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` into a (staging) bundle folder."""
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def write_manifest_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Write the manifest and install the staged bundle at ``state.out`` (replacing an older bundle)."""
    del cfg
    write_manifest(state.staging, state.manifest)
    install(state.staging, state.out)
    return dataclasses.replace(state, staging=None)


STAGE = Stage(
    "write-manifest",
    write_manifest_stage,
    lambda s: {"out": str(s.out), "manifest_bytes": (s.out / MANIFEST).stat().st_size},
)
