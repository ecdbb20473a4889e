"""`edgemoe package`: a folder to copy to a board (bundle + edgemoe-rt + TVM runtime + run.sh), no compiler in it.

The host package runs through its run.sh (moved elsewhere first, in a bare environment) and must
give the Python runtime's output; an aarch64 package (Jetson Orin Nano, CPU partitions) holds only
aarch64 code and runs under qemu-user; refusals carry the documented exit codes. With
EDGEMOE_BOARD=user@host the hil test copies a package to that board with scp and runs it over ssh.
"""

import json
import os
import shlex
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

from edgemoe.bundle import sample_input
from edgemoe.devices import get_device
from edgemoe.errors import BundleError, IntegrityError, OutputPathError, TargetError
from edgemoe.runtime import Session

ROOT = Path(__file__).resolve().parents[1]
EM_X86_64, EM_AARCH64 = 62, 183
QEMU = "qemu-aarch64 -L /usr/aarch64-linux-gnu"
TVM_LIBS = {"libtvm_runtime.so", "libtvm_runtime_extra.so", "libtvm_ffi.so"}
BARE_ENV = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


def _needs_host_build():
    if shutil.which("cmake") is None and not (ROOT / "build" / "native" / "edgemoe-rt").is_file():
        pytest.skip("cmake is not installed: `make native` cannot build edgemoe-rt")


def _needs_cross_build():
    tools = ("cmake", "aarch64-linux-gnu-g++")
    if any(shutil.which(t) is None for t in tools):
        pytest.skip(f"needs {', '.join(tools)} (make native-aarch64 installs them: cmake, g++-aarch64-linux-gnu)")


def _package(run_cli, bundle: Path, device: str, out: Path) -> dict:
    res = run_cli("package", bundle, "--device", device, "-o", out, "--json")
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def _machine(path: Path) -> int:
    data = path.read_bytes()[:20]
    assert data[:4] == b"\x7fELF", path
    return int.from_bytes(data[18:20], "little")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _input(manifest: dict, model: str, path: Path) -> np.ndarray:
    if model.startswith("m3vit"):
        x = sample_input(manifest["input"], batch=2, seed=3)
    else:
        x = np.random.default_rng(3).integers(0, manifest["input"]["high"], size=(2, 16), dtype=np.int64)
    np.save(path, x)
    return x


def _loaded_tvm_libraries(log_prefix: Path) -> list[str]:
    """Paths of the TVM libraries the dynamic loader initialised (LD_DEBUG=libs logs)."""
    paths = []
    for log in log_prefix.parent.glob(log_prefix.name + ".*"):
        for line in log.read_text(errors="replace").splitlines():
            if "calling init:" in line and "libtvm" in line:
                paths.append(line.split("calling init:", 1)[1].strip())
    return paths


