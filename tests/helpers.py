"""Small helpers shared by the tests."""

import json
import subprocess
import sys
from pathlib import Path


def read_manifest(bundle: Path) -> dict:
    return json.loads((Path(bundle) / "manifest.json").read_text())


def write_manifest(bundle: Path, manifest: dict) -> None:
    (Path(bundle) / "manifest.json").write_text(json.dumps(manifest))


def json_stdout(*args, cwd=None, timeout: float = 900) -> dict:
    """Run ``edgemoe ARGS --json`` in its own process and parse its whole stdout as one JSON object.

    A process of its own, not click's in-process runner: what native code and libraries write to
    file descriptor 1 counts too (MetaSchedule's tuning logs once preceded ``tune --json``'s object).
    """
    cmd = [sys.executable, "-m", "edgemoe", *map(str, args), "--json"]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    obj = json.loads(proc.stdout)  # the whole of stdout: one object, nothing before or after it
    assert isinstance(obj, dict)
    return obj


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
