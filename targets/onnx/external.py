"""Writing ONNX external data into a bundle: a large graph's weights go to one file next to it.

protobuf caps a message at 2 GB, so a partition with more weights cannot be one ``.onnx`` file. A
graph above :func:`external_data_threshold` (1 GiB unless ``EDGEMOE_ONNX_EXTERNAL_DATA`` says
otherwise) is saved with its tensors of 1 KiB or more in ``<graph>.onnx.data`` beside it; the
manifest lists that file with the graph (``external_data``: file, bytes, sha256), which is how the
runtime (:mod:`edgemoe.bundle.onnx_data`) knows what the graph may read. Smaller graphs are left as
written, byte for byte, and their records are unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from ...bundle.format import file_record
from ...bundle.onnx_data import external_refs
from ...errors import ConfigError, TargetError

EXTERNAL_DATA_THRESHOLD = 1 << 30
"""Graphs above this many bytes keep their weights in a data file (well below protobuf's 2 GB)."""

THRESHOLD_ENV = "EDGEMOE_ONNX_EXTERNAL_DATA"
"""Environment variable overriding :data:`EXTERNAL_DATA_THRESHOLD` (bytes; tests set it small)."""

# Tensors below this stay inside the graph even when it has a data file (onnx's own default): shapes
# and scalars are read while the graph is optimized, and one read each from a file buys nothing.
TENSOR_MIN_BYTES = 1024


def external_data_threshold() -> int:
    """Graph size in bytes above which weights go to a data file.

    Raises:
        ConfigError: ``EDGEMOE_ONNX_EXTERNAL_DATA`` is set to something that is not a byte count.
    """
    raw = os.environ.get(THRESHOLD_ENV, "").strip()
    if not raw:
        return EXTERNAL_DATA_THRESHOLD
    if not raw.isdigit():
        raise ConfigError(f"{THRESHOLD_ENV} must be a byte count, got {raw!r}")
    return int(raw)


def data_file(path: Path) -> Path:
    """The data file of graph ``path``: ``<name>.onnx.data`` in the same folder."""
    return path.with_name(path.name + ".data")


def save_graph(model, path: Path) -> None:
    """Save a model (weights in memory) to ``path``; above the threshold its weights go to :func:`data_file`.

    Constant-node tensors go too (``convert_attribute``): a large constant would otherwise keep the
    graph above protobuf's limit.
    """
    import onnx

    data = data_file(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    try:
        big = model.ByteSize() > external_data_threshold()
    except Exception:  # google.protobuf's EncodeError: a message past 2 GB cannot even be sized
        big = True
    if big:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=TENSOR_MIN_BYTES,
            convert_attribute=True,
        )
        if data.exists():  # onnx creates it private (0600); a bundle's files are as readable as the graph
            data.chmod(path.stat().st_mode & 0o777)
    else:
        onnx.save_model(model, str(path))


def normalize_graph(path: Path) -> None:
    """Make a graph a tool just wrote follow the bundle's rule for external data.

    The torch exporter writes one file per tensor (named after the tensor) for a model above 2 GB,
    and onnxruntime's quantizers write ``<their output>.data``: such a graph is loaded whole and
    saved again by :func:`save_graph`, and the files it read are removed. A graph with no external
    data and not above the threshold is left untouched, so small bundles stay byte-identical.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    # onnx's own reader, not the runtime's strict check: the torch exporter writes references
    # without a length (a whole file per tensor), which a bundle never holds but a tool may write.
    skeleton = onnx.load(str(path), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in _get_all_tensors(skeleton) if uses_external_data(t)}
    data = data_file(path)
    if not locations and path.stat().st_size <= external_data_threshold():
        data.unlink(missing_ok=True)  # one of an earlier version of this graph (before quantization)
        return
    model = onnx.load(str(path))  # external data from the graph's folder: files this compile wrote
    save_graph(model, path)
    for location in locations - {data.name}:
        # Only plain names in the graph's folder: the tools write nothing else, remove nothing else.
        leftover = path.parent / location
        if location == leftover.name and leftover.is_file():
            leftover.unlink()


def graph_files(root: Path, path: Path) -> dict:
    """The manifest record of a graph file: file, bytes, sha256, and ``external_data`` if it reads any.

    Raises:
        TargetError: The graph reads data from anything but its own data file (a compiler bug).
    """
    record = file_record(root, path)
    locations = sorted({r.location for r in external_refs(path.read_bytes())})
    if not locations:
        return record
    if locations != [data_file(path).name]:
        raise TargetError(f"target onnx: graph {path.name} reads external data from {locations}, not its data file")
    return {**record, "external_data": [file_record(root, data_file(path))]}


def attach_weights(path: Path, weights: dict, inputs: tuple[str, ...]) -> None:
    """Turn the weight inputs of an exported graph into initializers, written into its data file.

    A streamed compile exports a partition with its large weights as graph inputs (named after the
    module's parameters); each is written here from its tensor straight into :func:`data_file`, so
    the weights never exist as a second copy in a protobuf message. A weight the graph only
    transposes (``x @ W.T`` of a linear layer) is written transposed, in blocks, and the Transpose
    node goes, as the exporter's constant folding would have done.

    Args:
        path: The exported graph.
        weights: Tensors by input name (torch tensors, on the CPU).
        inputs: The partition's own inputs (kept as graph inputs).

    Raises:
        TargetError: A weight input has no tensor.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    graph = model.graph
    params = [i.name for i in graph.input if i.name not in inputs]
    data = data_file(path)
    data.unlink(missing_ok=True)
    written = 0
    with data.open("wb") as fh:

        def put(name: str, t, transposed: bool) -> None:
            nonlocal written
            shape = tuple(reversed(t.shape)) if transposed else tuple(t.shape)
            dtype = helper.np_dtype_to_tensor_dtype(t.detach()[:0].numpy().dtype)
            tensor = onnx.TensorProto(name=name, data_type=dtype, dims=shape)
            pad = -fh.tell() % 4096  # page-aligned, as onnx's own writer places large tensors
            fh.write(b"\0" * pad)
            offset = fh.tell()
            if transposed:  # column blocks of t, each written as rows of t.T
                step = max(1, (1 << 24) // max(1, t.shape[0] * t.element_size()))
                for j in range(0, t.shape[1], step):
                    t[:, j : j + step].T.contiguous().numpy().tofile(fh)
            else:
                t.detach().contiguous().numpy().tofile(fh)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(fh.tell() - offset))):
                tensor.external_data.add(key=key, value=value)
            graph.initializer.append(tensor)
            written += 1

        for name in params:
            t = weights.get(name)
            if t is None:
                raise TargetError(
                    f"target onnx: graph {path.name} takes weight '{name}', which the module does not hold"
                )
            t = t.detach()
            uses = [n for n in graph.node if name in n.input]
            folded = [n for n in uses if t.dim() == 2 and _transposes_2d(n)]
            for node in folded:
                put(node.output[0], t, transposed=True)
                graph.node.remove(node)
            if len(folded) < len(uses):
                put(name, t, transposed=False)
    kept = [i for i in graph.input if i.name in inputs]
    del graph.input[:]
    graph.input.extend(kept)
    if not written:
        data.unlink()
    onnx.save_model(model, str(path))


def _transposes_2d(node) -> bool:
    """Whether ``node`` is a Transpose swapping the two axes of a matrix."""
    from onnx import helper

    if node.op_type != "Transpose":
        return False
    perm = [list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"]
    return not perm or perm[0] == [1, 0]
