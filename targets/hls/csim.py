"""C simulation of a bundle's accelerator with plain g++: built once per bundle, called through ctypes.

The kernels compile against the open ``ap_types`` headers that the ``hls4ml`` wheel ships
(``hls4ml/templates/vivado/ap_types``), found without importing hls4ml. The shared library is
cached under ``$EDGEMOE_CACHE`` (default ``~/.cache/edgemoe``), keyed by the sha256 of the
bundle's sources, the headers and the compiler flags, so a second session on the same bundle
(or an identical one) loads it at once. Numpy, ctypes and the standard library only.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from ...errors import BundleError, DependencyError
from .design import Design

CXX_FLAGS = ("-O2", "-std=c++14", "-shared", "-fPIC", "-w")
SOURCES = ("edgemoe_top.cpp", "csim_api.cpp")


def ap_types_dir() -> Path:
    """The folder of the open ``ap_types`` headers (from the hls4ml wheel, or ``$EDGEMOE_AP_TYPES``).

    Raises:
        DependencyError: Neither is there.
    """
    env = os.environ.get("EDGEMOE_AP_TYPES")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("hls4ml")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "templates" / "vivado" / "ap_types"
        if (path / "ap_fixed.h").is_file():
            return path
    raise DependencyError(
        "C simulation needs the ap_types headers, shipped in the hls4ml wheel: pip install 'edgemoe[hls]' "
        "(or set EDGEMOE_AP_TYPES to a folder holding ap_fixed.h)"
    )


def cache_dir() -> Path:
    """Where built C-simulation libraries are kept."""
    base = os.environ.get("EDGEMOE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgemoe"
    )
    return Path(base) / "csim"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise DependencyError("C simulation needs a C++ compiler (g++) on PATH")
    return cxx


def build_library(src: Path, progress=lambda _m: None) -> Path:
    """Compile the accelerator's sources in ``src`` into a shared library (cached); return its path.

    Raises:
        DependencyError: No compiler or no ap_types headers.
        BundleError: The sources do not compile (the compiler's first error line).
    """
    ap = ap_types_dir()
    cxx = _compiler()
    h = hashlib.sha256()
    for name in sorted(p.name for p in src.iterdir() if p.suffix in (".h", ".cpp")):
        h.update(name.encode())
        h.update((src / name).read_bytes())
    h.update((ap / "ap_fixed_base.h").read_bytes())
    h.update(" ".join((cxx, *CXX_FLAGS)).encode())
    out = cache_dir() / h.hexdigest()[:24] / "libedgemoe_csim.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    progress("build the C-simulation library with g++ (once per bundle; cached)")
    with tempfile.TemporaryDirectory(prefix="edgemoe-csim-", dir=out.parent) as tmp:
        tmp_lib = Path(tmp) / out.name
        cmd = [cxx, *CXX_FLAGS, f"-I{ap}", f"-I{src}", *(str(src / s) for s in SOURCES), "-o", str(tmp_lib)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            first = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip()[:300])
            raise BundleError(f"the accelerator's C simulation does not compile: {first}")
        os.replace(tmp_lib, out)  # atomic: a concurrent build of the same sources is harmless
    return out


_INT16P = np.ctypeslib.ndpointer(dtype=np.int16, flags="C_CONTIGUOUS")
_INT32P = np.ctypeslib.ndpointer(dtype=np.int32, flags="C_CONTIGUOUS")


class CsimAccelerator:
    """The accelerator as a C-simulation library: the same calls a board's driver makes.

    One instance is one accelerator: calls are serialised (the design's on-chip buffers are
    static, as BRAM is).

    Args:
        library: The built library.
        design: The bundle's design (checked against what the library was built for).
    """

    def __init__(self, library: Path, design: Design):
        self._lib = ctypes.CDLL(str(library))
        fn = self._lib.edgemoe_csim_call
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_int] * 5 + [_INT16P, _INT16P, _INT32P, _INT32P, _INT32P, _INT32P]
        self._call = fn
        info = np.zeros(5, dtype=np.int64)
        self._lib.edgemoe_csim_info(info.ctypes.data_as(ctypes.c_void_p))
        want = [design.state_layout()["WORDS"], design.expert_words, design.params_words, design.tokens, design.dim]
        if info.tolist() != want:
            raise BundleError(
                f"the C-simulation library does not match the bundle (built for {info.tolist()}, need {want})"
            )
        self.design = design
        self._lock = threading.Lock()

    def call(self, op: int, task: int, layer: int, expert: int, slot: int, params, pool, slots, inp, out, state) -> int:
        """One call of the top function (arguments as in ``edgemoe_top.cpp``); returns its status."""
        with self._lock:
            return int(self._call(op, task, layer, expert, slot, params, pool, slots, inp, out, state))

    def pool_words(self) -> np.ndarray:
        """16-bit words read from the expert pool since the last reset, per (layer, expert)."""
        d = self.design
        out = np.zeros((max(1, d.moe_layers), d.num_experts), dtype=np.int64)
        self._lib.edgemoe_csim_pool_words(out.ctypes.data_as(ctypes.c_void_p))
        return out

    def reset_counters(self) -> None:
        """Zero the pool read counters."""
        self._lib.edgemoe_csim_reset_counters()
