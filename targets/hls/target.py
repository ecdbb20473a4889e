"""HLS target: the whole model as one Vitis HLS accelerator, generated per bundle.

``emit_bundle`` lowers the model (:mod:`.lower`), checks the lowering against PyTorch, calibrates
value ranges and picks a fixed-point type per tensor class (:mod:`.fixed_types`), searches tile
sizes under the device's resources (:mod:`.estimate`), writes the dense parameter image, one
fixed-point blob per kept expert and the Vitis HLS project (:mod:`.project`), and measures the
design's accuracy with the bit-exact emulator (:mod:`.emulate`) on held-out data.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from ...bundle.format import file_record
from ...config import CompileConfig
from ...devices import DeviceProfile, get_device
from ...errors import EdgeMoEWarning, TargetError
from ..base import EmitJob, Emitted, Target
from . import emulate, estimate, fixed_types, project
from .check import Emulator
from .check import accuracy as check_accuracy
from .design import CLASS_HELP, Design, unpack
from .lower import lower
from .quantize import calibrate, quantize_design

# The float lowering must reproduce PyTorch to this (relative to the output's magnitude).
LOWERING_RTOL = 1e-4


class HlsTarget(Target):
    """Emit a Vitis HLS project (C++ kernels, fixed-point weights, testbench) run by the ``fpga`` executor."""

    name = "hls"
    executor = "fpga"
    suffix = ""

    def check_device(self, device: DeviceProfile) -> None:
        if device.fpga is None:
            raise TargetError(
                f"target hls builds for FPGA devices (zcu102, zcu104, or a profile file with an [fpga] table); "
                f"{device.name} has no programmable logic"
            )

    def check_model(self, cfg: CompileConfig) -> None:
        if cfg.quant.active:
            raise TargetError(
                "target hls: --quant does not apply; the accelerator is fixed point: choose types with --fixed "
                "(default: calibrated per tensor class)"
            )
        if cfg.tuning_db:
            raise TargetError("target hls: --tuning-db is for --target tvm")
        fixed_types.parse_fixed(cfg.fixed)  # a bad --fixed fails before any work

    # verify: C simulation against PyTorch (MSE) and bit for bit against the emulator; metrics by
    # the emulator; the estimate's latency (a C simulation's wall time says nothing about the board).
    checks_outputs = True
    timed_in_verify = False

    def verify_inputs(self, manifest: dict, adapter, samples: int, seed: int):
        # In-distribution inputs: the fixed-point ranges were calibrated on the model's data.
        return adapter.evaluation_data(samples, seed + 5000)[0]

    def verify_accuracy(self, bundle: Path, manifest: dict, adapter, samples: int) -> dict:
        from .check import Emulator, accuracy

        return accuracy(Emulator.from_bundle(bundle, manifest), adapter, samples)

    def verify_task(self, bundle: Path, manifest: dict, task: str, x, session, reference, accuracy: dict) -> dict:
        from .check import MSE_TOLERANCE, Emulator

        emulated = Emulator.from_bundle(bundle, manifest).raw(x, task)
        got = session.program.last_raw
        same_shape = got is not None and got.shape == emulated.shape
        bit_exact = same_shape and bool(np.array_equal(got, emulated))
        out = session.program.to_float(got).astype(np.float64)
        est = manifest["hls"]["estimate"]
        heldout = float(accuracy["mse_vs_fp32"])
        return {
            "mse": float(((out - reference) ** 2).mean()),
            "mse_heldout": heldout,
            "mse_tolerance": MSE_TOLERANCE,
            "csim_equals_emulator": bit_exact,
            "values_differing": int(np.count_nonzero(got != emulated)) if same_shape else -1,
            "latency_ms": float(est["tasks"].get(task, est)["latency_ms"]),
            "latency_source": f"estimate at {est['clock_mhz']:.0f} MHz (not synthesised)",
            # The held-out MSE (every evaluation input) decides: on a batch of two, one near-tie that
            # routes a token to another expert than float does moves the batch's MSE by 1e-3.
            "passed": bit_exact and heldout <= MSE_TOLERANCE,
        }

    def describe(self, cfg: CompileConfig) -> dict:
        fpga = get_device(cfg.device).fpga
        return {
            "name": self.name,
            "executor": self.executor,
            "part": fpga.part if fpga else None,
            "clock_mhz": fpga.clock_mhz if fpga else None,
            "fixed": cfg.fixed or "calibrated",
        }

    def emit_bundle(self, job: EmitJob) -> Emitted:
        cfg, adapter, root = job.cfg, job.captured.adapter, job.root
        fpga = job.device.fpga
        job.progress("lower the model to the HLS kernels")
        lowered = lower(job.captured, job.plan.expert_sets, job.plan.experts)
        tasks = lowered.design.tasks
        x = adapter.calibration_inputs(cfg.calib_samples, cfg.calib_seed)
        lowering_error = _check_lowering(lowered, adapter, x[:2], tasks)
        job.progress(f"calibrate value ranges on {len(x)} inputs x {len(tasks)} tasks")
        classes, sites = calibrate(lowered, x, tasks)
        overrides = fixed_types.parse_fixed(cfg.fixed)
        types = fixed_types.choose_types(classes, overrides)
        calibrated = fixed_types.choose_types(classes, {})
        report = fixed_types.range_report(sites, types)
        for entry in report[:10]:
            warnings.warn(
                EdgeMoEWarning(
                    f"{entry['tensor']} ({entry['class']}) reaches {entry['max_abs']:.4g}, beyond {entry['type']} "
                    f"(±{entry['limit']:.4g}): it saturates"
                ),
                stacklevel=2,
            )
        if len(report) > 10:
            warnings.warn(
                EdgeMoEWarning(f"{len(report) - 10} more tensors exceed their types (manifest hls.range_report)"),
                stacklevel=2,
            )
        draft = _with_types(lowered.design, types)
        fixed_types.check_types(draft)
        tpe = _tokens_per_expert(job, draft)
        job.progress(f"search tile sizes under {fpga.part}'s resources")
        est = estimate.search(draft, fpga, tpe)
        design, image, blobs = quantize_design(lowered, types, est["tiles"])
        (root / "params.bin").write_bytes(image.astype("<u2").tobytes())
        graphs = {"params": {**file_record(root, root / "params.bin"), "kind": "params"}}
        experts = _write_experts(root, design, job.plan.experts, blobs)
        hls = root / "hls"
        job.progress("write the Vitis HLS project")
        files = [(p, "source") for p in project.write_sources(design, hls / "src")]
        (hls / "tb").mkdir()
        (hls / "tb" / "tb.cpp").write_bytes((project.CPP / "tb.cpp").read_bytes())
        files.append((hls / "tb" / "tb.cpp", "testbench"))
        project.write_tcl(hls / "run_hls.tcl", fpga.part, fpga.clock_mhz)
        files.append((hls / "run_hls.tcl", "script"))
        params = {n: unpack(image, t, design.types[t.cls]) for n, t in design.params.items()}
        raw_experts = {key: _blob_tensors(blob, records) for key, (blob, records) in blobs.items()}
        emulator = Emulator(design, params, lambda li, e: raw_experts[(li, e)])
        files += _write_testbench_data(hls / "data", emulator, adapter, job)
        job.progress(f"accuracy of the fixed-point design (emulator) on {cfg.quant.eval_samples} held-out inputs")
        accuracy = check_accuracy(emulator, adapter, cfg.quant.eval_samples)
        section = {
            "design": design.to_json(),
            "estimate": est,
            "calibration": {
                "samples": len(x),
                "ranges": {c: classes.get(c, 0.0) for c in fixed_types.WIDTHS},
                "types_calibrated": {c: str(t) for c, t in calibrated.items()},
                "overrides": {c: str(t) for c, t in overrides.items()},
                "classes": dict(CLASS_HELP),
            },
            "range_report": report,
            "lowering_max_abs_error": lowering_error,
            "accuracy": accuracy,
        }
        project.write_readme(hls / "README.md", design, section)
        files.append((hls / "README.md", "readme"))
        for path, role in files:
            rel = path.relative_to(root).as_posix()
            graphs[rel] = {**file_record(root, path), "kind": "accelerator", "role": role}
        return Emitted(
            graphs=graphs,
            experts=experts,
            shared=tuple(() for _ in job.captured.ir.moe_layers),
            expert_bytes=tuple(design.expert_words * 2 for _ in job.captured.ir.moe_layers),
            sections={"hls": section},
        )


def _with_types(design: Design, types: dict) -> Design:
    import dataclasses

    return dataclasses.replace(design, types=dict(types))


def _check_lowering(lowered, adapter, x: np.ndarray, tasks) -> float:
    """The float lowering against the PyTorch model (with the bundle's kept sets); returns the max error.

    Raises:
        TargetError: They differ beyond float rounding.
    """
    d = lowered.design
    worst = 0.0
    for t, task in enumerate(tasks):
        keep = dict(enumerate(d.kept[t]))
        ref = adapter.reference(x, task, keep)
        got = emulate.forward(
            d, emulate.FloatMath(d), x, task, lambda n: lowered.params[n][0], lambda li, e: lowered.experts[(li, e)]
        )
        err = float(np.abs(got - ref).max())
        if err > LOWERING_RTOL * max(1.0, float(np.abs(ref).max())):
            raise TargetError(f"target hls: the lowered model differs from PyTorch by {err:.3g} on task {task}")
        worst = max(worst, err)
    return worst


def _tokens_per_expert(job: EmitJob, d: Design) -> dict[str, list[list[float]]]:
    """Per task, per MoE layer, the calibration tokens routed to each expert per image."""
    profile = job.profile
    out = {}
    for task in d.tasks:
        out[task] = [
            (profile.traces[task][li].counts(d.num_experts) / max(1, profile.samples)).tolist()
            for li in range(d.moe_layers)
        ]
    return out


def _write_experts(root: Path, d: Design, plan_experts, blobs) -> tuple[tuple[dict, ...], ...]:
    folder = root / "experts"
    folder.mkdir(exist_ok=True)
    out = []
    for li in range(d.moe_layers):
        records = []
        for e in plan_experts[li]:
            blob, tensors = blobs[(li, e)]
            path = folder / f"L{li}_E{e}.bin"
            path.write_bytes(blob)
            records.append(
                {
                    "index": e,
                    **file_record(root, path),
                    "dtype": "int16",
                    "tensors": tensors,
                    "bits": d.types["weight"].width,
                    "scheme": "fixed",
                }
            )
        out.append(tuple(records))
    return tuple(out)


def _blob_tensors(blob: bytes, records: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for r in records:
        count = math.prod(r["shape"])
        out[r["name"]] = (
            np.frombuffer(blob, dtype="<i2", count=count, offset=r["offset"]).astype(np.int64).reshape(r["shape"])
        )
    return out


def _write_testbench_data(folder: Path, emulator: Emulator, adapter, job: EmitJob) -> list:
    """One held-out input per task, its PyTorch output and the emulator's (raw), and each task's expert list."""
    d = emulator.design
    folder.mkdir(parents=True)
    x, _ = adapter.evaluation_data(1, job.cfg.calib_seed)
    files, lines = [], []
    for t, task in enumerate(d.tasks):
        keep = dict(enumerate(d.kept[t]))
        ref = adapter.reference(x, task, keep).astype("<f4")
        emu = emulator.raw(x, task).astype("<i4")
        inp = emulate.FixedMath(d).input(x[0]).astype("<i4")
        for name, arr in (("input", inp), ("ref", ref), ("emu", emu)):
            path = folder / f"task{t}_{name}.bin"
            path.write_bytes(np.ascontiguousarray(arr).tobytes())
            files.append((path, "data"))
        for li in range(d.moe_layers):
            lines += [f"{t} {li} {e} experts/L{li}_E{e}.bin" for e in d.kept[t][li]]
    (folder / "experts.txt").write_text("\n".join(lines) + "\n")
    files.append((folder / "experts.txt", "data"))
    return files


TARGET = HlsTarget()
