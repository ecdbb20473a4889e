"""TVM target: every partition becomes one shared library of Relax VM code, run by the ``tvm`` executor.

Partitions enter Relax through ``torch.export`` (``relax.frontend.torch.from_exported_program``),
with each partition's dynamic axes as symbolic dimensions. That is the more robust of the two
importers TVM offers here: the ONNX importer fails on the shape arithmetic of the legacy ONNX
exports of the token models (``Expand`` of a computed shape in the gates, ``concat`` of shape
tensors in the trunk), while ``torch.export`` hands Relax clean symbolic shapes. Model weights are
baked into the library as constants, except in expert kernels, whose weights are function inputs:
one library per expert shape, and the runtime swaps weight blobs under it.

Each library is compiled with ``tvm.compile`` for the device's CPU (``llvm``; aarch64 is
cross-compiled and linked with ``aarch64-linux-gnu-g++``), written with ``export_library`` and,
where it can run here, loaded back and compared with the torch module on the example inputs.
"""

from __future__ import annotations

import inspect
import platform
import re
import shutil
import warnings
from pathlib import Path

from ...config import CompileConfig
from ...devices import DeviceProfile, get_device
from ...errors import TargetError
from ...frontends import GraphPartition
from .. import Target, check_against_torch

# Compiled graphs must reproduce the torch partition to within atol + rtol * |torch| (fp32).
AARCH64_CXX = "aarch64-linux-gnu-g++"
AARCH64_TRIPLE = "aarch64-linux-gnu"
# Core names as device profiles write them ("4x Cortex-A76 @ 2.4 GHz", "6x Carmel (ARMv8.2)").
_CORE_NAMES = r"cortex-[ax]\d+[a-z]*|carmel|neoverse-[nv]\d+"
_HOST_ARCHS = {"x86_64": "x86_64", "AMD64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def _arch(name: str) -> str:
    return _HOST_ARCHS.get(name, name)


def _llvm_cpu(device: DeviceProfile) -> str:
    """The LLVM CPU name of a profile's cores ("6x Cortex-A78AE" -> cortex-a78ae; generic if unknown)."""
    import tvm

    valid = tvm.get_global_func("target.llvm_is_valid_cpu")
    for word in re.findall(r"[A-Za-z][A-Za-z0-9-]*", device.cpu):
        name = word.lower()
        if re.fullmatch(_CORE_NAMES, name) and valid(name, AARCH64_TRIPLE):
            return name
    return "generic"


def tvm_target(device: DeviceProfile) -> dict:
    """The TVM target (as a dict: TVM 0.27 rejects option strings) that builds for ``device``'s CPU.

    The host gets LLVM's name for the CPU it runs on (the library uses all of its vector
    units, and runs on CPUs of that kind); an aarch64 profile gets the core named in its
    ``cpu`` field where LLVM knows it.
    """
    import tvm

    arch, host = _arch(device.cpu_arch), _arch(platform.machine())
    if device.name == "host" or (arch == host and arch == "x86_64"):
        return {
            "kind": "llvm",
            "mtriple": tvm.get_global_func("target.llvm_get_system_triple")(),
            "mcpu": tvm.get_global_func("target.llvm_get_system_cpu")(),
        }
    if arch == "aarch64":
        return {"kind": "llvm", "mtriple": AARCH64_TRIPLE, "mcpu": _llvm_cpu(device)}
    raise TargetError(f"target tvm: no CPU code generation for architecture '{device.cpu_arch}' ({device.name})")


def _runs_here(device: DeviceProfile) -> bool:
    return device.name == "host" or _arch(device.cpu_arch) == _arch(platform.machine())


class TvmTarget(Target):
    """Emit Relax VM shared libraries for Apache TVM's runtime (CPU: x86_64 host, aarch64)."""

    name = "tvm"
    executor = "tvm"
    suffix = ".so"

    def check_device(self, device: DeviceProfile) -> None:
        if device.cuda_arch:
            raise TargetError(
                f"target tvm: CUDA code for {device.name} ({device.cuda_arch}) is not implemented yet; "
                "the tvm target builds CPU code (host, or aarch64 profiles without a GPU such as raspberry-pi-5); "
                "use --target onnx for this device"
            )
        arch = _arch(device.cpu_arch)
        if arch not in ("x86_64", "aarch64"):
            raise TargetError(f"target tvm: no CPU code generation for architecture '{device.cpu_arch}'")
        if not _runs_here(device) and arch == "x86_64":
            raise TargetError(f"target tvm: cross-compiling for x86_64 from {platform.machine()} is not supported")
        if not _runs_here(device) and shutil.which(AARCH64_CXX) is None:
            raise TargetError(
                f"target tvm: building for {device.name} (aarch64) needs the cross compiler {AARCH64_CXX} "
                "on PATH (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)"
            )
        tvm_target(device)  # raises for what it cannot name

    def describe(self, cfg: CompileConfig) -> dict:
        import torch
        import tvm

        return {
            "name": self.name,
            "executor": self.executor,
            "tvm": tvm.__version__,
            "torch": torch.__version__,
            "frontend": "torch.export",
            "tvm_target": tvm_target(get_device(cfg.device)),
        }

    def emit(self, part: GraphPartition, out_dir: Path, cfg: CompileConfig) -> Path:
        import tvm

        if cfg.quant.active:
            # Quantized partitions are the next step of this target (int8 QDQ, weight-only int4).
            scheme = cfg.quant.scheme if cfg.quant.scheme != "fp32" else "mixed precision"
            raise TargetError(f"target tvm does not support quantization yet ('{scheme}'); use --target onnx")
        device = get_device(cfg.device)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{part.name}{self.suffix}"
        mod = import_partition(part)
        target = tvm.target.Target(tvm_target(device))
        try:
            exe = tvm.compile(mod, target=target)
        except Exception as exc:  # TVM raises its own error types (tvm.error.*)
            raise TargetError(f"target tvm: cannot compile {part.name}: {_first_line(exc)}") from None
        cross = not _runs_here(device)
        exe.export_library(str(path), **({"cc": AARCH64_CXX} if cross else {}))
        if not cross:
            self._check_numerics(part, path)
        return path

    def _check_numerics(self, part: GraphPartition, path: Path) -> None:
        """Load the library as the runtime does and compare with the torch module on the example inputs."""
        from edgemoe.runtime.executors.tvm import TvmGraph

        graph = TvmGraph.from_path(path, part.name, part.input_names, part.output_names)
        check_against_torch("tvm", part, graph.run(*(t.numpy() for t in part.example_inputs)))


def _first_line(exc: BaseException) -> str:
    lines = [s for s in str(exc).splitlines() if s.strip()]
    return lines[-1] if lines else type(exc).__name__


def import_partition(part: GraphPartition):
    """``torch.export`` a partition (its dynamic axes symbolic) and import it into a Relax IRModule.

    Raises:
        TargetError: ``torch.export`` or the Relax importer fails on the partition.
    """
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    dims: dict[str, object] = {}
    shapes = []
    for name in part.input_names:
        axes = part.dynamic_axes.get(name, {})
        # One Dim per axis name: axes that share a name (batch, tokens) must agree at run time.
        # No upper bound: Relax would plan static buffers for the largest size.
        spec = {a: dims.setdefault(n, torch.export.Dim(n, min=1)) for a, n in axes.items()}
        shapes.append(spec or None)
    params = list(inspect.signature(part.module.forward).parameters.values())
    varargs = bool(params) and params[0].kind == inspect.Parameter.VAR_POSITIONAL
    dynamic = (tuple(shapes),) if varargs else tuple(shapes)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(part.module, tuple(part.example_inputs), dynamic_shapes=dynamic)
        except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependentSymNode, ...)
            raise TargetError(f"target tvm: torch.export fails on {part.name}: {_first_line(exc)}") from None
        try:
            return from_exported_program(program, keep_params_as_input=False)
        except Exception as exc:  # unsupported operators raise assorted errors
            raise TargetError(f"target tvm: Relax cannot import {part.name}: {_first_line(exc)}") from None


TARGET = TvmTarget()
