"""Small helpers shared by the tests."""

import json
from pathlib import Path


def read_manifest(bundle: Path) -> dict:
    return json.loads((Path(bundle) / "manifest.json").read_text())


def write_manifest(bundle: Path, manifest: dict) -> None:
    (Path(bundle) / "manifest.json").write_text(json.dumps(manifest))


# What a runtime process may never import: torch, onnx and every compiler-side module. A backend
# folder's runtime side is its ``executor`` module and what that imports (``remote``, drivers);
# its compiler side (``target``, ``quantize``, ``tune``, ``cuda``, HLS lowering ...) must stay out.
COMPILER_MODULES = (
    "torch.",
    "onnx.",
    "edgemoe.passes",
    "edgemoe.tools",
    "edgemoe.compiler",
    "edgemoe.frontends",
    "edgemoe.models",
    "edgemoe.schedule",
    "edgemoe.devices",
    "edgemoe.quantization",
    "edgemoe.targets.base",
)
COMPILER_LEAVES = ("target", "quantize", "tune", "cuda", "dispatch", "lower", "project", "estimate", "fixed_types")
GUARD_CODE = (
    "bad = [m for m in sys.modules if m in ('torch', 'onnx') or m.startswith(COMPILER_MODULES)"
    " or (m.startswith('edgemoe.targets.') and m.rsplit('.', 1)[-1] in COMPILER_LEAVES)]\n"
    "print(bad)\n"
)


def guard_prelude() -> str:
    """Python source defining the guard's lists, to prepend to a child process's code."""
    return f"import sys\nCOMPILER_MODULES = {COMPILER_MODULES!r}\nCOMPILER_LEAVES = {COMPILER_LEAVES!r}\n"
