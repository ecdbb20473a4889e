"""Stage ``quantize``: quantize a staged fp32 bundle in place (dense partitions and every expert).

Dense partitions (trunk segments, heads) are quantized by the target (onnxruntime's tools
for the ONNX target). Gates stay fp32: they are tiny, and a flipped expert choice costs more
accuracy than their bytes are worth. Experts are quantized one blob at a time with
:mod:`edgemoe.quantization`; each expert names the kernel variant that reads its format.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..bundle.format import decode_expert, encode_expert, file_record, graph_bytes, read_verified
from ..config import CompileConfig
from ..quantization import (
    QuantConfig,
    dequantize_int8_per_channel,
    dequantize_nbits,
    nbits_bytes,
    quantize_int8_per_channel,
    quantize_nbits,
)
from ..runtime.executor import get_executor
from ..stages import CompileState, Stage
from .calibrate_activations import CalibrationSet, activation_range, uint8_qparams
from .plan_expert_bits import BitPlan, ExpertChoice, balance_tasks, plan_expert_bits, routing_importance
from .profile_routing import RoutingProfile
from .write_manifest import write_manifest

ERROR_TOKENS = 512  # tokens per expert used to measure its quantization error


def _format(quant: QuantConfig, bits: int | None) -> tuple[str, int]:
    """(kernel scheme, bits) of an expert: uniform schemes, or n-bit from the plan."""
    if bits is not None:
        return "nbits", bits
    if quant.scheme == "int4":
        return "nbits", 4
    return quant.scheme, 0


def _tag(scheme: str, bits: int, group: int) -> str:
    return {"fp16": "fp16", "int8": "int8", "int8-dynamic": "int8dyn"}.get(scheme, f"b{bits}g{group}")


def dense_scheme(quant: QuantConfig) -> str:
    """Scheme of the dense partitions (mixed precision keeps them at int8 unless told otherwise)."""
    return "int8" if quant.scheme == "fp32" and quant.mixed else quant.scheme


def quantize_weights(
    weights: dict[str, np.ndarray],
    matrices: tuple[str, ...],
    scheme: str,
    bits: int,
    group: int,
    act: dict[str, tuple[np.float32, np.uint8]] | None = None,
    int8_max: int = 127,
) -> dict[str, np.ndarray]:
    """Quantize an expert's tensors: 2-D ``matrices`` by the scheme, the rest kept float32.

    ``int8_max`` bounds int8 weights (the target's ``int8_weight_max``).
    """
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if name not in matrices:
            out[name] = np.asarray(w, np.float32)
        elif scheme == "fp16":
            out[name] = w.astype(np.float16)
        elif scheme in ("int8", "int8-dynamic"):
            out[f"{name}.q"], out[f"{name}.scale"] = quantize_int8_per_channel(w, name, int8_max)
            if scheme == "int8":
                scale, zp = act[name]
                # One-element vectors: what the int8 kernel declares (a per-tensor activation scale).
                out[f"{name}.act_scale"], out[f"{name}.act_zp"] = np.array([scale]), np.array([zp])
        else:
            out[f"{name}.q"], out[f"{name}.scales"] = quantize_nbits(w, bits, group, name)
    return out


def _matrices(layer: dict) -> tuple[str, ...]:
    return tuple(p["name"] for p in layer["expert_shape"]["params"] if len(p["shape"]) == 2)


class _Kernels:
    """Emits each quantized kernel variant once and registers it in the manifest."""

    def __init__(self, staging: Path, manifest: dict, target, quant: QuantConfig):
        self.staging, self.manifest, self.target, self.quant = staging, manifest, target, quant

    def get(self, base: str, matrices: tuple[str, ...], scheme: str, bits: int) -> str:
        name = f"{base}_{_tag(scheme, bits, self.quant.group_size)}"
        graphs = self.manifest["graphs"]
        if name not in graphs:
            src = self.staging / graphs[base]["file"]
            dst = src.with_name(f"{name}{src.suffix}")
            self.target.quantize_kernel(src, dst, matrices, scheme, bits, self.quant.group_size)
            inputs, outputs = self.target.graph_io(dst)
            graphs[name] = {
                **self.target.graph_files(self.staging, dst),
                "kind": "expert_kernel",
                "inputs": inputs,
                "outputs": outputs,
            }
        return name


def _act_params(probe, matrices, tokens: np.ndarray, quant: QuantConfig, weights) -> dict:
    """Calibrated uint8 qparams of the activation entering each weight matmul of one expert."""
    outs = probe.run(tokens, *(weights[n] for n in probe.input_names[1:]))
    acts = outs[1:]
    return {
        m: uint8_qparams(*activation_range(a, quant.calibrator, quant.percentile))
        for m, a in zip(matrices, acts, strict=True)
    }


def _relative_error(kernel, tokens, weights, approx) -> float:
    (ref,) = kernel.run(tokens, *(weights[n] for n in kernel.input_names[1:]))
    (got,) = kernel.run(tokens, *(approx[n] for n in kernel.input_names[1:]))
    return float(((got - ref) ** 2).mean() / max(float((ref**2).mean()), 1e-30))


def quantize_bundle(
    staging: Path,
    manifest: dict,
    quant: QuantConfig,
    target,
    calib: CalibrationSet,
    profile: RoutingProfile,
    progress: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Quantize the staged bundle in place and return the updated manifest.

    Args:
        staging: The staged fp32 bundle folder.
        manifest: Its manifest (updated in place and returned).
        quant: The quantization configuration.
        target: The target that emitted the bundle.
        calib: Calibration feeds and routed tokens.
        profile: Routing traces (expert importance for mixed precision).
        progress: Step messages.
    """
    graphs = manifest["graphs"]
    dense = dense_scheme(quant)
    if dense != "fp32":
        for name, g in graphs.items():
            if g["kind"] in ("segment", "head"):
                progress(f"quantize {name} ({dense})")
                path = staging / g["file"]
                target.quantize_graph(path, dense, calib.graph_feeds.get(name, []), quant)
                g.pop("external_data", None)  # the quantized graph may have no data file, or another
                g.update(target.graph_files(staging, path))

    executor = get_executor(manifest["target"]["executor"])
    kernels = _Kernels(staging, manifest, target, quant)
    plan = _plan(staging, manifest, quant, executor, calib, profile, progress) if quant.mixed else None

    probes: dict[str, object] = {}
    for layer in manifest["moe_layers"]:
        li = layer["index"]
        matrices = _matrices(layer)
        progress(f"quantize experts of MoE layer {li}")
        groups = [(e, False, calib.expert_tokens.get((li, e["index"]))) for e in layer["experts"]]
        groups += [(e, True, calib.layer_tokens.get(li)) for e in layer.get("shared", [])]
        for record, shared, tokens in groups:
            bits = None if plan is None or shared else plan.bits[(li, record["index"])]
            scheme, nb = _format(quant, bits)
            if shared and quant.mixed and quant.scheme == "fp32":
                scheme, nb = "nbits", 8  # shared experts run on every token: keep them at 8 bits
            base = record.get("kernel", layer["kernel"])
            weights = decode_expert(read_verified(staging, record), record["tensors"])
            act = None
            if scheme == "int8":
                if base not in probes:
                    probe, outs = target.probe_kernel(staging / graphs[base]["file"], matrices)
                    probes[base] = _probe_graph(
                        executor, probe, target.suffix, ["y", *outs], list(graphs[base]["inputs"])
                    )
                tok = tokens if tokens is not None and len(tokens) else calib.layer_tokens[li]
                act = _act_params(probes[base], matrices, tok, quant, weights)
            q = quantize_weights(weights, matrices, scheme, nb, quant.group_size, act, target.int8_weight_max)
            blob, tensors = encode_expert(q)
            path = staging / record["file"]
            path.write_bytes(blob)
            record.update(file_record(staging, path))
            record.update(
                tensors=tensors,
                dtype={"fp16": "float16", "nbits": f"int{nb}"}.get(scheme, "int8"),
                bits={"fp16": 16, "nbits": nb}.get(scheme, 8),
                scheme=scheme if scheme != "nbits" else f"int{nb}-g{quant.group_size}",
                kernel=kernels.get(base, matrices, scheme, nb),
            )

    _drop_unused_kernels(staging, manifest)
    experts = [e for layer in manifest["moe_layers"] for e in layer["experts"]]
    shared = [e for layer in manifest["moe_layers"] for e in layer.get("shared", [])]
    totals = manifest["totals"]
    totals["expert_bytes_bundle"] = sum(e["bytes"] for e in experts)
    totals["shared_expert_bytes"] = sum(e["bytes"] for e in shared)
    totals["graph_bytes"] = sum(graph_bytes(g) for g in graphs.values())
    weights_total = sum(
        int(np.prod(p["shape"]))
        for layer in manifest["moe_layers"]
        for p in layer["expert_shape"]["params"]
        if len(p["shape"]) == 2
        for _ in layer["experts"]
    )
    manifest["quantization"] = {
        # Mixed precision gives each expert its own bit-width: the bundle is not "fp32" even though the
        # uniform scheme asked for stayed at its default.
        "scheme": "mixed" if plan is not None else quant.scheme,
        "dense_scheme": dense,
        "group_size": quant.group_size,
        "calibrator": quant.calibrator,
        "dense_calibrator": "minmax",
        "gates": "fp32",
        "mixed_precision": None
        if plan is None
        else {
            "budget_bytes": plan.budget_bytes,
            "avg_bits_target": quant.avg_bits,
            "avg_bits": plan.avg_bits,
            "expert_bytes": plan.total_bytes,
            "objective": plan.objective,
            "solve_seconds": plan.solve_seconds,
        },
        "avg_expert_bits": sum(
            e["bits"] * sum(int(np.prod(p["shape"])) for p in layer["expert_shape"]["params"] if len(p["shape"]) == 2)
            for layer in manifest["moe_layers"]
            for e in layer["experts"]
        )
        / max(weights_total, 1),
    }
    return manifest


def _drop_unused_kernels(staging: Path, manifest: dict) -> None:
    """Remove fp32 kernels no expert reads any more; a layer then points at its experts' kernel."""
    graphs = manifest["graphs"]
    used = set()
    for layer in manifest["moe_layers"]:
        named = [e["kernel"] for e in (*layer["experts"], *layer.get("shared", [])) if "kernel" in e]
        used.update(named)
        if layer["experts"] and all("kernel" in e for e in layer["experts"]):
            layer["kernel"] = layer["experts"][0]["kernel"]
        used.add(layer["kernel"])
    for name in [n for n, g in graphs.items() if g["kind"] == "expert_kernel" and n not in used]:
        record = graphs.pop(name)
        for entry in (record, *record.get("external_data", [])):
            (staging / entry["file"]).unlink()


def _probe_graph(executor, probe_bytes: bytes, suffix: str, outputs: list[str], inputs: list[str]):
    """Load a probe graph (not a bundle file) with the bundle's executor."""
    import hashlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"probe{suffix}"
        path.write_bytes(probe_bytes)
        record = {
            "file": path.name,
            "bytes": len(probe_bytes),
            "sha256": hashlib.sha256(probe_bytes).hexdigest(),
            "inputs": inputs,
            "outputs": outputs,
        }
        return executor.load(Path(tmp), record)


def _plan(staging, manifest, quant, executor, calib, profile, progress) -> BitPlan:
    """Measure every expert's error at each bit-width and solve for the bit plan."""
    graphs = manifest["graphs"]
    mean_scores = {}
    for traces in profile.traces.values():
        for t in traces:
            for e in np.unique(t.experts):
                mean_scores.setdefault((t.layer, int(e)), []).append(float(t.scores[t.experts == e].mean()))
    importance = routing_importance(manifest, {k: float(np.mean(v)) for k, v in mean_scores.items()})
    choices = []
    rng = np.random.default_rng(0)
    for layer in manifest["moe_layers"]:
        li = layer["index"]
        progress(f"measure quantization error of layer {li} experts at {list(quant.bit_choices)} bits")
        matrices = _matrices(layer)
        shapes = {p["name"]: p["shape"] for p in layer["expert_shape"]["params"]}
        kernel = executor.load(staging, graphs[layer["kernel"]])
        extra = sum(4 * int(np.prod(s)) for n, s in shapes.items() if n not in matrices)
        for record in layer["experts"]:
            key = (li, record["index"])
            weights = decode_expert(read_verified(staging, record), record["tensors"])
            tokens = calib.expert_tokens.get(key)
            if tokens is None or not len(tokens):
                tokens = calib.layer_tokens[li]
            if len(tokens) > ERROR_TOKENS:
                tokens = tokens[rng.choice(len(tokens), ERROR_TOKENS, replace=False)]
            errors, sizes = {}, {}
            for b in quant.bit_choices:
                approx = dict(weights)
                for m in matrices:
                    packed, scales = quantize_nbits(weights[m], b, quant.group_size, m)
                    approx[m] = dequantize_nbits(packed, scales, shapes[m][0], b, quant.group_size)
                errors[b] = _relative_error(kernel, tokens, weights, approx)
                sizes[b] = extra + sum(nbits_bytes(*shapes[m], b, quant.group_size) for m in matrices)
            choices.append(ExpertChoice(key, 0.0, sum(int(np.prod(shapes[m])) for m in matrices), sizes, errors))
    lowest = min(quant.bit_choices)
    weights = balance_tasks(importance, {c.key: c.error[lowest] for c in choices})
    choices = [dataclasses.replace(c, importance=weights.get(c.key, 0.0)) for c in choices]
    plan = plan_expert_bits(choices, quant.bit_choices, quant.weight_budget, quant.avg_bits)
    progress(
        f"mixed precision: {plan.avg_bits:.2f} bits/weight on average, {plan.total_bytes:,} B of experts, "
        f"solved in {plan.solve_seconds:.2f} s"
    )
    return plan


__all__ = ["dense_scheme", "dequantize_int8_per_channel", "quantize_bundle", "quantize_weights"]


def quantize_stage(state: CompileState, cfg: CompileConfig) -> CompileState:
    """Stage ``quantize``: quantize the staged bundle as ``cfg.quant`` says; the manifest is written again."""
    manifest = copy.deepcopy(state.manifest)  # quantize_bundle updates the manifest in place
    s = state
    manifest = quantize_bundle(s.staging, manifest, cfg.quant, s.target, s.calib, s.profile, s.progress)
    write_manifest(state.staging, manifest)
    return dataclasses.replace(state, manifest=manifest)


def _summary(state: CompileState) -> dict:
    m = state.manifest
    return {
        "quantization": m["quantization"],
        "experts": {
            str(layer["index"]): [
                {"scheme": e["scheme"], "bits": e["bits"], "sha256": e["sha256"]} for e in layer["experts"]
            ]
            for layer in m["moe_layers"]
        },
        "totals": m["totals"],
    }


STAGE = Stage("quantize", quantize_stage, _summary, applies=lambda cfg: cfg.quant.active)
