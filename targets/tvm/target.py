"""TVM target: every partition becomes one shared library of Relax VM code, run by the ``tvm`` executor.

Partitions enter Relax through ``torch.export`` (``relax.frontend.torch.from_exported_program``),
with each partition's dynamic axes as symbolic dimensions. That is the more robust of the two
importers TVM offers here: the ONNX importer fails on the shape arithmetic of the legacy ONNX
exports of the token models (``Expand`` of a computed shape in the gates, ``concat`` of shape
tensors in the trunk), while ``torch.export`` hands Relax clean symbolic shapes. Model weights are
baked into the library as constants, except in expert kernels, whose weights are function inputs:
one library per expert shape, and the runtime swaps weight blobs under it.

Each library is compiled with ``tvm.compile`` for the device's CPU (``llvm``, with the default
schedules of :mod:`.cpu_schedule` where no tuning database has one; aarch64 is
cross-compiled and linked with ``aarch64-linux-gnu-g++``, or ``zig cc`` from the ``ziglang`` wheel
where that is missing), written with ``export_library`` and, where it can run here, loaded back and
compared with the torch module on the example inputs. Profiles with a CUDA GPU (``cuda_arch``)
get CUDA kernels for their SM with host code for their CPU (:mod:`.cuda`).
"""

from __future__ import annotations

import dataclasses
import inspect
import platform
import re
import shutil
import tempfile
import warnings
from pathlib import Path

from ...config import CompileConfig
from ...devices import DeviceProfile, get_device
from ...errors import TargetError
from ...frontends import GraphPartition
from ..base import EmitJob, Emitted, Target, check_against_torch, graph_record
from . import cuda
from .cpu_schedule import default_schedules
from .dispatch import dispatch_partitions
from .executor import _last_line
from .tuning_db import apply_tuning

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
    """The TVM target (as a dict: TVM 0.27 rejects option strings) that builds for ``device``.

    A profile with a CUDA GPU gets ``{"kind": "cuda", "arch": <its SM>, "host": <its CPU target>}``.
    """
    host = _cpu_target(device)
    if device.cuda_arch and device.name != "host" and _arch(device.cpu_arch) == "x86_64":
        # A GPU machine's CPU is not the build machine's: portable host code (launches, shapes).
        host = {**host, "mcpu": cuda.x86_cpu(device)}
    return cuda.cuda_target(device, host) if device.cuda_arch else host


