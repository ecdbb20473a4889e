"""The bundle format: the only contract between the compiler and the runtime.

A bundle is a folder::

    manifest.json            what is in the bundle (schema: manifest.schema.json)
    graphs/*.onnx            trunk segments, per-task gates and heads, one kernel per expert shape
    graphs/*.onnx.data       a large graph's weights (ONNX external data), listed with its graph
    experts/L<l>_E<e>.bin    expert weights: raw little-endian tensors at the manifest's offsets

Every file is listed in the manifest with its byte size and sha256, and is checked before it
is used. This module needs only numpy and the standard library: the runtime imports it on
devices that have no torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np

from ..errors import BundleError, IntegrityError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FORMAT_TAG = "edgemoe-bundle"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(root: Path, path: Path) -> dict:
    """Manifest entry of a file written into a bundle folder."""
    return {"file": path.relative_to(root).as_posix(), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a folder with a manifest that says it is an edgemoe bundle."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT_TAG
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


_REQUIRED = (
    "format",
    "schema_version",
    "edgemoe_version",
    "model",
    "target",
    "device",
    "input",
    "tasks",
    "segments",
    "moe_layers",
    "graphs",
    "totals",
)
# A manifest larger than this is not one edgemoe wrote (a large MoE's is a few MB): refused before it is read.
MAX_MANIFEST_BYTES = 256 << 20
# Bytes a sample input (``edgemoe run`` without --input) may take: a shape beyond it is a garbled manifest's.
MAX_SAMPLE_BYTES = 1 << 30


def read_manifest(bundle: str | Path) -> dict:
    """Read and sanity-check a bundle's manifest.

    Raises:
        BundleError: The folder or manifest is missing, is not JSON, is not an edgemoe
            manifest, has an unsupported schema version or lacks a required key.
    """
    root = Path(bundle)
    if not root.exists():
        raise BundleError(f"bundle not found: {root}")
    if not root.is_dir():
        raise BundleError(f"not a bundle (not a folder): {root}")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"not a bundle (no {MANIFEST}): {root}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"garbled manifest {path}: {path.stat().st_size} bytes, more than a manifest may have")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise BundleError(f"garbled manifest {path}: {_short(exc, 200)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_TAG:
        raise BundleError(f"not an edgemoe manifest: {path}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {_short(manifest.get('schema_version'))} is not supported "
            f"(this edgemoe reads version {SCHEMA_VERSION}); recompile the bundle"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"garbled manifest {path}: missing {', '.join(missing)}")
    _check_structure(path, manifest)
    return manifest


def _cut(text: str, limit: int = 120) -> str:
    """``text`` cut to ``limit`` characters: names and values from an untrusted file keep an error one short line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: object, limit: int = 60) -> str:
    """``repr`` of an untrusted value for a message (an exception: its text), cut to ``limit`` characters."""
    return _cut(str(value) if isinstance(value, BaseException) else repr(value), limit)


def _need(path: Path, ok: bool, where: str, what: str) -> None:
    if not ok:
        raise BundleError(f"garbled manifest {path}: {_cut(where)} must be {what}")


