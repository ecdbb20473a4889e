"""``edgemoe package``: one folder to copy to a board that runs a TVM bundle with edgemoe-rt, no Python.

A package is::

    run.sh                   LD_LIBRARY_PATH=lib/ bin/edgemoe-rt bundle/ "$@"
    package.json             what is in it: parts, sizes, sha256s, what the board must have
    bin/edgemoe-rt           the native runtime built for the device's CPU (targets/tvm/native)
    lib/*.so                 the TVM runtime libraries it loads (libtvm_runtime, _extra, libtvm_ffi)
    bundle/                  the bundle: manifest.json and every file it lists, checked on the copy

The binary is the ``make native`` build for an x86_64 host and the ``make native-aarch64`` cross
build for aarch64 boards (built here through the Makefile when missing or older than its sources).
The libraries are the DT_NEEDED closure of the binary inside the build's TVM site folder (the venv's
wheels, or the unpacked aarch64 wheels), read from the ELF files themselves; every other library
(glibc, libstdc++, libgcc_s) is the board's own, and the newest symbol versions the package needs
from each are recorded. libstdc++ is not shipped: the build machine's (Debian 12, GCC 12) needs
GLIBC_2.36, which would shut out boards whose glibc is older but new enough for everything else.
Nothing of the compiler goes in (no Python file, no libtvm_compiler, no torch): checked on the
staged folder, which is renamed into place only when complete, as bundles are.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable
from pathlib import Path

from ...bundle.format import MANIFEST, read_manifest
from ...bundle.staging import OutputKind, check_output_path, discard_on_failure, install, open_staging
from ...devices import get_device
from ...errors import (
    BundleError,
    DependencyError,
    EdgeMoEError,
    EdgeMoEWarning,
    IntegrityError,
    TargetError,
)
from .elf import MACHINES, machine_name, newest_versions, read_elf, set_runpath

Progress = Callable[[str], None]

FORMAT_TAG = "edgemoe-package"
PACKAGE_FILE = "package.json"
ROOT = Path(__file__).resolve().parents[2]
NATIVE_SOURCES = ROOT / "targets" / "tvm" / "native"
# Make target and build folder of edgemoe-rt per CPU architecture of the machine it is packaged on.
BUILDS = {"native": ROOT / "build" / "native", "native-aarch64": ROOT / "build" / "native-aarch64"}
RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_ffi.so")
RUNPATH = "$ORIGIN/../lib"
# Anything of the compiler side: Python sources / bytecode / path files, the TVM compiler, torch, Python.
_COMPILER_PARTS = re.compile(r"\.py[cdow]?$|\.pth$|^libtvm_compiler|torch|^libpython|^python", re.IGNORECASE)
_ARCHS = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
_GLIBC_LIBS = ("libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1")
_CHUNK = 1 << 20

RUN_SH = """#!/bin/sh
# Runs the bundle of this package with edgemoe-rt (no Python), e.g.
#   ./run.sh --task {task} --input x.npy --output y.npy [--json] [edgemoe-rt options]
# Needs on the board: {needs}.
# EDGEMOE_RT_PREFIX runs the binary under a wrapper, e.g. "qemu-aarch64 -L /usr/aarch64-linux-gnu".
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd) || exit 1
LD_LIBRARY_PATH="$here/lib${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"
export LD_LIBRARY_PATH
exec ${{EDGEMOE_RT_PREFIX}} "$here/bin/edgemoe-rt" "$here/bundle" "$@"
"""


def _arch(name: str) -> str:
    return _ARCHS.get((name or "").lower(), name or "unknown")


def package_bundle(bundle: str | Path, device: str, out: str | Path, progress: Progress = lambda _msg: None) -> dict:
    """Write a package folder running ``bundle`` on ``device`` with edgemoe-rt.

    Args:
        bundle: A bundle compiled with ``--target tvm`` for a CPU of ``device``'s architecture.
        device: Device profile name (or profile file) of the board.
        out: Package folder to create (or replace, if it is already a package).
        progress: Called with a short message per step.

    Returns:
        The package summary (also written to ``package.json``): parts with sizes and sha256s,
        ``sizes`` per part, and ``assumed``: what the board must provide.

    Raises:
        BundleError: Not a bundle, not a TVM bundle, or a bundle with CUDA libraries.
        IntegrityError: A bundle file does not match its manifest entry.
        TargetError: The device's CPU is not the bundle's, or edgemoe-rt cannot be built for it here.
        DependencyError: edgemoe-rt is missing and cannot be built (tools or the source checkout missing).
        OutputPathError: ``out`` exists and is not a package.
    """
    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    dev = get_device(device)
    arch = _arch(dev.cpu_arch)
    notes = check_bundle(manifest, bundle, dev.name, arch, dev.cpu)
    check_output_path(out, PACKAGE)
    binary = ensure_runtime(arch, progress)
    libs, system, infos = runtime_libraries(binary, arch)

    staging = open_staging(out, PACKAGE)
    with discard_on_failure(out, lambda: staging, PACKAGE):
        progress(f"copy {bundle} (checking every file against its manifest sha256)")
        files, bundle_bytes, unlisted = copy_bundle(bundle, staging / "bundle", manifest)
        progress(f"add edgemoe-rt ({binary}) and {', '.join(p.name for p in libs)}")
        (staging / "bin").mkdir()
        rt = staging / "bin" / "edgemoe-rt"
        shutil.copyfile(binary, rt)
        rewritten = set_runpath(rt, RUNPATH)
        rt.chmod(0o755)
        (staging / "lib").mkdir()
        for lib in libs:
            shutil.copyfile(lib, staging / "lib" / lib.name)
        assumed = _assumed(system, infos)
        task = next(iter(manifest["tasks"]))
        (staging / "run.sh").write_text(RUN_SH.format(task=task, needs=assumed["summary"]))
        (staging / "run.sh").chmod(0o755)
        check_package(staging, arch)
        summary = {
            "format": FORMAT_TAG,
            "device": dev.name,
            "cpu_arch": arch,
            "bundle": {
                "dir": "bundle",
                "source": str(bundle),
                "model": manifest["model"]["name"],
                "device": manifest["device"]["name"],
                "tasks": list(manifest["tasks"]),
                "files": files,
                "bytes": bundle_bytes,
                "sha256_checked": True,
                "unlisted_skipped": unlisted,
            },
            "binary": {**_record(staging, rt), "runpath": RUNPATH if rewritten else "unchanged (build paths)"},
            "libraries": [_record(staging, staging / "lib" / lib.name) for lib in libs],
            "scripts": [_record(staging, staging / "run.sh")],
            "assumed": assumed,
            "compiler_free": True,
            "run": f"./run.sh --task {task} --input x.npy --output y.npy",
            "warnings": notes,
        }
        parts = {
            "bundle": bundle_bytes,
            "binary": summary["binary"]["bytes"],
            "libraries": sum(r["bytes"] for r in summary["libraries"]),
            "scripts": sum(r["bytes"] for r in summary["scripts"]),
        }
        summary["sizes"] = {**parts, "total": sum(parts.values())}
        (staging / PACKAGE_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        install(staging, out, PACKAGE)
    progress(f"package written to {out}")
    return {"package": str(out), **summary}


def check_bundle(manifest: dict, bundle: Path, device: str, arch: str, cpu: str) -> list[str]:
    """Refuse bundles edgemoe-rt cannot run on ``device``; warn if the bundle was built for other cores.

    Returns:
        The warnings issued (also raised as :class:`EdgeMoEWarning`).

    Raises:
        BundleError: Not a TVM bundle, or its libraries are not CPU code (CUDA).
        TargetError: The bundle's CPU architecture is not ``arch``.
    """
    target = manifest["target"] if isinstance(manifest["target"], dict) else {"name": manifest["target"]}
    if target.get("name") != "tvm":
        raise BundleError(
            f"{bundle} is a --target {target.get('name')} bundle: edgemoe-rt runs TVM bundles only "
            f"(edgemoe compile MODEL --target tvm --device {device})"
        )
    tvm_target = target.get("tvm_target") or {}
    if tvm_target.get("kind") != "llvm":
        raise BundleError(
            f"{bundle} holds {tvm_target.get('kind')} libraries (device {manifest['device']['name']}): edgemoe-rt "
            "runs CPU libraries only; compile with a device profile without cuda_arch for the board's CPU"
        )
    built = manifest["device"]
    bundle_arch = _arch(str(tvm_target.get("mtriple", "")).split("-")[0] or built.get("cpu_arch", ""))
    if bundle_arch != arch:
        raise TargetError(
            f"{bundle} is built for {built['name']} ({bundle_arch}); {device} has an {arch} CPU: "
            f"compile it with --device {device} --target tvm"
        )
    notes = []
    if built["name"] != device and built.get("cpu") != cpu:
        notes.append(
            f"{bundle} is built for {built['name']} ({built.get('cpu')}, LLVM CPU {tvm_target.get('mcpu')}); "
            f"{device} has {cpu}: its code may use instructions those cores lack"
        )
    for note in notes:
        warnings.warn(note, EdgeMoEWarning, stacklevel=2)
    return notes


def _build_for(arch: str) -> str:
    """The make target of edgemoe-rt for ``arch`` on this machine."""
    here = _arch(platform.machine())
    if arch == here:
        return "native"
    if arch == "aarch64" and here == "x86_64":
        return "native-aarch64"
    raise TargetError(f"edgemoe-rt cannot be built for {arch} on this {here} machine (x86_64 builds host and aarch64)")


def _stale(binary: Path) -> bool:
    if not binary.is_file():
        return True
    if not NATIVE_SOURCES.is_dir():
        return False  # an installed edgemoe: the build is what there is
    sources = [*(NATIVE_SOURCES / "src").iterdir(), *NATIVE_SOURCES.glob("*.cmake"), NATIVE_SOURCES / "CMakeLists.txt"]
    built = binary.stat().st_mtime
    return any(p.stat().st_mtime > built for p in sources if p.is_file())


def ensure_runtime(arch: str, progress: Progress = lambda _msg: None) -> Path:
    """edgemoe-rt built for ``arch``: built through the Makefile when missing or older than its sources.

    Raises:
        TargetError: No build of edgemoe-rt for ``arch`` on this machine.
        DependencyError: The build is missing and cannot be made here (names what is missing).
    """
    target = _build_for(arch)
    binary = BUILDS[target] / "edgemoe-rt"
    if not _stale(binary):
        return binary
    missing = [] if (ROOT / "Makefile").is_file() and NATIVE_SOURCES.is_dir() else [f"{ROOT}/Makefile"]
    missing += [tool for tool in ("make",) if shutil.which(tool) is None]
    if missing:
        raise DependencyError(
            f"edgemoe-rt for {arch} is not built ({binary}) and cannot be built here: {', '.join(missing)} not found "
            f"(it is built from a source checkout of edgemoe with `make {target}`)"
        )
    tools = {"cmake": "cmake", "c++": "g++"} if target == "native" else {"cmake": "cmake"}
    if target == "native-aarch64":
        tools["aarch64-linux-gnu-g++"] = "g++-aarch64-linux-gnu"
    absent = {t: pkg for t, pkg in tools.items() if shutil.which(t) is None}
    if absent and os.geteuid() != 0:
        raise DependencyError(
            f"building edgemoe-rt for {arch} needs {', '.join(absent)}: apt-get install {' '.join(absent.values())} "
            f"(or run `make {target}` as root: it installs them)"
        )
    progress(f"build edgemoe-rt for {arch}: make {target}")
    proc = subprocess.run(["make", "-C", str(ROOT), target], capture_output=True, text=True)
    if proc.returncode != 0 or not binary.is_file():
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise DependencyError(f"`make {target}` failed (exit {proc.returncode}) building edgemoe-rt for {arch}: {tail}")
    return binary


def _tvm_lib_dirs(binary: Path) -> list[Path]:
    """The TVM site folder edgemoe-rt was built against (CMake's TVM_SITE): its library folders."""
    cache = binary.parent / "CMakeCache.txt"
    site = None
    if cache.is_file():
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("TVM_SITE:"):
                site = Path(line.split("=", 1)[1])
    if site is None:
        raise DependencyError(f"no TVM_SITE in {cache}: rebuild edgemoe-rt (make native / make native-aarch64)")
    return [site / "tvm" / "lib", site / "tvm_ffi" / "lib"]


def runtime_libraries(binary: Path, arch: str) -> tuple[list[Path], list[str], list]:
    """The libraries to ship with ``binary``: its DT_NEEDED closure inside the TVM site folder.

    Returns:
        (the libraries' paths, the names of the board's own libraries it needs, the ELF infos of the
        binary and every shipped library).

    Raises:
        TargetError: A file is not code for ``arch``, or a TVM runtime library is not linked.
        EdgeMoEError: The closure reaches a compiler library (never expected).
    """
    dirs = _tvm_lib_dirs(binary)
    infos = [read_elf(binary)]
    shipped: dict[str, Path] = {}
    system: set[str] = set()
    queue = [(binary, infos[0])]
    while queue:
        path, info = queue.pop()
        if info.machine != MACHINES[arch]:
            raise TargetError(f"{path} is {machine_name(info.machine)} code, not {arch}: rebuild it")
        for name in info.needed:
            if name in shipped or name in system:
                continue
            found = next((d / name for d in dirs if (d / name).is_file()), None)
            if found is None:
                system.add(name)
                continue
            if _COMPILER_PARTS.search(name):
                raise EdgeMoEError(f"edgemoe-rt's libraries reach {found}: a compiler library cannot be packaged")
            shipped[name] = found
            lib = read_elf(found)
            infos.append(lib)
            queue.append((found, lib))
    absent = [n for n in RUNTIME_LIBS if n not in shipped]
    if absent:
        raise TargetError(f"{binary} does not load {', '.join(absent)} from {dirs[0].parent.parent}: rebuild it")
    return [shipped[n] for n in sorted(shipped)], sorted(system), infos


def _assumed(system: list[str], infos: list) -> dict:
    """What the board must have: its own libraries and the newest symbol version needed of each."""
    versions = newest_versions(infos, set(system))
    glibc_libs = [*_GLIBC_LIBS, *(n for n in system if n.startswith("ld-linux"))]
    glibc = max(
        (v for lib in glibc_libs for v in versions.get(lib, [])),
        key=lambda v: tuple(int(x) for x in re.findall(r"\d+", v)),
        default="",
    )
    cxx = [v for v in versions.get("libstdc++.so.6", []) if v.startswith("GLIBCXX_")]
    parts = [f"glibc >= {glibc.removeprefix('GLIBC_')}"] if glibc else []
    if cxx:
        parts.append(f"libstdc++.so.6 with {cxx[0]}")
    others = [n for n in system if n not in _GLIBC_LIBS and not n.startswith("ld-linux") and n != "libstdc++.so.6"]
    parts += others
    return {"libraries": system, "versions": versions, "glibc": glibc, "summary": ", ".join(parts)}


def _listed(manifest: dict) -> list[dict]:
    """Every file record (``file``, ``bytes``, ``sha256``) anywhere in a manifest, once per file."""
    found: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("file"), str) and "sha256" in node:
                found.setdefault(node["file"], node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return list(found.values())


def copy_bundle(src: Path, dst: Path, manifest: dict) -> tuple[int, int, list[str]]:
    """Copy a bundle's manifest and listed files, hashing the very bytes written.

    Returns:
        (files copied including the manifest, their bytes, files in ``src`` the manifest does not list: not copied).

    Raises:
        BundleError: A manifest entry is garbled or points outside the bundle.
        IntegrityError: A listed file is missing or its size or sha256 differs from the manifest's.
    """
    root = src.resolve()
    dst.mkdir(parents=True)
    total = 0
    records = _listed(manifest)
    for record in records:
        try:
            rel, size, digest = record["file"], int(record["bytes"]), str(record["sha256"])
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"garbled manifest entry {record!r}") from None
        path = (root / rel).resolve()
        if root not in path.parents:
            raise BundleError(f"manifest entry points outside the bundle: {rel}")
        if not path.is_file():
            raise IntegrityError(f"missing bundle file {rel}")
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        h, n = hashlib.sha256(), 0
        with open(path, "rb") as f, open(target, "wb") as g:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
                g.write(chunk)
                n += len(chunk)
        if n != size:
            raise IntegrityError(f"bundle file {rel} has {n} bytes, manifest says {size} (truncated or replaced)")
        if h.hexdigest() != digest:
            raise IntegrityError(f"bundle file {rel} fails its sha256 check (corrupted or replaced)")
        target.chmod(path.stat().st_mode & 0o755)
        total += n
    shutil.copyfile(root / MANIFEST, dst / MANIFEST)
    total += (dst / MANIFEST).stat().st_size
    listed = {r["file"] for r in records} | {MANIFEST}
    unlisted = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return len(records) + 1, total, [p for p in unlisted if p not in listed]


