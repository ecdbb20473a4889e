"""The bundle format: the only contract between the compiler and the runtime.

A bundle is a folder::

    manifest.json            what is in the bundle (schema: manifest.schema.json)
    graphs/*.onnx            trunk segments, per-task gates and heads, one kernel per expert shape
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
    except (OSError, ValueError, AttributeError):
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
)


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
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise BundleError(f"garbled manifest {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_TAG:
        raise BundleError(f"not an edgemoe manifest: {path}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {manifest.get('schema_version')!r} is not supported "
            f"(this edgemoe reads version {SCHEMA_VERSION}); recompile the bundle"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"garbled manifest {path}: missing {', '.join(missing)}")
    if len(manifest["segments"]) != len(manifest["moe_layers"]) + 1:
        raise BundleError(f"garbled manifest {path}: segments and MoE layers do not interleave")
    _check_structure(path, manifest)
    return manifest


def _need(path: Path, ok: bool, where: str, what: str) -> None:
    if not ok:
        raise BundleError(f"garbled manifest {path}: {where} must be {what}")


def _check_structure(path: Path, m: dict) -> None:
    """The fields the runtime reads have the types it reads them as (a manifest is an untrusted file).

    The JSON Schema says more; this is what a session relies on before it touches a file, so a
    garbled manifest is one BundleError line instead of a KeyError deep in a run.
    """
    graphs, layers = m["graphs"], m["moe_layers"]
    _need(path, isinstance(graphs, dict) and all(isinstance(g, dict) for g in graphs.values()), "graphs", "an object")
    _need(path, isinstance(layers, list) and all(isinstance(x, dict) for x in layers), "moe_layers", "a list")
    # Names are strings here; whether each is a graph is for the executor (an HLS bundle's are steps
    # of its one accelerator, not files).
    _need(path, isinstance(m["segments"], list) and all(isinstance(g, str) for g in m["segments"]), "segments", "names")
    spec = m["input"]
    _need(path, isinstance(spec, dict) and isinstance(spec.get("shape"), list), "input.shape", "a list")
    _need(path, isinstance(spec.get("dtype"), str), "input.dtype", "a string")
    for li, layer in enumerate(layers):
        where = f"moe_layers[{li}]"
        _need(path, isinstance(layer.get("num_experts"), int), f"{where}.num_experts", "an integer")
        _need(path, isinstance(layer.get("top_k"), int), f"{where}.top_k", "an integer")
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
                        and isinstance(t.get("dtype"), str)
                        and isinstance(t.get("offset"), int)
                        and t["offset"] >= 0
                        and isinstance(t.get("shape"), list)
                        and all(isinstance(d, int) and d >= 0 for d in t["shape"]),
                        f"{at}.tensors",
                        "records of name, dtype, non-negative offset and shape",
                    )
                _need(path, isinstance(e.get("kernel", ""), str), f"{at}.kernel", "a name")
                # A size is what the runtime allocates before the blob's own check: at least a byte count.
                size = e.get("bytes")
                _need(path, isinstance(size, int) and size >= 0, f"{at}.bytes", "a byte count")
                what = f"shared expert {j} of layer {li}"
                if key == "experts":  # each once, within the layer: a duplicate would stand in for another's weights
                    index = e.get("index")
                    if not isinstance(index, int) or not 0 <= index < n:
                        raise BundleError(f"garbled manifest {path}: layer {li} lists expert {index!r} (it has {n})")
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
            raise BundleError(f"garbled manifest {path}: {what} has tensor dtype {t['dtype']!r}") from None
        if t["name"] in names:
            raise BundleError(f"garbled manifest {path}: {what} lists tensor {t['name']} twice")
        names.add(t["name"])
        start = t["offset"]
        end = start + math.prod(t["shape"]) * itemsize
        if end > size:
            raise BundleError(f"garbled manifest {path}: tensor {t['name']} of {what} runs past its {size} bytes")
        spans.append((start, end, t["name"]))
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):  # sorted: any overlap shows in a pair
        if start < end:
            raise BundleError(f"garbled manifest {path}: tensors {a} and {b} of {what} overlap")


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
    try:
        rel, size, digest = record["file"], int(record["bytes"]), str(record["sha256"])
    except (KeyError, TypeError, ValueError):
        raise BundleError(f"garbled manifest entry {record!r}") from None
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise BundleError(f"manifest entry points outside the bundle: {rel}")
    if not path.is_file():
        raise IntegrityError(f"missing bundle file {rel}")
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
    rng = np.random.default_rng(seed)
    if np.dtype(spec["dtype"]).kind in "iu":
        return rng.integers(0, spec.get("high", 2), size=shape, dtype=spec["dtype"])
    return rng.standard_normal(shape).astype(spec["dtype"])
