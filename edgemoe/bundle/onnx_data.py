"""ONNX external data in a bundle: what a graph's tensors read, checked against the manifest.

An ONNX tensor may keep its bytes outside the graph file (``data_location: EXTERNAL`` with a
``location``, ``offset`` and ``length``). onnxruntime resolves such a location itself: against the
graph's folder, or against the current working directory for a graph given as bytes, and it reads
the file unchecked. So a bundle lists each data file with its graph (``graphs.<name>.external_data``:
file, bytes, sha256; the file sits next to the graph), and the runtime reads every reference out of
the graph's verified bytes before onnxruntime sees them: each must name one of the graph's listed
files, exactly, with its byte span inside that file. The files are then read with their size and
sha256 checked and handed to onnxruntime from memory, so it never opens a path itself.

This module reads the protobuf wire format itself, standard library only: a device has onnxruntime
but not the ``onnx`` package.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from ..errors import BundleError
from .format import read_verified

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

# The messages of onnx.proto that can hold a TensorProto, and the fields that lead to one (field
# number -> message). Every place a tensor can sit is walked: graph initializers, node attributes
# (Constant values, If/Loop/Scan bodies), sparse tensors, model-local functions and training graphs.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _TRAINING, _SPARSE, _TENSOR = range(8)
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class _Garbled(Exception):
    """The bytes are not protobuf wire format (or use groups, which onnx.proto never does)."""


@dataclass(frozen=True)
class ExternalRef:
    """One tensor's external data reference, as the graph states it.

    Attributes:
        tensor: The tensor's name.
        location: Its ``location`` entry (a path, relative to the graph's folder, for onnxruntime).
        offset: First byte in that file.
        length: Bytes it reads from there.
    """

    tensor: str
    location: str
    offset: int
    length: int


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Garbled
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """Yield ``(field number, wire type, value)``: an int for varints, a ``(start, end)`` span for bytes."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Garbled
        value = None
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            value = (pos, pos + size)
            pos += size
        else:
            raise _Garbled
        if pos > end:
            raise _Garbled
        yield number, wire, value


def _text(buf: bytes, span: tuple[int, int]) -> str:
    try:
        return buf[span[0] : span[1]].decode("utf-8")
    except UnicodeDecodeError:
        raise _Garbled from None


def _tensor_ref(buf: bytes, start: int, end: int) -> ExternalRef | None:
    """The external reference of one TensorProto, None if its bytes are inline.

    Stricter than onnxruntime on purpose: entries without ``data_location: EXTERNAL`` (which it
    ignores) are checked too, and a key given twice, a missing ``location`` or ``length``, or a
    number that is not plain decimal digits refuses the graph rather than guessing what it reads.
    """
    name, entries, external = "", [], False
    for number, wire, value in _fields(buf, start, end):
        if number == _TENSOR_NAME and wire == _LEN:
            name = buf[value[0] : value[1]].decode("utf-8", "replace")
        elif number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            external |= value == _EXTERNAL
        elif number == _TENSOR_DATA_LOCATION and wire == _LEN:  # packed: no writer does this, but be safe
            pos, stop = value
            while pos < stop:
                location, pos = _varint(buf, pos, stop)
                external |= location == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and wire == _LEN:
            key = val = ""
            for n, w, v in _fields(buf, *value):
                if n == 1 and w == _LEN:
                    key = _text(buf, v)
                elif n == 2 and w == _LEN:
                    val = _text(buf, v)
            entries.append((key, val))
    if not external and not entries:
        return None
    info: dict[str, str] = {}
    for key, val in entries:
        if key in info:
            raise BundleError(f"tensor {name!r} gives external data key {key!r} twice")
        info[key] = val
    if "location" not in info:
        raise BundleError(f"tensor {name!r} has external data without a location")
    if "length" not in info:
        raise BundleError(f"tensor {name!r} has external data in {info['location']!r} without a length")
    numbers = {}
    for key, default in (("offset", "0"), ("length", None)):
        text = info.get(key, default)
        if not (text.isascii() and text.isdigit()):
            raise BundleError(f"tensor {name!r} has external data {key} {text!r}, not a byte count")
        numbers[key] = int(text)
    return ExternalRef(name, info["location"], numbers["offset"], numbers["length"])


def external_refs(graph: bytes) -> list[ExternalRef]:
    """Every external data reference in a serialized ONNX model, wherever its tensor sits.

    Raises:
        BundleError: The bytes are not a protobuf message, or a reference is malformed (no
            location, no length, a key twice, an offset or length that is not a byte count).
    """
    refs = []
    stack = [(_MODEL, 0, len(graph))]  # a stack, not recursion: nested subgraphs come from the file
    while stack:
        kind, start, end = stack.pop()
        if kind == _TENSOR:
            ref = _tensor_ref(graph, start, end)
            if ref is not None:
                refs.append(ref)
            continue
        children = _CHILDREN[kind]
        for number, wire, value in _fields(graph, start, end):
            # A field of the wrong wire type is an unknown field to protobuf too: it skips it.
            if number in children and wire == _LEN:
                stack.append((children[number], *value))
    return refs


def listed_data_files(record: dict) -> dict[str, dict]:
    """The data files a manifest ``graphs`` record lists, by the ``location`` a tensor names them with.

    A data file sits in its graph's folder, so its location is its file name: nothing else matches.

    Raises:
        BundleError: An ``external_data`` entry is not a file record next to the graph, or a name repeats.
    """
    graph = record["file"]
    listed: dict[str, dict] = {}
    entries = record.get("external_data", [])
    if not isinstance(entries, list):
        raise BundleError(f"garbled manifest: external_data of graph {graph} must be a list of files")
    for entry in entries:
        rel = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or posixpath.dirname(rel) != posixpath.dirname(graph):
            raise BundleError(f"garbled manifest: external data {rel!r} of graph {graph} is not a file next to it")
        name = posixpath.basename(rel)
        if not name or name in listed:
            raise BundleError(f"garbled manifest: graph {graph} lists external data {rel!r} twice or unnamed")
        listed[name] = entry
    return listed


def check_external_refs(record: dict, graph: bytes) -> dict[str, dict]:
    """Check a graph's external references against its manifest record, before anything is read.

    Args:
        record: The graph's manifest ``graphs`` entry.
        graph: The graph file's verified bytes.

    Returns:
        The records of the data files the graph reads, by location.

    Raises:
        BundleError: A reference names anything but a file listed with the graph (another file,
            a path outside its folder, an absolute path), reads past the end of the file the
            manifest describes, or is malformed; or the graph is not a protobuf message.
    """
    where = record["file"]
    listed = listed_data_files(record)
    try:
        refs = external_refs(graph)
    except _Garbled:
        raise BundleError(f"graph {where} is not a readable ONNX model") from None
    except BundleError as exc:
        raise BundleError(f"graph {where}: {exc}") from None
    used: dict[str, dict] = {}
    for ref in refs:
        entry = listed.get(ref.location)
        if entry is None:
            raise BundleError(
                f"graph {where}: tensor {ref.tensor!r} reads external data from {ref.location!r}, "
                "which is not a file the manifest lists with the graph (refused: it is read from nowhere else)"
            )
        size = entry.get("bytes")
        if not isinstance(size, int) or ref.offset + ref.length > size:
            raise BundleError(
                f"graph {where}: tensor {ref.tensor!r} reads bytes {ref.offset}..{ref.offset + ref.length} "
                f"of {ref.location}, which has {size} bytes"
            )
        used[ref.location] = entry
    return used


def read_external_data(root, record: dict, graph: bytes) -> dict[str, bytes]:
    """The data files a graph reads, checked against the manifest and read with size and sha256 checked.

    Args:
        root: The bundle folder.
        record: The graph's manifest ``graphs`` entry.
        graph: The graph file's verified bytes.

    Returns:
        Each file's verified bytes by the location the graph names it with (what onnxruntime's
        in-memory external data takes).

    Raises:
        BundleError: See :func:`check_external_refs`.
        IntegrityError: A data file is missing, truncated or fails its sha256.
    """
    return {location: read_verified(root, entry) for location, entry in check_external_refs(record, graph).items()}