def check_package(folder: Path, arch: str) -> None:
    """Assert a staged package holds nothing of the compiler and only ``arch`` code outside the bundle.

    Raises:
        EdgeMoEError: A compiler part (Python file, libtvm_compiler, torch) is in the package.
        TargetError: The binary or a library is not ``arch`` code.
    """
    for path in folder.rglob("*"):
        if path.is_file() and _COMPILER_PARTS.search(path.name):
            raise EdgeMoEError(f"the package would hold {path.relative_to(folder)}: nothing of the compiler may go in")
    for path in [folder / "bin" / "edgemoe-rt", *sorted((folder / "lib").iterdir())]:
        machine = read_elf(path).machine
        if machine != MACHINES[arch]:
            raise TargetError(f"{path.relative_to(folder)} is {machine_name(machine)} code, not {arch}")


def _record(root: Path, path: Path) -> dict:
    data = path.read_bytes()
    return {"file": path.relative_to(root).as_posix(), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def is_package(path: Path) -> bool:
    """Whether ``path`` is a folder written by :func:`package_bundle`."""
    try:
        return json.loads((Path(path) / PACKAGE_FILE).read_text()).get("format") == FORMAT_TAG
    except (OSError, ValueError, AttributeError):
        return False


PACKAGE = OutputKind("package", is_package)