def _count(value: object) -> bool:
    """A JSON integer that counts something: non-negative, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _numeric_dtype(name: object) -> bool:
    """A numpy dtype name of numbers (what graphs take and blobs hold: no objects, strings or records)."""
    if not isinstance(name, str):
        return False
    try:
        return np.dtype(name).kind in "biuf"
    except (TypeError, ValueError, SyntaxError):  # numpy parses dtype strings with its own grammar
        return False


# The totals a session reports (``edgemoe run``'s statistics).
_TOTALS = ("experts_model", "experts_bundle", "expert_bytes_model")


def _check_structure(path: Path, m: dict) -> None:
    """The fields the runtime reads have the types it reads them as (a manifest is an untrusted file).

    The JSON Schema says more; this is what a session relies on before it touches a file, so a
    garbled manifest is one BundleError line instead of a KeyError deep in a run.
    """
    graphs, layers = m["graphs"], m["moe_layers"]
    _need(path, isinstance(graphs, dict) and all(isinstance(g, dict) for g in graphs.values()), "graphs", "an object")
    for name, g in graphs.items():
        # A graph's data files (ONNX external data) are checked like every other listed file.
        data = g.get("external_data", [])
        _need(
            path,
            isinstance(data, list) and all(isinstance(d, dict) and isinstance(d.get("bytes"), int) for d in data),
            f"graphs.{name}.external_data",
            "a list of file records",
        )
    _need(path, isinstance(layers, list) and all(isinstance(x, dict) for x in layers), "moe_layers", "a list")
    # Names are strings here; whether each is a graph is for the executor (an HLS bundle's are steps
    # of its one accelerator, not files).
    _need(path, isinstance(m["segments"], list) and all(isinstance(g, str) for g in m["segments"]), "segments", "names")
    if len(m["segments"]) != len(layers) + 1:
        raise BundleError(f"garbled manifest {path}: segments and MoE layers do not interleave")
    target = m["target"]
    _need(path, isinstance(target, dict) and isinstance(target.get("executor"), str), "target.executor", "a name")
    totals = m["totals"]
    _need(
        path,
        isinstance(totals, dict) and all(_count(totals.get(k)) for k in _TOTALS),
        "totals",
        f"counts of {', '.join(_TOTALS)}",
    )
    spec = m["input"]
    _need(
        path,
        isinstance(spec, dict)
        and isinstance(spec.get("shape"), list)
        and all(d is None or _count(d) for d in spec["shape"]),
        "input.shape",
        "a list of sizes (null: any)",
    )
    _need(path, _numeric_dtype(spec.get("dtype")), "input.dtype", "a numeric dtype name")
    sample = spec.get("sample_shape")
    _need(
        path,
        sample is None or (isinstance(sample, list) and len(sample) == len(spec["shape"]) and all(map(_count, sample))),
        "input.sample_shape",
        "one size per input dimension",
    )
    high = spec.get("high")
    _need(path, high is None or (_count(high) and high > 0), "input.high", "a positive count")
    for li, layer in enumerate(layers):
        where = f"moe_layers[{li}]"
        _need(path, _count(layer.get("num_experts")), f"{where}.num_experts", "a count")
        _need(path, _count(layer.get("top_k")), f"{where}.top_k", "a count")
        _need(path, isinstance(layer.get("kernel"), str), f"{where}.kernel", "a name")
        n, seen = layer["num_experts"], set()
        for key in ("experts", "shared"):
            records = layer.get(key, [])
            _need(path, isinstance(records, list), f"{where}.{key}", "a list")
            for j, e in enumerate(records):
                at = f"{where}.{key}[{j}]"
                _need(path, isinstance(e, dict) and isinstance(e.get("tensors"), list), f"{at}.tensors", "a list")
                for t in e["tensors"]:
                    _need(
                        path,
                        isinstance(t, dict)
                        and isinstance(t.get("name"), str)
                        and _numeric_dtype(t.get("dtype"))
                        and _count(t.get("offset"))
                        and isinstance(t.get("shape"), list)
                        and all(map(_count, t["shape"])),
                        f"{at}.tensors",
                        "records of name, numeric dtype, non-negative offset and shape",
                    )
                # A routed expert may name its own kernel (else its layer's); a shared one always does.
                kernel = e.get("kernel", "" if key == "experts" else None)
                _need(path, isinstance(kernel, str), f"{at}.kernel", "a name")
                # A size is what the runtime allocates before the blob's own check: at least a byte count.
                size = e.get("bytes")
                _need(path, _count(size), f"{at}.bytes", "a byte count")
                what = f"shared expert {j} of layer {li}"
                if key == "experts":  # each once, within the layer: a duplicate would stand in for another's weights
                    index = e.get("index")
                    if not _count(index) or not 0 <= index < n:
                        raise BundleError(
                            f"garbled manifest {path}: layer {li} lists expert {_short(index)} (it has {n})"
                        )
                    if index in seen:
                        raise BundleError(f"garbled manifest {path}: layer {li} lists expert {index} twice")
                    seen.add(index)
                    what = f"expert {index} of layer {li}"
                _check_tensor_layout(path, what, e["tensors"], size)
    _need(path, isinstance(m["tasks"], dict) and m["tasks"], "tasks", "a non-empty object")
    for name, task in m["tasks"].items():
        where = f"tasks.{name}"
        _need(path, isinstance(task, dict) and isinstance(task.get("head"), str), f"{where}.head", "a name")
        gates = task.get("gates")
        _need(
            path,
            isinstance(gates, list) and len(gates) == len(layers) and all(isinstance(g, str) for g in gates),
            f"{where}.gates",
            "one name per MoE layer",
        )
        kept = task.get("experts")
        _need(
            path,
            isinstance(kept, list)
            and len(kept) == len(layers)
            and all(isinstance(k, list) and all(isinstance(e, int) for e in k) for k in kept),
            f"{where}.experts",
            "one list of expert ids per MoE layer",
        )
        for li, keep in enumerate(kept):
            listed = {e["index"] for e in layers[li].get("experts", [])}
            missing = sorted(set(keep) - listed)
            if missing:
                raise BundleError(
                    f"garbled manifest {path}: task {_short(name)} keeps experts {_short(missing)} of layer {li}, "
                    "which the bundle does not list"
                )
        # Calibration counts rate experts for the cache's eviction policy: one count per expert.
        counts = task.get("expert_counts", [])
        _need(
            path,
            isinstance(counts, list)
            and len(counts) <= len(layers)
            and all(
                isinstance(c, list) and len(c) == layers[li]["num_experts"] and all(map(_number, c))
                for li, c in enumerate(counts)
            ),
            f"{where}.expert_counts",
            "per MoE layer, one non-negative count per expert",
        )
    if m.get("schedule") is not None:
        _check_schedule(path, m)
    tokenizer = m.get("tokenizer", {})
    _need(path, isinstance(tokenizer, dict) and isinstance(tokenizer.get("kind", ""), str), "tokenizer", "an object")
    gen = m.get("generate")
    if gen is not None:
        # Generation graphs take a key/value cache of these shapes: (heads, max_seq, width) per tensor.
        _need(path, isinstance(gen, dict) and _count(gen.get("max_seq")), "generate.max_seq", "a count")
        segments = gen.get("segments")
        _need(
            path,
            isinstance(segments, list)
            and len(segments) == len(m["segments"])
            and all(
                isinstance(seg, dict)
                and isinstance(seg.get("graph"), str)
                and isinstance(seg.get("cache"), list)
                and all(
                    isinstance(c, dict)
                    and isinstance(c.get("input"), str)
                    and isinstance(c.get("output"), str)
                    and isinstance(c.get("shape"), list)
                    and len(c["shape"]) == 3
                    and all(map(_count, c["shape"]))
                    and c["shape"][1] == gen["max_seq"]
                    for c in seg["cache"]
                )
                for seg in segments
            ),
            "generate.segments",
            "one generation graph per trunk segment, with caches of (heads, max_seq, width)",
        )


def _number(value: object, low: float = 0.0, high: float = math.inf) -> bool:
    """A finite JSON number in [low, high] (not a bool; NaN and infinities are not)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return low <= value <= high and value == value and abs(value) != math.inf