def test_host_package_runs_like_the_python_runtime(bundle_factory, run_cli, tmp_path):
    _needs_host_build()
    bundle = bundle_factory("m3vit-micro", target="tvm")
    summary = _package(run_cli, bundle, "host", tmp_path / "pkg")
    # Relocatable: the folder is moved before it runs, in an environment with no Python and no venv.
    pkg = tmp_path / "elsewhere" / "pkg"
    pkg.parent.mkdir()
    (tmp_path / "pkg").rename(pkg)
    assert {p.name for p in (pkg / "lib").iterdir()} == TVM_LIBS
    assert (pkg / "run.sh").stat().st_mode & stat.S_IXUSR and (pkg / "bin" / "edgemoe-rt").stat().st_mode & stat.S_IXUSR
    assert (pkg / "bundle" / "manifest.json").read_bytes() == (bundle / "manifest.json").read_bytes()
    assert all(_machine(p) == EM_X86_64 for p in [pkg / "bin" / "edgemoe-rt", *(pkg / "lib").iterdir()])
    m = json.loads((bundle / "manifest.json").read_text())
    for task in m["tasks"]:
        x = _input(m, "m3vit-micro", tmp_path / "x.npy")
        log = tmp_path / f"ld-{task}"
        proc = subprocess.run(
            [pkg / "run.sh", "--task", task, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy", "--json"],
            capture_output=True,
            text=True,
            env={**BARE_ENV, "LD_DEBUG": "libs", "LD_DEBUG_OUTPUT": str(log)},
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["task"] == task
        want = Session(bundle, task).run(x)
        y = np.load(tmp_path / "y.npy")
        assert y.shape == want.shape and y.dtype == want.dtype
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)
        # The TVM runtime came from the package, not from the venv it was built against.
        loaded = _loaded_tvm_libraries(log)
        assert {Path(p).name for p in loaded} == TVM_LIBS and all(Path(p).parent == pkg / "lib" for p in loaded), loaded
    # Sizes per part are the bytes on disk; package.json is the only file outside the parts.
    sizes = summary["sizes"]
    on_disk = {
        "bundle": sum(p.stat().st_size for p in _files(pkg / "bundle")),
        "binary": (pkg / "bin" / "edgemoe-rt").stat().st_size,
        "libraries": sum(p.stat().st_size for p in _files(pkg / "lib")),
        "scripts": (pkg / "run.sh").stat().st_size,
    }
    assert {k: sizes[k] for k in on_disk} == on_disk and sizes["total"] == sum(on_disk.values())
    assert sum(p.stat().st_size for p in _files(pkg)) == sizes["total"] + (pkg / "package.json").stat().st_size
    assert json.loads((pkg / "package.json").read_text())["sizes"] == sizes
    assert summary["bundle"]["files"] == len(_files(pkg / "bundle")) and summary["compiler_free"] is True
    assert summary["binary"]["runpath"] == "$ORIGIN/../lib"
    assert summary["assumed"]["glibc"].startswith("GLIBC_2.") and "libc.so.6" in summary["assumed"]["libraries"]


def test_text_report_has_the_size_of_each_part(bundle_factory, run_cli, tmp_path):
    _needs_host_build()
    bundle = bundle_factory("m3vit-micro", target="tvm")
    res = run_cli("package", bundle, "--device", "host", "-o", tmp_path / "p", "-q")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    for part in ("bundle", "binary", "libraries", "scripts"):
        assert any(line.split()[:1] == [part] and ("KiB" in line or "MiB" in line or " B " in line) for line in lines)
    assert any(line.startswith("the board must have: glibc >= 2.") for line in lines)


def test_jetson_package_is_aarch64_and_compiler_free(bundle_factory, jetson_cpu_profile, run_cli, tmp_path):
    _needs_cross_build()
    bundle = bundle_factory("m3vit-micro", target="tvm", device=jetson_cpu_profile)
    summary = _package(run_cli, bundle, "jetson-orin-nano-8gb", tmp_path / "pkg")
    pkg = tmp_path / "pkg"
    assert summary["device"] == "jetson-orin-nano-8gb" and summary["cpu_arch"] == "aarch64"
    names = [p.relative_to(pkg).as_posix() for p in _files(pkg)]
    assert not [n for n in names if n.endswith((".py", ".pyc", ".pth")) or "python" in n.lower()], names
    assert not [n for n in names if "libtvm_compiler" in n or "torch" in n.lower()], names
    assert {p.name for p in (pkg / "lib").iterdir()} == TVM_LIBS
    elves = [pkg / "bin" / "edgemoe-rt", *(pkg / "lib").iterdir(), *(pkg / "bundle" / "graphs").iterdir()]
    assert {p.name: _machine(p) for p in elves} == {p.name: EM_AARCH64 for p in elves}
    # Nothing in it asks for the compiler either.
    for path in elves[: 1 + len(TVM_LIBS)]:
        readelf = shutil.which("readelf")
        if readelf:
            dyn = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
            assert "libtvm_compiler" not in dyn and "python" not in dyn.lower(), dyn
    if shutil.which("qemu-aarch64") is None:
        pytest.skip("qemu-aarch64 is not installed (make native-aarch64 installs qemu-user): not run")
    host = bundle_factory("m3vit-micro", target="tvm")
    m = json.loads((bundle / "manifest.json").read_text())
    x = _input(m, "m3vit-micro", tmp_path / "x.npy")
    proc = subprocess.run(
        [pkg / "run.sh", "--task", "semseg", "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy"],
        capture_output=True,
        text=True,
        env={**BARE_ENV, "EDGEMOE_RT_PREFIX": QEMU},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), Session(host, "semseg").run(x), rtol=0, atol=1e-4)


