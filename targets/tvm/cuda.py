"""CUDA code generation for the TVM target: Jetson GPUs (sm_87, sm_72) and CUDA GPUs of user profiles.

A CUDA library is a Relax VM executable whose host code is built for the device's CPU (the
target's ``host``) and whose kernels are CUDA device code (``cubin`` / ``fatbin``) embedded in the
same shared library. Kernels are scheduled by TVM's CUDA pipeline, whose legalization stage
applies the dlight GPU default schedules (``Matmul``, ``GEMV``, ``Reduction``,
``GeneralReduction``, ``Fallback``) to the fused PrimFuncs; that is the right place for them
(scheduling before fusion would leave the fused kernels unscheduled).

Building needs no GPU, with one catch: TVM packs compiled device code into the library only when
its CUDA runtime (``libtvm_runtime_cuda.so``) loads, and that needs the driver's ``libcuda.so.1``.
Without it TVM silently emits a *source-only* module (CUDA C that no runtime can load). On a build
machine without a driver we build a small link stub of ``libcuda.so.1`` (:data:`_STUB_SOURCE`: the
nine driver entry points TVM's runtime links against, each answering "no device") with the
system C compiler into ``~/.cache/edgemoe/cuda-stub`` and load it before TVM's CUDA runtime. It
is only ever called if something tried to run a kernel in the build process, which the target
never does; every emitted library is checked to hold real device code for the profile's SM
(:func:`embedded_cuda_archs`). Device code is compiled with ``nvcc`` (``TVM_CUDA_COMPILE_MODE=nvcc``,
a fatbin); TVM's default, NVRTC through ``cuda-bindings``, also needs a CUDA toolkit's headers
(``cuda_runtime.h``, CCCL) and so no less of a toolkit than nvcc.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

from ...devices import DeviceProfile
from ...errors import TargetError

# TVM target tags for the built-in Jetson profiles, compared in describe(). The tags' host CPUs
# are not what the boards carry: nvidia/jetson-orin-nano names "carmel" (Xavier's core, no
# dot-product instructions) and nvidia/jetson-agx-orin-64gb "cortex-a78"; Orin has Cortex-A78AE
# cores (DS-11105-001, DS-10662-001). nvidia/jetson-agx-xavier has 8 Carmel cores; the NX has 6.
# We build the host code for the profile's cores (cortex-a78ae, carmel) instead.
TVM_TAGS = {
    "jetson-orin-nano-8gb": "nvidia/jetson-orin-nano",
    "jetson-agx-orin-64gb": "nvidia/jetson-agx-orin-64gb",
    "jetson-xavier-nx": "nvidia/jetson-agx-xavier",
}
NOTE_UNVERIFIED = (
    "CUDA libraries are not run at compile time (no GPU on the build machine): numerics are unchecked "
    "until edgemoe verify / verify_bundle runs on the device"
)
_STUB_LOADED = False  # set once the stub stands in for libcuda.so.1 in this process
_EM_CUDA = 190  # ELF e_machine of CUDA device code (cubin)
_FATBIN_MAGIC = b"\x50\xed\x55\xba"

# The driver API entry points libtvm_runtime_cuda.so links against (nm -D --undefined-only, TVM
# 0.27); each answers CUDA_ERROR_NO_DEVICE (100). cudart finds no cuGetProcAddress here, so a
# process that loaded the stub sees no CUDA device rather than a broken one.
_STUB_SOURCE = r"""/* edgemoe: link stub of libcuda.so.1 for building CUDA libraries on machines without a driver. */
typedef int CUresult;
static const CUresult NO_DEVICE = 100; /* CUDA_ERROR_NO_DEVICE */
CUresult cuDeviceGetName(char *name, int len, int dev) { return NO_DEVICE; }
CUresult cuFuncSetAttribute(void *func, int attr, int value) { return NO_DEVICE; }
CUresult cuGetErrorName(CUresult err, const char **str) { *str = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuGetErrorString(CUresult err, const char **str) {
    *str = "no CUDA driver: edgemoe build-time stub of libcuda.so.1";
    return 0;
}
CUresult cuLaunchKernelEx(const void *config, void *func, void **params, void **extra) { return NO_DEVICE; }
CUresult cuModuleGetFunction(void **func, void *mod, const char *name) { return NO_DEVICE; }
CUresult cuModuleLoadData(void **mod, const void *image) { return NO_DEVICE; }
CUresult cuModuleUnload(void *mod) { return NO_DEVICE; }
CUresult cuTensorMapEncodeTiled(void) { return NO_DEVICE; }
"""


def cuda_target(device: DeviceProfile, host: dict) -> dict:
    """The TVM target of a CUDA profile: its SM for the kernels, ``host`` (an llvm dict) for the rest."""
    return {"kind": "cuda", "arch": device.cuda_arch, "host": host}


def x86_cpu(device: DeviceProfile) -> str:
    """LLVM's x86 CPU named in a profile's ``cpu`` field ("x86-64-v3", "sapphirerapids"), else ``x86-64-v2``."""
    import tvm

    valid = tvm.get_global_func("target.llvm_is_valid_cpu")
    words = re.findall(r"[A-Za-z][A-Za-z0-9-]*", device.cpu)
    return next((w.lower() for w in words if valid(w.lower(), "x86_64-linux-gnu")), "x86-64-v2")


def gpu_here(arch: str) -> bool:
    """Whether this process can run ``arch`` kernels (a real driver and a GPU of that SM)."""
    import tvm

    if _STUB_LOADED:
        return False
    dev = tvm.cuda(0)
    return bool(dev.exist) and f"sm_{dev.compute_version.replace('.', '')}" == arch


def verification(device: DeviceProfile, runs_here: bool) -> dict:
    """The manifest's word on numerics: checked against torch at compile time only on a GPU of the profile's SM."""
    if runs_here and gpu_here(device.cuda_arch):
        return {"verified": True, "note": "each library checked against torch on this machine's GPU"}
    return {"verified": False, "note": NOTE_UNVERIFIED}


def find_nvcc() -> Path | None:
    """``nvcc`` from ``CUDA_PATH``, ``PATH`` or ``/usr/local/cuda``, or None."""
    found = [Path(os.environ["CUDA_PATH"]) / "bin" / "nvcc"] if os.environ.get("CUDA_PATH") else []
    found += [Path(p) for p in (shutil.which("nvcc"),) if p] + [Path("/usr/local/cuda/bin/nvcc")]
    return next((p.resolve() for p in found if p.is_file() and os.access(p, os.X_OK)), None)


@functools.lru_cache(maxsize=4)
def nvcc_info(nvcc: Path) -> tuple[str, frozenset[str]]:
    """(release, real SM architectures) of an nvcc: ``("13.0", {"sm_75", ...})``."""
    try:
        version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=60).stdout
        codes = subprocess.run([str(nvcc), "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise TargetError(f"target tvm: cannot run {nvcc}: {exc}") from None
    release = re.search(r"release (\d+\.\d+)", version)
    return (release.group(1) if release else "unknown", frozenset(re.findall(r"sm_\d+[a-z]?", codes)))


def check_cuda_build(device: DeviceProfile) -> None:
    """Refuse, before anything is built, a CUDA profile this machine cannot compile kernels for.

    Raises:
        TargetError: No nvcc; an nvcc without the profile's SM (CUDA 13 dropped sm_72, Xavier's);
            neither a CUDA driver nor a C compiler to build the driver stub with.
    """
    nvcc = find_nvcc()
    if nvcc is None:
        raise TargetError(
            f"target tvm: CUDA code for {device.name} ({device.cuda_arch}) needs nvcc (a CUDA toolkit) on PATH, "
            "in CUDA_PATH or at /usr/local/cuda; use --target onnx for this device"
        )
    release, archs = nvcc_info(nvcc)
    if device.cuda_arch not in archs:
        raise TargetError(
            f"target tvm: {nvcc} (CUDA {release}) cannot build {device.cuda_arch} for {device.name} "
            f"(it builds {', '.join(sorted(archs, key=_sm_number))}); "
            f"{'CUDA 13 dropped sm_72 (Xavier): ' if device.cuda_arch == 'sm_72' else ''}"
            "point CUDA_PATH at a CUDA 12 toolkit, or use --target onnx for this device"
        )
    if _driver_loadable() is None and _c_compiler() is None:
        raise TargetError(
            "target tvm: this machine has no CUDA driver (libcuda.so.1) and no C compiler (cc/gcc) to build "
            "edgemoe's link stub of it, without which TVM cannot pack device code; install gcc"
        )


def _sm_number(arch: str) -> int:
    return int(re.sub(r"\D", "", arch) or 0)


def _driver_loadable() -> str | None:
    """The path of a real ``libcuda.so.1`` the loader finds, or None."""
    if _STUB_LOADED:  # the loader would hand back the stub by its soname
        return None
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return "libcuda.so.1"


def _c_compiler() -> str | None:
    return next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)


def stub_driver_path() -> Path:
    """Build (once, cached by content) the ``libcuda.so.1`` link stub and return its path.

    Raises:
        TargetError: No C compiler, or it fails.
    """
    digest = hashlib.sha256(_STUB_SOURCE.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgemoe" / "cuda-stub" / digest
    lib = cache / "libcuda.so.1"
    if lib.is_file():
        return lib
    cc = _c_compiler()
    if cc is None:
        raise TargetError("target tvm: no C compiler (cc/gcc) to build the libcuda.so.1 link stub with")
    cache.mkdir(parents=True, exist_ok=True)
    src, tmp = cache / "cuda_stub.c", cache / f"libcuda.so.1.{os.getpid()}"
    src.write_text(_STUB_SOURCE)
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(tmp), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise TargetError(f"target tvm: building the libcuda.so.1 stub failed: {proc.stderr.strip()[-500:]}")
    tmp.replace(lib)  # atomic: concurrent builds each write their own file
    return lib


def _load_tvm_cuda_runtime(nvcc: Path) -> str:
    """Make sure TVM's CUDA runtime is loaded (it packs device code into libraries); say how it was loaded.

    Raises:
        TargetError: The runtime cannot load even with the stub (e.g. no ``libcudart.so.13``).
    """
    import tvm
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return "loaded"
    global _STUB_LOADED
    driver = _driver_loadable() or str(stub_driver_path())
    ctypes.CDLL(driver, mode=ctypes.RTLD_GLOBAL)
    _STUB_LOADED = driver != "libcuda.so.1"
    # The runtime links libcudart.so.13; a toolkit keeps it next to nvcc, off the loader's path.
    for lib_dir in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        for cudart in sorted((nvcc.parent.parent / lib_dir).glob("libcudart.so.*[0-9]")):
            with contextlib.suppress(OSError):
                ctypes.CDLL(str(cudart), mode=ctypes.RTLD_GLOBAL)
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, RuntimeError) as exc:
        raise TargetError(
            f"target tvm: TVM's CUDA runtime (tvm {tvm.__version__}) does not load, so it cannot pack device "
            f"code: {exc}"
        ) from None
    return "driver stub" if _STUB_LOADED else "driver"


@contextlib.contextmanager
def cuda_build_env():
    """The process state a CUDA build needs: TVM's CUDA runtime loaded, kernels compiled by nvcc to a fatbin."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise TargetError("target tvm: no nvcc found (CUDA_PATH, PATH, /usr/local/cuda)")
    _load_tvm_cuda_runtime(nvcc)
    # TVM's callback runs "nvcc" from PATH and reads the mode at call time.
    saved = {k: os.environ.get(k) for k in ("TVM_CUDA_COMPILE_MODE", "PATH")}
    os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    os.environ["PATH"] = f"{nvcc.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def compile_cuda(mod, target: dict):
    """Compile a Relax module for a CUDA target dict into a VM executable.

    Raises:
        TargetError: TVM fails (unsupported operator, nvcc error).
    """
    import tvm
    from tvm import relax

    tgt = tvm.target.Target(target)
    with cuda_build_env(), tgt:
        # relax.get_default_pipeline(cuda) = dispatch, legalize + fuse + dlight default schedules,
        # lowering: what tvm.compile picks for GPU targets, named here so the schedules are explicit.
        return tvm.compile(mod, target=tgt, relax_pipeline=relax.get_default_pipeline(tgt))