def _check_schedule(path: Path, m: dict) -> None:
    """A swap schedule's sizes, expert ids and tables fit the bundle's MoE layers.

    The expert cache, its eviction policy and the prefetchers index them by layer and expert.
    """
    sched, experts = m["schedule"], [layer["num_experts"] for layer in m["moe_layers"]]
    n = len(experts)

    def key(k) -> bool:
        return isinstance(k, list) and len(k) == 2 and all(map(_count, k)) and k[0] < n and k[1] < experts[k[0]]

    def rows(table, low=0.0, high=math.inf, widths=experts) -> bool:  # per layer, one number per expert
        return (
            isinstance(table, list)
            and len(table) == len(widths)
            and all(
                isinstance(row, list) and len(row) == w and all(_number(v, low, high) for v in row)
                for row, w in zip(table, widths, strict=False)
            )
        )

    def widths(w) -> bool:
        return isinstance(w, list) and len(w) == n and all(_count(v) for v in w)

    def predictor(p) -> bool:
        if not isinstance(p, dict) or p.get("name") not in ("pregate", "affinity", "static", "routed"):
            return False
        if p["name"] == "affinity":
            table = p.get("table")
            return (
                widths(p.get("width"))
                and isinstance(table, list)
                and len(table) == max(n - 1, 0)
                and all(rows(t, widths=[experts[li + 1]] * experts[li]) for li, t in enumerate(table))
            )
        if p["name"] == "static":
            order = p.get("order")
            return (
                widths(p.get("width"))
                and isinstance(order, list)
                and len(order) == n
                and all(
                    isinstance(o, list) and all(_count(e) and e < experts[li] for e in o) for li, o in enumerate(order)
                )
            )
        return True

    _need(path, isinstance(sched, dict), "schedule", "an object")
    _need(
        path, _count(sched.get("budget_bytes")) and sched["budget_bytes"] > 0, "schedule.budget_bytes", "a byte count"
    )
    _need(path, isinstance(sched.get("policy"), str), "schedule.policy", "a name")
    _need(path, sched.get("predictor") is None or isinstance(sched["predictor"], str), "schedule.predictor", "a name")
    tasks = sched.get("tasks", {})
    _need(
        path,
        isinstance(tasks, dict) and all(isinstance(t, dict) for t in tasks.values()),
        "schedule.tasks",
        "an object",
    )
    for name, plan in tasks.items():
        where = f"schedule.tasks.{name}"
        resident = plan.get("resident", [])
        _need(
            path, isinstance(resident, list) and all(map(key, resident)), f"{where}.resident", "[layer, expert] pairs"
        )
        _need(path, _count(plan.get("resident_bytes")), f"{where}.resident_bytes", "a byte count")
        _need(
            path, rows(plan.get("probability"), 0.0, 1.0), f"{where}.probability", "per layer, one per expert in [0, 1]"
        )
        recency = plan.get("recency")
        _need(
            path,
            recency is None
            or (
                isinstance(recency, list)
                and len(recency) <= n
                and all(isinstance(r, list) and all(_number(v, 1.0) for v in r) for r in recency)
            ),
            f"{where}.recency",
            "per layer, numbers of at least 1",
        )
        _need(path, plan.get("prefetch") is None or predictor(plan["prefetch"]), f"{where}.prefetch", "a predictor")
        found = plan.get("predictors", {})
        _need(
            path,
            isinstance(found, dict) and all(predictor(p) and p["name"] == k for k, p in found.items()),
            f"{where}.predictors",
            "predictors by name",
        )
    switches = sched.get("task_switch", {})
    _need(
        path,
        isinstance(switches, dict)
        and all(
            isinstance(e, dict) and all(isinstance(e.get(k, []), list) and all(map(key, e.get(k, []))) for k in _SWITCH)
            for e in switches.values()
        ),
        "schedule.task_switch",
        "per task pair, lists of [layer, expert] pairs",
    )


