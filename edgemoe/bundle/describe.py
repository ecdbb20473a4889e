"""Summaries of a bundle for ``edgemoe inspect`` (numpy-free, torch-free)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BundleError
from .format import MANIFEST, graph_bytes, read_manifest, read_verified, verified_path
from .onnx_data import check_external_refs


def describe_bundle(bundle: str | Path, check: bool = False) -> dict:
    """Describe what a bundle holds: partitions, sizes and per-task expert sets.

    Args:
        bundle: Bundle folder.
        check: Also verify every file's size and sha256 (raises on the first bad one).

    Returns:
        A JSON-ready dict (the ``inspect --json`` form for bundles).

    Raises:
        BundleError: Not a bundle, or a manifest garbled where the summary reads it.
        IntegrityError: With ``check``, a file is missing, truncated or fails its sha256.
    """
    root = Path(bundle)
    m = read_manifest(root)
    try:
        if check:
            check_files(root, m)
        return _summary(root, m, check)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        # read_manifest checks what a session reads; a summary also reads what only it shows (blocks,
        # shapes, outputs, totals), so a field missing or of another type there is the manifest's fault.
        what = f"no {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else f"{type(exc).__name__}: {exc}"
        raise BundleError(f"garbled manifest {root / MANIFEST}: {what[:200]}") from None


def _summary(root: Path, m: dict, check: bool) -> dict:
    """The ``inspect --json`` object of a manifest ``read_manifest`` accepted."""
    graphs = [
        {
            "name": name,
            "kind": g["kind"],
            "file": g["file"],
            "bytes": graph_bytes(g),
            "task": g.get("task"),
            "layer": g.get("layer"),
        }
        for name, g in m["graphs"].items()
    ]
    layers = [
        {
            "index": layer["index"],
            "block": layer["block"],
            "num_experts": layer["num_experts"],
            "top_k": layer["top_k"],
            "kernel": layer["kernel"],
            "expert_shape": [layer["expert_shape"]["d_model"], layer["expert_shape"]["hidden"]],
            "experts_in_bundle": [e["index"] for e in layer["experts"]],
            "expert_bytes_in_bundle": sum(e["bytes"] for e in layer["experts"]),
            "experts": [
                {"index": e["index"], "bits": e.get("bits", 32), "bytes": e["bytes"], "scheme": e.get("scheme", "fp32")}
                for e in layer["experts"]
            ],
            "shared_experts": len(layer.get("shared", [])),
            "shared_expert_bytes": sum(e["bytes"] for e in layer.get("shared", [])),
        }
        for layer in m["moe_layers"]
    ]
    expert_bytes = {(layer["index"], e["index"]): e["bytes"] for layer in m["moe_layers"] for e in layer["experts"]}
    tasks = {}
    for name, t in m["tasks"].items():
        kernels = {layer["kernel"] for layer in m["moe_layers"]}
        kernels |= {e["kernel"] for layer in m["moe_layers"] for e in layer.get("shared", [])}
        task_graphs = [*m["segments"], *t["gates"], t["head"], *kernels]
        tasks[name] = {
            "experts": t["experts"],
            "experts_kept": sum(len(s) for s in t["experts"]),
            "expert_bytes": sum(expert_bytes[(li, e)] for li, s in enumerate(t["experts"]) for e in s),
            # HLS bundles have no per-partition graphs: the accelerator's files serve every task.
            "graph_bytes": sum(graph_bytes(m["graphs"][g]) for g in task_graphs if g in m["graphs"])
            or sum(graph_bytes(g) for g in m["graphs"].values()),
            "output": t["output"],
        }
    shared_bytes = sum(e["bytes"] for layer in m["moe_layers"] for e in layer.get("shared", []))
    bundle_bytes = (
        (root / MANIFEST).stat().st_size + sum(g["bytes"] for g in graphs) + sum(expert_bytes.values()) + shared_bytes
    )
    return {
        "kind": "bundle",
        "bundle": str(root),
        "model": {k: m["model"][k] for k in ("name", "family", "granularity", "params")},
        "target": m["target"],
        "device": m["device"]["name"],
        "input": m["input"],
        "pruned": m.get("calibration", {}).get("pruned", False),
        "graphs": graphs,
        "moe_layers": layers,
        "tasks": tasks,
        "totals": m["totals"],
        "bundle_bytes": bundle_bytes,
        "quantization": m.get("quantization", {"scheme": "fp32"}),
        "accuracy": m.get("accuracy"),
        "checked": check,
        **({"hls": _hls_summary(m["hls"])} if "hls" in m else {}),
    }


def check_files(root: Path, m: dict) -> None:
    """Verify every file a manifest lists: size and sha256, and what each ONNX graph reads from outside it.

    An ONNX graph's external data references must name the data files listed with it
    (:mod:`.onnx_data`), which are checked like the rest: a graph that would read a file the
    manifest does not cover fails here as it would when a session loads it.

    Raises:
        BundleError: A graph reads external data the manifest does not list for it.
        IntegrityError: A file is missing, truncated or fails its sha256.
    """
    for record in m["graphs"].values():
        check_graph(root, m, record)
    for layer in m["moe_layers"]:
        for e in (*layer["experts"], *layer.get("shared", [])):
            verified_path(root, e)
    if "file" in m.get("tokenizer", {}):
        verified_path(root, m["tokenizer"])


def check_graph(root: Path, m: dict, record: dict) -> None:
    """Verify a graph (its manifest ``graphs`` ``record``) and the data files it reads, as :func:`check_files`.

    Raises:
        BundleError: The graph reads external data the manifest does not list for it.
        IntegrityError: A file is missing, truncated or fails its sha256.
    """
    target = m.get("target")
    onnx_bundle = isinstance(target, dict) and target.get("executor") == "onnxruntime"
    if onnx_bundle or str(record.get("file", "")).endswith(".onnx"):
        check_external_refs(record, read_verified(root, record))
    else:
        verified_path(root, record)
    for data in record.get("external_data", []):
        verified_path(root, data)


def _hls_summary(hls: dict) -> dict:
    """An HLS bundle's accelerator: its estimate, types and emulator accuracy (``inspect --json`` ``hls``)."""
    return {
        "estimate": hls["estimate"],
        "types": hls["design"]["types"],
        "tiles": hls["design"]["tiles"],
        "accuracy": hls.get("accuracy"),
        "range_report": hls.get("range_report", []),
    }
