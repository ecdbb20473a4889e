"""CUDA code from the tvm target: Jetson profiles get aarch64 libraries that carry kernels for their SM.

No GPU is needed (nor used): the libraries are parsed, not run. Numerics of CUDA bundles are checked
on a GPU by benchmarks/bench_tvm_cuda.py (results in benchmarks/results/tvm_cuda_h100.json).
"""

import shutil
import subprocess
import sys
import textwrap

import pytest
from helpers import read_manifest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.devices import get_device
from edgemoe.errors import BundleError, TargetError
from edgemoe.runtime import Session
from edgemoe.targets.tvm import cuda
from edgemoe.targets.tvm.target import AARCH64_CXX, AARCH64_TRIPLE

EM_AARCH64 = 183

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


def _cuda_build_skip(arch: str) -> str | None:
    nvcc = cuda.find_nvcc()
    if nvcc is None:
        return "no CUDA compiler (nvcc on PATH, CUDA_PATH or /usr/local/cuda)"
    release, archs = cuda.nvcc_info(nvcc)
    if arch not in archs:
        return f"nvcc {release} cannot build {arch}"
    if cuda._driver_loadable() is None and cuda._c_compiler() is None:
        return "neither libcuda.so.1 nor a C compiler for its stub"
    return None


def _aarch64_skip() -> str | None:
    if shutil.which(AARCH64_CXX) is None and cuda.cross_linker(AARCH64_TRIPLE, AARCH64_CXX) is None:
        return f"no aarch64 linker ({AARCH64_CXX} or the ziglang wheel)"
    return None


needs_sm87 = pytest.mark.skipif(
    bool(_cuda_build_skip("sm_87") or _aarch64_skip()), reason=str(_cuda_build_skip("sm_87") or _aarch64_skip())
)


@pytest.fixture(scope="module")
def orin_bundle(bundle_factory):
    return bundle_factory("m3vit-micro", target="tvm", device="jetson-orin-nano-8gb", tasks=("depth",))


@needs_sm87
def test_orin_libraries_are_aarch64_with_sm87_kernels(orin_bundle):
    m = read_manifest(orin_bundle)
    assert m["target"]["tvm_target"] == {
        "kind": "cuda",
        "arch": "sm_87",
        "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"},
    }
    # The dispatch graphs keep a run's activations on the GPU (targets/tvm/dispatch.py).
    assert {"dispatch_gather", "dispatch_combine", "dispatch_add"} <= set(m["graphs"])
    for name, g in m["graphs"].items():
        data = (orin_bundle / g["file"]).read_bytes()
        assert data[:5] == b"\x7fELF\x02" and int.from_bytes(data[18:20], "little") == EM_AARCH64, name
        found = cuda.embedded_cuda_archs(data)
        # nvcc's fatbin wraps one sm_87 cubin per library (all kernels of the graph).
        assert found["fatbin"], f"{name}: no fatbin"
        assert found["cubin"] and set(found["cubin"]) == {"sm_87"}, f"{name}: {found}"
        assert b"__global__" not in data, f"{name} still carries CUDA source"
        cuobjdump = shutil.which("cuobjdump")
        if cuobjdump:  # independent reading of the same fact where the toolkit has it
            out = subprocess.run(
                [cuobjdump, "--list-elf", str(orin_bundle / g["file"])], capture_output=True, text=True
            )
            assert "sm_87" in out.stdout, out.stdout + out.stderr


@needs_sm87
def test_orin_manifest_says_numerics_unchecked_and_names_the_tag(orin_bundle):
    info = read_manifest(orin_bundle)["target"]["cuda"]
    assert info["verified"] is False and "not run at compile time" in info["note"]
    assert "GEMV" in info["schedules"]
    # TVM's tag names Xavier's core for the Orin Nano's host; the profile's core is what we build for.
    assert info["tvm_tag"] == {
        "tag": "nvidia/jetson-orin-nano",
        "differs": {"host_mcpu": {"tag": "carmel", "ours": "cortex-a78ae"}},
    }


@needs_sm87
def test_orin_bundle_is_refused_clearly_here(orin_bundle):
    """aarch64 + CUDA code on this machine: a clear error, before any load is tried."""
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this machine is aarch64")
    with pytest.raises(BundleError, match="is aarch64 code and this machine is"):
        Session(orin_bundle, "depth")