def test_cuda_bundle_is_refused_and_why(bundle_factory, run_cli, tmp_path):
    """--device jetson-orin-nano-8gb builds aarch64 host code with sm_87 kernels: edgemoe-rt cannot load those."""
    from edgemoe.targets.tvm import cuda

    nvcc = cuda.find_nvcc()
    if nvcc is None or "sm_87" not in cuda.nvcc_info(nvcc)[1] or shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("building sm_87 + aarch64 libraries needs nvcc with sm_87 and aarch64-linux-gnu-g++")
    orin = bundle_factory("m3vit-micro", target="tvm", device="jetson-orin-nano-8gb", tasks=("depth",))
    m = json.loads((orin / "manifest.json").read_text())
    assert m["target"]["tvm_target"]["kind"] == "cuda"
    assert m["target"]["tvm_target"]["host"]["mtriple"].startswith("aarch64")
    data = (orin / m["graphs"]["segment_0"]["file"]).read_bytes()
    assert _machine(orin / m["graphs"]["segment_0"]["file"]) == EM_AARCH64 and cuda.embedded_cuda_archs(data)["cubin"]
    res = run_cli("package", orin, "--device", "jetson-orin-nano-8gb", "-o", tmp_path / "pkg")
    assert res.exit_code == BundleError.exit_code, res.stderr
    assert res.stderr.startswith("error: ") and "cuda libraries" in res.stderr and len(res.stderr.splitlines()) == 1
    assert not (tmp_path / "pkg").exists()
    # The aarch64 runtime itself, under qemu, cannot load such a library (hence the CPU-partition profile).
    binary = ROOT / "build" / "native-aarch64" / "edgemoe-rt"
    if binary.is_file() and shutil.which("qemu-aarch64"):
        _input(m, "m3vit-micro", tmp_path / "x.npy")
        proc = subprocess.run(
            [*shlex.split(QEMU), binary, orin, "--task", "depth", "--input", tmp_path / "x.npy"],
            capture_output=True,
            text=True,
            env=BARE_ENV,
            timeout=600,
        )
        assert proc.returncode == BundleError.exit_code and "cuda" in proc.stderr, proc.stderr