_SWITCH = ("unload", "load", "keep", "drop_cached")


def _check_tensor_layout(path: Path, what: str, tensors: list, size: int) -> None:
    """A blob's tensors have distinct names and disjoint byte ranges inside it.

    Overlapping ranges would let one tensor's bytes be read as another's; a range past the end is
    caught again when the blob is decoded, but a layout is refused whole before anything is read.
    """
    spans, names = [], set()
    for t in tensors:
        try:
            itemsize = np.dtype(t["dtype"]).itemsize
        except TypeError:
            raise BundleError(f"garbled manifest {path}: {what} has tensor dtype {_short(t['dtype'])}") from None
        if t["name"] in names:
            raise BundleError(f"garbled manifest {path}: {what} lists tensor {_cut(t['name'], 60)} twice")
        names.add(t["name"])
        start = t["offset"]
        end = start + math.prod(t["shape"]) * itemsize
        if end > size:
            raise BundleError(
                f"garbled manifest {path}: tensor {_cut(t['name'], 60)} of {what} runs past its {size} bytes"
            )
        spans.append((start, end, t["name"]))
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):  # sorted: any overlap shows in a pair
        if start < end:
            raise BundleError(f"garbled manifest {path}: tensors {_cut(a, 60)} and {_cut(b, 60)} of {what} overlap")


def graph_bytes(record: dict) -> int:
    """Bytes of a listed graph with the data files it reads (``external_data``)."""
    return int(record["bytes"]) + sum(int(d["bytes"]) for d in record.get("external_data", []))


def check_blob_sizes(root: Path, records) -> None:
    """Each listed blob's file exists and has the size its record says (before anything is allocated for it).

    Raises:
        IntegrityError: A file is missing or its size differs from the record.
    """
    for record in records:
        path, rel, size, _digest = _resolve(root, record)
        actual = path.stat().st_size
        if actual != size:
            raise IntegrityError(f"bundle file {rel} has {actual} bytes, manifest says {size} (truncated or replaced)")