def test_xavier_builds_sm72_or_refuses_clearly(tmp_path):
    """CUDA 13 dropped sm_72: either the toolkit builds it, or the compile is refused before any work."""
    reason = _cuda_build_skip("sm_72")
    cfg = CompileConfig(model="m3vit-micro", target="tvm", device="jetson-xavier-nx", tasks=("depth",))
    if reason is not None and cuda.find_nvcc() is not None and "cannot build" in reason:
        with pytest.raises(TargetError, match=r"cannot build sm_72 for jetson-xavier-nx.*--target onnx"):
            compile_model(cfg, tmp_path / "b")
        assert not (tmp_path / "b").exists()
        return
    if reason or _aarch64_skip():
        pytest.skip(reason or _aarch64_skip())
    compile_model(cfg, tmp_path / "b")
    for g in read_manifest(tmp_path / "b")["graphs"].values():
        assert set(cuda.embedded_cuda_archs((tmp_path / "b" / g["file"]).read_bytes())["cubin"]) == {"sm_72"}


def test_unknown_sm_is_refused_before_building(tmp_path):
    profile = tmp_path / "gpu.toml"
    profile.write_text('[odd-gpu]\ncpu_arch = "x86_64"\ncuda_arch = "sm_10"\nmemory_bytes = 1073741824\n')
    with pytest.raises(TargetError, match="sm_10"):
        compile_model(CompileConfig(model="m3vit-micro", target="tvm", device=str(profile)), tmp_path / "b")
    assert get_device(str(profile)).cuda_arch == "sm_10" and not (tmp_path / "b").exists()


@pytest.mark.skipif(bool(_cuda_build_skip("sm_87")), reason=str(_cuda_build_skip("sm_87")))
def test_source_only_fallback_of_tvm_is_caught(tmp_path):
    """Without a loadable CUDA runtime TVM emits CUDA source and no kernels, silently; the target's check refuses it.

    A fresh process compiles one kernel the plain TVM way (no driver stub loaded) and the check
    reads the library it wrote; with the stub (the target's way) the same kernel carries a cubin.
    """
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # keep the child light: tvm_ffi imports torch when present
        import tvm
        from tvm import relax
        from tvm.script import relax as R
        from edgemoe.targets.tvm import cuda

        @tvm.script.ir_module
        class Mod:
            @R.function
            def main(x: R.Tensor(("n", 32), "float32")):
                with R.dataflow():
                    y = R.nn.softmax(R.exp(x))
                    R.output(y)
                return y

        target = {"kind": "cuda", "arch": "sm_87", "host": {"kind": "llvm"}}
        if sys.argv[1] == "plain":
            tgt = tvm.target.Target(target)
            with tgt:
                exe = tvm.compile(Mod, target=tgt)
        else:
            exe = cuda.compile_cuda(Mod, target)
        exe.export_library(sys.argv[2])
        """
    )
    script = tmp_path / "build_one.py"  # TVMScript reads its source: a file, not python -c
    script.write_text(code)
    libs = {}
    for way in ("plain", "target"):
        libs[way] = tmp_path / f"{way}.so"
        if way == "plain" and cuda._driver_loadable() is not None:
            pytest.skip("a CUDA driver is installed: TVM's plain build packs kernels here")
        out = subprocess.run([sys.executable, str(script), way, str(libs[way])], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
    assert cuda.embedded_cuda_archs(libs["plain"].read_bytes())["cubin"] == []
    with pytest.raises(TargetError, match="holds no sm_87 device code"):
        cuda.check_device_code(libs["plain"], "sm_87", "plain")
    cuda.check_device_code(libs["target"], "sm_87", "target")
    assert cuda.embedded_cuda_archs(libs["target"].read_bytes())["cubin"] == ["sm_87"]


def test_h100_profile_builds_for_x86_host_and_sm90():
    """The GPU validation profile: portable x86 host code, Hopper kernels."""
    from edgemoe.targets.tvm.target import tvm_target

    device = get_device("benchmarks/devices/h100.toml")
    target = tvm_target(device)
    assert target["kind"] == "cuda" and target["arch"] == "sm_90"
    assert target["host"]["mcpu"] == "x86-64-v3"