def test_refusals_have_their_exit_codes(bundle_factory, jetson_cpu_profile, run_cli, tmp_path):
    host = bundle_factory("m3vit-micro", target="tvm")

    def refused(code: int, bundle, device: str, text: str, out: Path | None = None):
        out = out or tmp_path / "pkg"
        res = run_cli("package", bundle, "--device", device, "-o", out, "-q")
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == code, res.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], res.stderr
        leftovers = [p.name for p in out.parent.iterdir() if ".staging-" in p.name]
        assert not leftovers, leftovers

    # Wrong CPU architecture either way, before anything is built or copied.
    refused(TargetError.exit_code, host, "raspberry-pi-5", "has an aarch64 CPU")
    assert not (tmp_path / "pkg").exists()
    refused(TargetError.exit_code, host, "no-such-board", "unknown device")
    # Not a TVM bundle.
    refused(BundleError.exit_code, bundle_factory("m3vit-micro"), "host", "--target onnx bundle")
    refused(BundleError.exit_code, tmp_path / "missing", "host", "bundle not found")
    if shutil.which("aarch64-linux-gnu-g++"):
        arm = bundle_factory("m3vit-micro", target="tvm", device=jetson_cpu_profile)
        refused(TargetError.exit_code, arm, "host", "has an x86_64 CPU")
    # A damaged file is caught on the copy and leaves no package behind.
    _needs_host_build()
    damaged = tmp_path / "damaged"
    shutil.copytree(host, damaged)
    blob = damaged / "experts" / "L1_E3.bin"
    data = bytearray(blob.read_bytes())
    data[7] ^= 0x10
    blob.write_bytes(bytes(data))
    refused(IntegrityError.exit_code, damaged, "host", "experts/L1_E3.bin fails its sha256 check")
    assert not (tmp_path / "pkg").exists()
    # An output path that is not a package is never overwritten; a package is replaced whole.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    refused(OutputPathError.exit_code, host, "host", "not an edgemoe package", out=tmp_path / "taken")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    first = _package(run_cli, host, "host", tmp_path / "again")
    (tmp_path / "again" / "stale.txt").write_text("old")
    second = _package(run_cli, host, "host", tmp_path / "again")
    assert not (tmp_path / "again" / "stale.txt").exists() and second["sizes"] == first["sizes"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- a real board over ssh (EDGEMOE_BOARD=user@host) -------------------------------------------------

BOARD = os.environ.get("EDGEMOE_BOARD", "").strip()
BOARD_DEVICE = os.environ.get("EDGEMOE_BOARD_DEVICE", "raspberry-pi-5").strip()
SSH_OPTS = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]


def board_commands(board: str, pkg: Path, x: Path, y: Path, task: str, remote: str) -> list[list[str]]:
    """The ssh / scp command lines that run a package on ``board`` and fetch its output into ``y``.

    ``remote`` is a fresh folder name under the board user's home; it is removed at the end.
    """
    where, run = shlex.quote(remote), f"./{shlex.quote(pkg.name)}/run.sh"
    return [
        ["ssh", *SSH_OPTS, board, f"rm -rf {where} && mkdir -p {where}"],
        ["scp", *SSH_OPTS, "-r", str(pkg), f"{board}:{remote}/"],
        ["scp", *SSH_OPTS, str(x), f"{board}:{remote}/x.npy"],
        ["ssh", *SSH_OPTS, board, f"cd {where} && {run} --task {shlex.quote(task)} --input x.npy --output y.npy"],
        ["scp", *SSH_OPTS, f"{board}:{remote}/y.npy", str(y)],
        ["ssh", *SSH_OPTS, board, f"rm -rf {where}"],
    ]


def _board_run(board: str, pkg: Path, x: Path, y: Path, task: str, env: dict | None = None) -> None:
    remote = f"edgemoe-hil-{uuid.uuid4().hex[:8]}"
    for cmd in board_commands(board, pkg, x, y, task, remote):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        assert proc.returncode == 0, f"{shlex.join(cmd)}: exit {proc.returncode}\n{proc.stderr}"


def _board_profile(device: str, folder: Path) -> str:
    """``device``, or a file with its CPU only where it has a CUDA GPU (edgemoe-rt runs CPU libraries)."""
    dev = get_device(device)
    if not dev.cuda_arch:
        return device
    entry = {k: v for k, v in dev.to_json().items() if k not in ("name", "fpga")}
    entry.update(cuda_arch="", accelerator="none (CPU partitions only)")
    path = folder / f"{dev.name}-cpu.json"
    path.write_text(json.dumps({f"{dev.name}-cpu": entry}))
    return str(path)


@pytest.mark.hil
@pytest.mark.skipif(not BOARD, reason="set EDGEMOE_BOARD=user@host (and EDGEMOE_BOARD_DEVICE) to run on a board")
def test_package_runs_on_the_board_like_the_host(bundle_factory, run_cli, tmp_path):
    board_bundle = bundle_factory("m3vit-micro", target="tvm", device=_board_profile(BOARD_DEVICE, tmp_path))
    _package(run_cli, board_bundle, BOARD_DEVICE, tmp_path / "pkg")
    host = bundle_factory("m3vit-micro", target="tvm")
    m = json.loads((host / "manifest.json").read_text())
    for task in m["tasks"]:
        x = _input(m, "m3vit-micro", tmp_path / "x.npy")
        _board_run(BOARD, tmp_path / "pkg", tmp_path / "x.npy", tmp_path / f"y-{task}.npy", task)
        np.testing.assert_allclose(np.load(tmp_path / f"y-{task}.npy"), Session(host, task).run(x), rtol=0, atol=1e-4)