def embedded_cuda_archs(data: bytes) -> dict[str, list[str]]:
    """The device code a shared library carries: SMs of its cubins, PTX targets, and whether a fatbin wraps them.

    Cubins are ELF files of machine EM_CUDA (190); their SM sits in ``e_flags`` (bits 8-15 from
    ELF ABI version 8, CUDA >= 12.8; the low byte before).

    Returns:
        ``{"cubin": ["sm_87", ...], "ptx": ["sm_87", ...], "fatbin": [offsets as hex]}`` (empty lists: none).
    """
    found: dict[str, list[str]] = {"cubin": [], "ptx": [], "fatbin": []}
    pos = data.find(b"\x7fELF", 1)
    while pos >= 0:
        if len(data) >= pos + 52 and data[pos + 4] == 2:  # 64-bit ELF header
            machine = struct.unpack_from("<H", data, pos + 18)[0]
            if machine == _EM_CUDA:
                flags = struct.unpack_from("<I", data, pos + 48)[0]
                sm = (flags >> 8) & 0xFF if data[pos + 8] >= 8 else flags & 0xFF
                found["cubin"].append(f"sm_{sm}")
        pos = data.find(b"\x7fELF", pos + 4)
    found["ptx"] = sorted(set(m.decode() for m in re.findall(rb"\.target\s+(sm_\d+[a-z]?)", data)))
    pos = data.find(_FATBIN_MAGIC)
    while pos >= 0:
        found["fatbin"].append(hex(pos))
        pos = data.find(_FATBIN_MAGIC, pos + 4)
    return found


