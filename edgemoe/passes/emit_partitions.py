"""Stage: emit every partition with the target into the staging folder; build the manifest.

Targets get the partition plan directly (:class:`~edgemoe.targets.base.EmitJob`): most write one
graph per partition and the fp32 expert blobs, the HLS target one accelerator project. The manifest
records each file with its size and sha256; later stages (quantization, the schedule) update it.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import shutil
from pathlib import Path

from .. import __version__
from ..bundle.format import FORMAT_TAG, SCHEMA_VERSION, file_record, graph_bytes
from ..config import CompileConfig
from ..stages import CompileState, Stage
from .write_manifest import write_manifest


def emit_partitions(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Emit the plan's partitions with the target into the staging folder and write the manifest.

    The manifest is on disk after this stage: calibration and the accuracy report run the staged
    bundle with the runtime.

    Raises:
        TargetError: A graph cannot be built, or differs from its torch module.
    """
    manifest = build_manifest(state, cfg)
    state.progress("write manifest")
    write_manifest(state.staging, manifest)
    return dataclasses.replace(state, manifest=manifest)


def build_manifest(state: CompileState, cfg: CompileConfig) -> dict:
    """Have the target write every artifact into ``state.staging``; return the bundle's manifest."""
    from ..targets.base import EmitJob

    staging, captured, profile, plan = state.staging, state.captured, state.profile, state.plan
    target, device = state.target, state.device
    emitted = target.emit_bundle(EmitJob(staging, cfg, captured, profile, plan, device, state.progress))
    ir = captured.ir
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


def _preprocess(ir) -> dict:
    cfg = ir.config
    if "mean" in cfg and "std" in cfg:
        return {"preprocess": {"kind": "image", "layout": "NCHW", "mean": cfg["mean"], "std": cfg["std"]}}
    return {}


def _summary(state: CompileState) -> dict:
    m = state.manifest
    return {
        "graphs": {name: {"kind": g.get("kind"), "sha256": g.get("sha256")} for name, g in m["graphs"].items()},
        "experts": {str(layer["index"]): [e.get("sha256") for e in layer["experts"]] for layer in m["moe_layers"]},
        "totals": m["totals"],
    }


STAGE = Stage("emit", emit_partitions, _summary)