def _resolve(root: Path, record: dict) -> tuple[Path, str, int, str]:
    rel, size, digest = (record.get(k) for k in ("file", "bytes", "sha256")) if isinstance(record, dict) else [None] * 3
    if not (isinstance(rel, str) and rel and "\0" not in rel and _count(size) and isinstance(digest, str)):
        raise BundleError(f"garbled manifest entry {_short(record, 120)}: it needs a file, a byte count and a sha256")
    try:
        path = (root / rel).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(f"manifest entry points outside the bundle: {_cut(rel)}")
        if not path.is_file():
            raise IntegrityError(f"missing bundle file {_cut(rel)}")
    except OSError as exc:  # a name too long for the file system, a loop of links
        raise IntegrityError(f"cannot open bundle file {_cut(rel)}: {exc.strerror or exc}") from None
    return path, rel, size, digest


def _check(rel: str, actual_size: int, size: int, actual_digest: str, digest: str) -> None:
    if actual_size != size:
        raise IntegrityError(f"bundle file {rel} has {actual_size} bytes, manifest says {size} (truncated or replaced)")
    if actual_digest != digest:
        raise IntegrityError(f"bundle file {rel} fails its sha256 check (corrupted or replaced)")


def verified_path(root: Path, record: dict) -> Path:
    """Check a listed file's size and sha256 and return its path (for loaders that need a path).

    Raises:
        IntegrityError: The file is missing, has the wrong size (truncated) or the wrong digest.
    """
    path, rel, size, digest = _resolve(root, record)
    actual = path.stat().st_size
    _check(rel, actual, size, sha256_file(path) if actual == size else "", digest)
    return path


def read_verified(root: Path, record: dict) -> bytes:
    """Read a listed file, checking size and sha256 on the very bytes returned.

    Raises:
        IntegrityError: The file is missing, has the wrong size (truncated) or the wrong digest.
    """
    path, rel, size, digest = _resolve(root, record)
    data = path.read_bytes()
    _check(rel, len(data), size, hashlib.sha256(data).hexdigest(), digest)
    return data


def decode_expert(data: bytes, tensors: list[dict]) -> dict[str, np.ndarray]:
    """Split an expert blob into its named tensors (views on ``data``, no copy)."""
    out = {}
    for t in tensors:
        dtype = np.dtype(t["dtype"]).newbyteorder("<")
        count = math.prod(t["shape"])
        end = t["offset"] + count * dtype.itemsize
        if end > len(data):
            raise IntegrityError(f"tensor {t['name']} runs past the end of its expert blob")
        out[t["name"]] = np.frombuffer(data, dtype=dtype, count=count, offset=t["offset"]).reshape(t["shape"])
    return out


def encode_expert(weights: dict[str, np.ndarray]) -> tuple[bytes, list[dict]]:
    """Pack named tensors into one blob (64-byte aligned) and describe them for the manifest."""
    parts, tensors, offset = [], [], 0
    for name, arr in weights.items():
        arr = np.ascontiguousarray(arr)
        pad = (-offset) % 64
        parts.append(b"\0" * pad)
        offset += pad
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        tensors.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset})
        parts.append(raw)
        offset += len(raw)
    return b"".join(parts), tensors


def sample_input(spec: dict, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A deterministic input of the model's input shape.

    The first dynamic dimension becomes ``batch``; later dynamic dimensions (e.g. sequence
    length) take their size from ``spec["sample_shape"]``. Float inputs are standard normal
    (the scale of normalised images); integer inputs are uniform over ``[0, spec["high"])``.
    """
    sample = spec.get("sample_shape") or [1 if d is None else d for d in spec["shape"]]
    shape = [batch if i == 0 and d is None else (sample[i] if d is None else d) for i, d in enumerate(spec["shape"])]
    nbytes = math.prod(shape) * np.dtype(spec["dtype"]).itemsize
    if nbytes > MAX_SAMPLE_BYTES:  # before numpy allocates it: the shape is a manifest's claim
        raise BundleError(f"the bundle's input shape {_short(shape)} makes a {nbytes}-byte sample input; it is garbled")
    rng = np.random.default_rng(seed)
    if np.dtype(spec["dtype"]).kind in "iu":
        return rng.integers(0, spec.get("high", 2), size=shape, dtype=spec["dtype"])
    return rng.standard_normal(shape).astype(spec["dtype"])