def check_device_code(path: Path, arch: str, name: str) -> None:
    """Refuse a library without device code for ``arch`` (TVM's silent source-only fallback).

    Raises:
        TargetError: No cubin / PTX for ``arch`` inside the library.
    """
    found = embedded_cuda_archs(path.read_bytes())
    if arch not in found["cubin"] and arch not in found["ptx"]:
        raise TargetError(
            f"target tvm: {name} holds no {arch} device code (found {found['cubin'] + found['ptx'] or 'none'}); "
            "TVM kept CUDA source only, which no device can load"
        )


def tag_comparison(device: DeviceProfile, host: dict) -> dict | None:
    """How our target differs from TVM's tag for the board (None: no tag for this profile)."""
    import tvm

    tag = TVM_TAGS.get(device.name)
    if tag is None:
        return None
    ref = tvm.target.Target(tag).export()
    ref_host = dict(ref.get("host") or {})
    diff = {}
    if ref.get("arch") != device.cuda_arch:
        diff["arch"] = {"tag": ref.get("arch"), "ours": device.cuda_arch}
    if ref_host.get("mcpu") != host.get("mcpu"):
        diff["host_mcpu"] = {"tag": ref_host.get("mcpu"), "ours": host.get("mcpu")}
    return {"tag": tag, "differs": diff}


def cross_linker(triple: str, gxx: str):
    """A function for ``export_library(fcompile=...)`` linking ``triple`` libraries, or None.

    ``gxx`` (e.g. aarch64-linux-gnu-g++) where it is on PATH; otherwise ``zig cc`` from the
    ``ziglang`` wheel (pip-only; its first link builds zig's libc stubs, minutes, cached after).
    """
    if shutil.which(gxx):
        return None  # the caller passes cc=gxx
    try:
        import ziglang  # noqa: F401
    except ImportError:
        return None

    def link(output, objects, options=None, cwd=None, ccache_env=None):
        cmd = [sys.executable, "-m", "ziglang", "cc", "-target", triple, "-shared", "-fPIC", "-o", output]
        proc = subprocess.run([*cmd, *objects, *(options or [])], capture_output=True, text=True, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"zig cc failed: {proc.stderr.strip()[-1000:]}")

    link.output_format = "so"
    return link