def _cpu_target(device: DeviceProfile) -> dict:
    """The llvm target for ``device``'s CPU.

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
            cuda.check_cuda_build(device)
        arch = _arch(device.cpu_arch)
        if arch not in ("x86_64", "aarch64"):
            raise TargetError(f"target tvm: no CPU code generation for architecture '{device.cpu_arch}'")
        if not _runs_here(device) and arch == "x86_64":
            raise TargetError(f"target tvm: cross-compiling for x86_64 from {platform.machine()} is not supported")
        if not _runs_here(device) and _cross_link(device) is None:
            raise TargetError(
                f"target tvm: building for {device.name} (aarch64) needs the cross compiler {AARCH64_CXX} "
                "on PATH (Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu) or the ziglang wheel "
                "(pip install ziglang)"
            )
        tvm_target(device)  # raises for what it cannot name

    def describe(self, cfg: CompileConfig) -> dict:
        import torch
        import tvm

        device = get_device(cfg.device)
        out = {
            "name": self.name,
            "executor": self.executor,
            "tvm": tvm.__version__,
            "torch": torch.__version__,
            "frontend": "torch.export",
            "tvm_target": tvm_target(device),
        }
        if device.cuda_arch:
            release, _ = cuda.nvcc_info(cuda.find_nvcc())
            out["cuda"] = {
                "nvcc": release,
                "schedules": "dlight gpu defaults (Matmul, GEMV, Reduction, GeneralReduction, Fallback)",
                **cuda.verification(device, _runs_here(device)),
                "tvm_tag": cuda.tag_comparison(device, out["tvm_target"]["host"]),
            }
        return out

    def __init__(self) -> None:
        # Libraries this process built, with their torch partitions: a compiled library cannot be
        # rewritten, so the quantization hooks rebuild it from the partition (targets/tvm/quantize.py).
        self._built: dict[Path, tuple[GraphPartition, CompileConfig]] = {}

    def release(self) -> None:
        """Drop the torch partitions of the libraries built (kept for the quantization hooks only)."""
        self._built.clear()

    def emit_bundle(self, job: EmitJob) -> Emitted:
        """The default bundle (a library per partition, fp32 experts) plus the dispatch graphs.

        The dispatch graphs (:mod:`.dispatch`) let a GPU run keep its activations on the device.
        """
        emitted = super().emit_bundle(job)
        if not job.captured.ir.moe_layers:
            return emitted
        graphs = dict(emitted.graphs)
        cfg = dataclasses.replace(job.cfg, tuning_db=None)  # tuning records hold the model's graphs only
        for part in dispatch_partitions():
            job.progress(f"emit {self.name} dispatch graph {part.name}")
            graphs[part.name] = graph_record(
                job.root, self._build(part, job.root / "graphs", cfg, check_against_torch), part
            )
        return dataclasses.replace(emitted, graphs=graphs)

    def emit(self, part: GraphPartition, out_dir: Path, cfg: CompileConfig) -> Path:
        from . import quantize as tq  # torch-side rewrites: imported by the compiler only

        if cfg.quant.active:
            tq.refuse("mixed precision" if cfg.quant.mixed else cfg.quant.scheme)
            if not _runs_here(get_device(cfg.device)):
                # Calibration and the accuracy report run the staged bundle on this machine.
                raise TargetError(
                    f"target tvm: quantized bundles are calibrated by running them here, and {cfg.device} "
                    "libraries cannot run on this machine; quantize for --device host, or use --target onnx"
                )
        return self._build(part, out_dir, cfg, check_against_torch)

    def quantize_graph(self, path: Path, scheme: str, feeds: list, quant) -> None:
        from . import quantize as tq  # torch-side rewrites: imported by the compiler only

        tq.refuse(scheme)
        part, cfg = self._source(path)
        ranges = None
        if scheme == "int8":
            ranges = tq.calibrate_dense(part.module, part.input_names, feeds, quant.calibrator, quant.percentile)
        qpart = dataclasses.replace(part, module=tq.quantize_dense(part.module, scheme, ranges))
        self._build(qpart, path.parent, cfg, tq.check_quantized)

    def quantize_kernel(
        self, src: Path, dst: Path, weights: tuple[str, ...], scheme: str, bits: int, group: int
    ) -> Path:
        from . import quantize as tq

        tq.refuse(scheme if scheme != "nbits" else f"int{bits}")
        part, cfg = self._source(src)
        params = list(part.input_names[1:])
        qpart = dataclasses.replace(
            part,
            name=dst.stem,
            module=tq.quantize_kernel_module(part.module, params, weights, scheme, part.name),
            example_inputs=tq.example_kernel_inputs(
                part.example_inputs[0], dict(zip(params, part.example_inputs[1:], strict=True)), weights, scheme
            ),
            input_names=tuple(tq.kernel_input_names(params, weights, scheme)),
        )
        return self._build(qpart, dst.parent, cfg, tq.check_quantized)

    def probe_kernel(self, src: Path, weights: tuple[str, ...]) -> tuple[bytes, list[str]]:
        from . import quantize as tq  # torch-side rewrites: imported by the compiler only

        part, cfg = self._source(src)
        outs = [f"act_{w}" for w in weights]
        probe = dataclasses.replace(
            part,
            name=f"{part.name}_probe",
            module=tq.probe_kernel_module(part.module, list(part.input_names[1:]), weights, part.name),
            output_names=("y", *outs),
            dynamic_axes={**part.dynamic_axes, **{o: {0: "tokens"} for o in outs}},
        )
        with tempfile.TemporaryDirectory(prefix="edgemoe-probe-") as tmp:
            return self._build(probe, Path(tmp), cfg, check_against_torch).read_bytes(), outs

    def graph_io(self, path: Path) -> tuple[list[str], list[str]]:
        part, _ = self._source(path)
        return list(part.input_names), list(part.output_names)

    def _source(self, path: Path) -> tuple[GraphPartition, CompileConfig]:
        try:
            return self._built[path.resolve()]
        except KeyError:
            raise TargetError(f"target tvm: {path.name} was not built in this process; cannot rebuild it") from None

    def _build(self, part: GraphPartition, out_dir: Path, cfg: CompileConfig, check) -> Path:
        """Compile ``part`` into ``out_dir/<name>.so`` and ``check`` it against torch where it can run here.

        The library is remembered with its partition: the quantization hooks rebuild from it.
        """
        device = get_device(cfg.device)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{part.name}{self.suffix}"
        mod = import_partition(part)
        target = tvm_target(device)
        if cfg.tuning_db:  # MetaSchedule schedules from `edgemoe tune` (targets/tvm/tune.py)
            mod = apply_tuning(mod, part, target, cfg.tuning_db)
        try:
            if device.cuda_arch:
                exe = cuda.compile_cuda(mod, target)
            else:
                exe = self._compile_cpu(part, mod, target, legalized=bool(cfg.tuning_db))
        except TargetError:
            raise
        except Exception as exc:  # TVM raises its own error types (tvm.error.*)
            raise TargetError(f"target tvm: cannot compile {part.name}: {_last_line(exc)}") from None
        cross = not _runs_here(device)
        exe.export_library(str(path), **(_cross_link(device) if cross else {}))
        if device.cuda_arch:
            # TVM falls back to CUDA source silently; a library must carry kernels for the SM. Kernels
            # cannot run without the device's GPU, so numerics wait for verify on the device.
            cuda.check_device_code(path, device.cuda_arch, part.name)
            if not cross and cuda.gpu_here(device.cuda_arch):
                self._check_numerics(part, path, check)
        elif not cross:
            self._check_numerics(part, path, check)
        self._built[path.resolve()] = (part, cfg)
        return path

    @staticmethod
    def _compile_cpu(part: GraphPartition, mod, target: dict, legalized: bool):
        """``tvm.compile`` for a CPU, operators without a tuning record on the default schedules.

        The default schedules (:mod:`.cpu_schedule`) replace TVM's single-threaded scalar loops.
        Should TVM fail to lower one of them, the library is built without them (and a warning
        says so): slower, but the bundle still builds.
        """
        import tvm

        tgt = tvm.target.Target(target)
        try:
            scheduled = default_schedules(mod, target, legalized=legalized)
            return tvm.compile(scheduled, target=tgt)
        except Exception as exc:  # TVM raises its own error types (tvm.error.*)
            warnings.warn(
                f"target tvm: default CPU schedules fail on {part.name} ({_last_line(exc)}); built unscheduled",
                stacklevel=2,
            )
        return tvm.compile(mod, target=tgt)

    def _check_numerics(self, part: GraphPartition, path: Path, check=check_against_torch) -> None:
        """Load the library as the runtime does and compare with the torch module on the example inputs."""
        from .executor import TvmGraph

        # dlopen of a path it already holds returns the old library: a rebuilt (quantized) library
        # at the same path is loaded from a private copy.
        with tempfile.TemporaryDirectory(prefix="edgemoe-check-") as tmp:
            copy = Path(tmp) / path.name
            shutil.copyfile(path, copy)
            graph = TvmGraph.from_path(copy, part.name, part.input_names, part.output_names)
            check("tvm", part, graph.run(*(t.numpy() for t in part.example_inputs)))


def _cross_link(device: DeviceProfile) -> dict | None:
    """``export_library`` arguments that link a library for an aarch64 ``device``, or None if nothing can."""
    if shutil.which(AARCH64_CXX):
        return {"cc": AARCH64_CXX}
    zig = cuda.cross_linker(AARCH64_TRIPLE, AARCH64_CXX)
    return {"fcompile": zig} if zig else None


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
            raise TargetError(f"target tvm: torch.export fails on {part.name}: {_last_line(exc)}") from None
        try:
            return from_exported_program(program, keep_params_as_input=False)
        except Exception as exc:  # unsupported operators raise assorted errors
            raise TargetError(f"target tvm: Relax cannot import {part.name}: {_last_line(exc)}") from None


TARGET = TvmTarget()