FAKE_SSH = """#!/bin/sh
# ssh stand-in: [-o OPT]... HOST COMMAND -> COMMAND in $FAKE_BOARD_HOME (as a login shell's home)
while [ "$1" = "-o" ]; do shift 2; done
echo "$1" >> "$FAKE_BOARD_HOME/.hosts"; shift
cd "$FAKE_BOARD_HOME" && exec sh -c "$*"
"""
FAKE_SCP = """#!/bin/sh
# scp stand-in: [-o OPT]... [-r] SRC DST, HOST:PATH relative to $FAKE_BOARD_HOME
r=""
while [ $# -gt 2 ]; do case "$1" in -o) shift 2;; -r) r=-r; shift;; *) exit 2;; esac; done
map() { case "$1" in *:*) echo "$FAKE_BOARD_HOME/${1#*:}";; *) echo "$1";; esac; }
exec cp $r "$(map "$1")" "$(map "$2")"
"""


def test_board_command_lines_through_stand_ins(bundle_factory, run_cli, tmp_path):
    """The hil test's ssh / scp sequence, with stand-ins that run it on this machine (a host package)."""
    _needs_host_build()
    bundle = bundle_factory("m3vit-micro", target="tvm")
    _package(run_cli, bundle, "host", tmp_path / "pkg")
    tools, home = tmp_path / "tools", tmp_path / "board-home"
    tools.mkdir()
    home.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    m = json.loads((bundle / "manifest.json").read_text())
    x = _input(m, "m3vit-micro", tmp_path / "x.npy")
    env = {**BARE_ENV, "PATH": f"{tools}:/usr/bin:/bin", "FAKE_BOARD_HOME": str(home)}
    _board_run("pi@board.local", tmp_path / "pkg", tmp_path / "x.npy", tmp_path / "y.npy", "depth", env=env)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), Session(bundle, "depth").run(x), rtol=0, atol=1e-5)
    assert set((home / ".hosts").read_text().split()) == {"pi@board.local"}
    assert [p.name for p in home.iterdir()] == [".hosts"]  # the remote folder is removed


def test_elf_reader_agrees_with_readelf(tmp_path):
    """targets/tvm/elf.py (what packaging trusts for DT_NEEDED, versions and RUNPATH) against binutils."""
    from edgemoe.targets.tvm.elf import read_elf, set_runpath

    readelf = shutil.which("readelf")
    builds = (ROOT / "build" / "native", ROOT / "build" / "native-aarch64")
    files = [b / "edgemoe-rt" for b in builds if (b / "edgemoe-rt").is_file()]
    if readelf is None or not files:
        pytest.skip("needs readelf and a build of edgemoe-rt")
    for path in files:
        info = read_elf(path)
        dyn = subprocess.run([readelf, "-d", path], capture_output=True, text=True, check=True).stdout
        needed = [line.split("[", 1)[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
        assert info.needed == needed
        ver = subprocess.run([readelf, "-V", path], capture_output=True, text=True, check=True).stdout
        for lib, names in info.versions.items():
            assert f"File: {lib}" in ver and all(f"Name: {n}" in ver for n in names), lib
        copy = tmp_path / path.parent.name
        shutil.copyfile(path, copy)
        assert set_runpath(copy, "$ORIGIN/../lib")
        dyn = subprocess.run([readelf, "-d", copy], capture_output=True, text=True, check=True).stdout
        assert "Library runpath: [$ORIGIN/../lib]" in dyn and read_elf(copy).needed == needed
        assert not set_runpath(copy, "/a/path/longer/than/the/one/it/has/now")  # never grows the string table
