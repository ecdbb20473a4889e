"""Stage 6: emit every partition with the target and write the bundle atomically.

The bundle is assembled in a hidden staging folder beside the output and renamed into
place only when complete, so an interrupted or failed compile never leaves a partial
bundle at the output path.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..bundle.format import FORMAT_TAG, MANIFEST, SCHEMA_VERSION, file_record, graph_bytes, is_bundle
from ..config import CompileConfig
from ..devices import DeviceProfile
from ..errors import OutputPathError
from .capture_model import CapturedModel
from .partition_model import PartitionPlan
from .profile_routing import RoutingProfile

Progress = Callable[[str], None]


def check_output_path(out: Path) -> None:
    """Refuse an output path that exists and is not a bundle (it is never overwritten)."""
    if out.exists() and not is_bundle(out):
        kind = "folder" if out.is_dir() else "file"
        raise OutputPathError(f"output path {out} exists and is a {kind}, not an edgemoe bundle; choose another path")


def write_bundle(
    out: Path,
    cfg: CompileConfig,
    captured: CapturedModel,
    profile: RoutingProfile,
    plan: PartitionPlan,
    target,
    device: DeviceProfile,
    progress: Progress = lambda _msg: None,
    finalize: Callable[[Path, dict], dict] | None = None,
) -> dict:
    """Emit graphs and expert blobs into a staging folder, write the manifest, rename into place.

    Args:
        out: Bundle folder to create (or replace, if it is already a bundle).
        cfg: Compile configuration.
        captured: Captured model (weights come from its adapter).
        profile: Calibration routing profile (per-task expert counts go into the manifest).
        plan: Partition plan.
        target: The :class:`~edgemoe.targets.Target` emitting graphs.
        device: Device profile the bundle is built for.
        progress: Called with a short message per step.
        finalize: Later stages (quantization) run on the complete staged bundle before it is
            renamed into place; they return the updated manifest, which is written again.

    Returns:
        The manifest written.
    """
    out = Path(out)
    check_output_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out)
        staging = out.parent / f".{out.name}.staging-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as exc:
        raise OutputPathError(f"cannot write a bundle at {out}: {_os_reason(exc)}") from None
    try:
        manifest = _fill(staging, cfg, captured, profile, plan, target, device, progress)
        if finalize is not None:
            manifest = finalize(staging, manifest)
            write_manifest(staging, manifest)
        _install(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if exc.errno not in _STORAGE_ERRNOS and not _inside(exc.filename, out.parent):
            raise  # not the output's fault (a tool or an input file): its own error
        # Disk full, read-only or vanished output: say where; nothing is left behind.
        raise OutputPathError(f"cannot write the bundle at {out}: {_os_reason(exc)}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


# Errors that are the output storage's whatever file was being written (a write() names none).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _inside(filename, folder: Path) -> bool:
    if not filename:
        return False
    try:
        return Path(os.fsdecode(filename)).resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError):
        return False


def _os_reason(exc: OSError) -> str:
    """``No space left on device (writing .../graphs/x.onnx)``: the OS's reason and the file."""
    reason = exc.strerror or type(exc).__name__
    return f"{reason} ({exc.filename})" if exc.filename else reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove what killed compiles to ``out`` left beside it; return what was removed.

    A staging folder is named after the compile's process id (``.<name>.staging-<pid>-<random>``):
    one whose process is gone was left by a compile that was killed (an exception removes its own).
    The backup of a replaced bundle (``.<name>.old-<random>``) only outlives an interrupted rename;
    it goes once a bundle is at ``out`` again (before that it may be the only copy). Folders of
    live compiles are left alone.
    """
    removed = []
    for path in out.parent.glob(f".{out.name}.*"):
        rest = path.name[len(out.name) + 2 :]
        if rest.startswith("staging-"):
            pid = rest.split("-")[1]
            if not pid.isdigit() or _alive(int(pid)):
                continue
        elif not (rest.startswith("old-") and is_bundle(out)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _fill(staging, cfg, captured, profile, plan, target, device, progress) -> dict:
    from ..targets.base import EmitJob

    ir = captured.ir
    emitted = target.emit_bundle(EmitJob(staging, cfg, captured, profile, plan, device, progress))
    graphs = emitted.graphs
    layers = []
    for layer in ir.moe_layers:
        router = layer.routers[0]
        layers.append(
            {
                "index": layer.index,
                "block": layer.block,
                "num_experts": layer.num_experts,
                "top_k": layer.top_k,
                "score": router.score,
                "normalize": router.normalize,
                "shared_experts": layer.shared_experts,
                "kernel": plan.layer_kernel[layer.index],
                "expert_shape": {
                    "d_model": layer.expert.d_model,
                    "hidden": layer.expert.hidden,
                    "activation": layer.expert.activation,
                    "params": [{"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in layer.expert.params],
                },
                "expert_bytes": emitted.expert_bytes[layer.index],
                "experts": list(emitted.experts[layer.index]),
                "shared": list(emitted.shared[layer.index]),
            }
        )

    tasks = {}
    for task in captured.tasks:
        spec = ir.task(task)
        tasks[task] = {
            "head": plan.heads[task].name,
            "gates": [g.name for g in plan.gates[task]],
            "output": spec.output.to_json(),
            "kind": spec.kind,
            "experts": [list(s) for s in plan.expert_sets.kept[task]],
            "expert_counts": [
                [int(c) for c in profile.traces[task][layer.index].counts(layer.num_experts)] for layer in ir.moe_layers
            ],
        }

    expert_files = [e for layer in layers for e in layer["experts"]]
    shared_files = [e for layer in layers for e in layer["shared"]]
    manifest = {
        "format": FORMAT_TAG,
        "schema_version": SCHEMA_VERSION,
        "edgemoe_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": ir.name,
            "family": ir.family,
            "granularity": ir.granularity,
            "params": ir.params,
            "config": ir.config,
            "source": captured.source,
        },
        "target": target.describe(cfg),
        "device": device.to_json(),
        "input": {**ir.input.to_json(), **_preprocess(ir)},
        "graphs": graphs,
        "segments": [s.name for s in plan.segments],
        "moe_layers": layers,
        "tasks": tasks,
        "calibration": {"samples": profile.samples, "seed": profile.seed, "pruned": plan.expert_sets.pruned},
        "totals": {
            "experts_model": ir.num_experts,
            "experts_bundle": len(expert_files),
            "expert_bytes_model": sum(emitted.expert_bytes[layer.index] * layer.num_experts for layer in ir.moe_layers),
            "expert_bytes_bundle": sum(e["bytes"] for e in expert_files),
            "shared_expert_bytes": sum(e["bytes"] for e in shared_files),
            "graph_bytes": sum(graph_bytes(g) for g in graphs.values()),
        },
        **emitted.sections,
    }
    if plan.step_segments:
        manifest["generate"] = _generate_section(plan, graphs)
    tokenizer = _tokenizer_section(staging, captured)
    if tokenizer is not None:
        manifest["tokenizer"] = tokenizer
    progress("write manifest")
    write_manifest(staging, manifest)
    return manifest


def _tokenizer_section(staging: Path, captured) -> dict | None:
    """The manifest's ``tokenizer`` section: the model's own (bytes), or a checkpoint folder's tokenizer.json.

    The folder's file is copied into the bundle and checked like every blob before use.
    """
    own = captured.adapter.tokenizer()
    if own is not None:
        return own
    source = captured.source
    if source.get("weights_format") != "hf":
        return None
    path = Path(source["weights"]) / "tokenizer.json"
    if not path.is_file():
        return None
    shutil.copyfile(path, staging / "tokenizer.json")
    return {"kind": "tokenizers", **file_record(staging, staging / "tokenizer.json")}


def _generate_section(plan, graphs: dict) -> dict:
    """The manifest's ``generate`` section: the generation graphs and the key/value cache each one carries."""
    segments = []
    for part in plan.step_segments:
        record = graphs[part.name]
        n_in, n_out = len(record["inputs"]), len(record["outputs"])
        if "past" not in record["inputs"]:  # no attention in the segment: nothing cached
            segments.append({"graph": part.name, "cache": []})
            continue
        first = record["inputs"].index("past") + 1
        caches = [
            {"input": name, "output": out, "shape": list(example.shape[1:])}
            for name, out, example in zip(
                record["inputs"][first:],
                record["outputs"][n_out - (n_in - first) :],
                part.example_inputs[first:],
                strict=True,
            )
        ]
        segments.append({"graph": part.name, "cache": caches})
    return {"max_seq": plan.max_seq, "segments": segments}


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``manifest.json`` into a (staging) bundle folder."""
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def _preprocess(ir) -> dict:
    cfg = ir.config
    if "mean" in cfg and "std" in cfg:
        return {"preprocess": {"kind": "image", "layout": "NCHW", "mean": cfg["mean"], "std": cfg["std"]}}
    return {}


def _install(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to ``out``, replacing an older bundle there."""
    check_output_path(out)  # again: something may have appeared there while we compiled
    if out.exists():
        backup = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(backup)
        try:
            staging.rename(out)
        except BaseException:
            backup.rename(out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(out)
