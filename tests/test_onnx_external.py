"""ONNX external data (issue 17): written next to a large graph, listed with it, read only from there.

A graph above the threshold keeps its weights in ``<graph>.onnx.data``; the manifest lists that
file with the graph. The runtime checks every external reference of a graph against that list
before onnxruntime sees the graph and hands onnxruntime the verified bytes from memory, so a graph
that names anything else (a file in the working directory, ``../x``, an absolute path, another
graph's data, bytes past the end) is refused with one line and never read.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from helpers import read_manifest, write_manifest

from edgemoe.bundle.format import sample_input, sha256_file
from edgemoe.bundle.onnx_data import check_external_refs, external_refs
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.errors import BundleError, ConfigError, IntegrityError
from edgemoe.runtime import Session

SCHEMA = Path(__file__).resolve().parents[1] / "edgemoe" / "bundle" / "manifest.schema.json"
GRAPH = "segment_0"


@pytest.fixture(scope="module")
def external_bundle(tmp_path_factory) -> Path:
    """m3vit-micro compiled with a threshold of 0 bytes: every graph with a tensor of 1 KiB or more goes external."""
    out = tmp_path_factory.mktemp("external") / "m3vit-micro"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEMOE_ONNX_EXTERNAL_DATA", "0")
        compile_model(CompileConfig(model="m3vit-micro"), out)
    return out


@pytest.fixture
def ext_copy(external_bundle, tmp_path) -> Path:
    """A private copy of the external-data bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(external_bundle, dst)
    return dst


def _one_line(result) -> str:
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _resign(bundle: Path, name: str) -> None:
    """Put the graph's new size and sha256 into the manifest: the graph passes its own check."""
    m = read_manifest(bundle)
    path = bundle / m["graphs"][name]["file"]
    m["graphs"][name].update(bytes=path.stat().st_size, sha256=sha256_file(path))
    write_manifest(bundle, m)


def _edit_reference(bundle: Path, change) -> None:
    """Apply ``change`` to the external_data entries (a dict) of the graph's first external tensor."""
    import onnx

    path = bundle / "graphs" / f"{GRAPH}.onnx"
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entries = {e.key: e.value for e in tensor.external_data}
    change(entries)
    del tensor.external_data[:]
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    path.write_bytes(model.SerializeToString())
    _resign(bundle, GRAPH)


# -- (a) written, listed, run bit-identical --------------------------------------------------------


def test_external_data_bundle_runs_bit_identical_to_the_inline_one(external_bundle, bundle_factory, run_cli):
    inline = bundle_factory("m3vit-micro")
    m, plain = read_manifest(external_bundle), read_manifest(inline)
    jsonschema.validate(m, json.loads(SCHEMA.read_text()))
    listed = {name: g["external_data"] for name, g in m["graphs"].items() if "external_data" in g}
    assert GRAPH in listed and "segment_2" not in listed  # segment_2 has no tensor of 1 KiB
    for name, files in listed.items():
        assert [f["file"] for f in files] == [f"graphs/{name}.onnx.data"]
        assert files[0]["bytes"] == (external_bundle / files[0]["file"]).stat().st_size
    on_disk = sorted(p.relative_to(external_bundle).as_posix() for p in (external_bundle / "graphs").iterdir())
    files = [g["file"] for g in m["graphs"].values()] + [f["file"] for fs in listed.values() for f in fs]
    assert on_disk == sorted(files)
    # Below the threshold (the default 1 GiB) nothing changes: no data file, no record field.
    assert not any("external_data" in g for g in plain["graphs"].values())
    assert not list((inline / "graphs").glob("*.data"))
    assert m["totals"]["graph_bytes"] > sum(g["bytes"] for g in m["graphs"].values())
    for task in m["tasks"]:
        ext, ref = Session(external_bundle, task), Session(inline, task)
        x = sample_input(ref.input_spec, batch=2, seed=5)
        assert np.array_equal(ext.run(x), ref.run(x)), task
    assert run_cli("inspect", external_bundle, "--check").exit_code == 0


def test_verify_checks_the_data_files(external_bundle, ext_copy, run_cli):
    result = run_cli("verify", external_bundle, "--json", "-q")
    assert result.exit_code == 0 and json.loads(result.stdout)["passed"], result.output
    _flip(ext_copy / "graphs" / "head_depth.onnx.data")
    result = run_cli("verify", ext_copy, "-q")
    assert result.exit_code == IntegrityError.exit_code
    assert "graphs/head_depth.onnx.data fails its sha256 check" in _one_line(result)


def test_the_threshold_must_be_a_byte_count(monkeypatch):
    from edgemoe.targets.onnx.external import EXTERNAL_DATA_THRESHOLD, external_data_threshold

    monkeypatch.delenv("EDGEMOE_ONNX_EXTERNAL_DATA", raising=False)
    assert external_data_threshold() == EXTERNAL_DATA_THRESHOLD == 1 << 30
    monkeypatch.setenv("EDGEMOE_ONNX_EXTERNAL_DATA", "1GB")
    with pytest.raises(ConfigError, match="EDGEMOE_ONNX_EXTERNAL_DATA must be a byte count"):
        external_data_threshold()


# -- (b) a graph pointing into the working directory -----------------------------------------------


def _point_at_cwd(bundle: Path, location: str) -> bytes:
    """Move the graph's largest weight out to ``location`` (relative: onnxruntime's cwd for bytes); return it."""
    import onnx
    from onnx.external_data_helper import set_external_data

    path = bundle / "graphs" / f"{GRAPH}.onnx"
    model = onnx.load(str(path))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    raw = tensor.raw_data
    set_external_data(tensor, location=location, offset=0, length=len(raw))
    tensor.ClearField("raw_data")
    path.write_bytes(model.SerializeToString())
    _resign(bundle, GRAPH)
    return raw


def test_a_graph_reading_from_the_working_directory_is_refused_unopened(micro_bundle, run_cli, tmp_path, monkeypatch):
    """The reported case: onnxruntime read ``weights.bin`` from the cwd, unchecked, and inspect said OK."""
    raw = _point_at_cwd(micro_bundle, "weights.bin")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "weights.bin").write_bytes(raw)  # the very bytes: refused all the same
    monkeypatch.chdir(cwd)
    for command in (("run", micro_bundle, "--task", "semseg"), ("inspect", micro_bundle, "--check")):
        result = run_cli(*command)
        assert result.exit_code == BundleError.exit_code, (command, result.output)
        line = _one_line(result)
        assert f"graphs/{GRAPH}.onnx" in line and "'weights.bin'" in line and "not a file the manifest lists" in line

    # Never opened: as a FIFO with no writer, the file would block whoever opened it for reading.
    (cwd / "weights.bin").unlink()
    os.mkfifo(cwd / "weights.bin")
    env = {k: v for k, v in os.environ.items() if k != "EDGEMOE_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-m", "edgemoe", "run", str(micro_bundle), "--task", "semseg"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == BundleError.exit_code, proc.stderr
    assert "'weights.bin'" in proc.stderr and "Traceback" not in proc.stderr


# -- (c) hostile references and damaged data files -------------------------------------------------

REFERENCES = {
    "parent-dir": (lambda e: e.update(location=f"../graphs/{e['location']}"), "'../graphs/segment_0.onnx.data'"),
    "absolute": (lambda e: e.update(location=f"/tmp/{e['location']}"), "'/tmp/segment_0.onnx.data'"),
    "sub-dir": (lambda e: e.update(location=f"sub/{e['location']}"), "'sub/segment_0.onnx.data'"),
    "another-graphs-data": (lambda e: e.update(location="segment_1.onnx.data"), "'segment_1.onnx.data'"),
    # onnxruntime reads raw process memory at "offset" for this location.
    "ort-memory-address": (lambda e: e.update(location="*/_ORT_MEM_ADDR_/*"), "'\\*/_ORT_MEM_ADDR_/\\*'"),
    "past-the-end": (lambda e: e.update(offset=str(10**9)), "reads bytes 1000000000\\.\\.[0-9]+ of segment_0"),
    "offset-not-a-number": (lambda e: e.update(offset="-4"), "offset '-4', not a byte count"),
    "no-length": (lambda e: e.pop("length"), "without a length"),
}


@pytest.mark.parametrize("case", REFERENCES)
def test_hostile_external_references_are_bundle_errors(ext_copy, run_cli, case):
    import re

    change, message = REFERENCES[case]
    _edit_reference(ext_copy, change)
    for command in (("run", ext_copy, "--task", "semseg"), ("inspect", ext_copy, "--check")):
        result = run_cli(*command)
        assert result.exit_code == BundleError.exit_code, (command, result.output)
        line = _one_line(result)
        assert f"graphs/{GRAPH}.onnx" in line and re.search(message, line), line


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _unlisted(bundle: Path) -> None:
    m = read_manifest(bundle)
    del m["graphs"][GRAPH]["external_data"]  # as an older manifest would be: the reference stays
    write_manifest(bundle, m)


def _escaping_listing(bundle: Path) -> None:
    m = read_manifest(bundle)
    m["graphs"][GRAPH]["external_data"][0]["file"] = "experts/../graphs/segment_0.onnx.data"
    write_manifest(bundle, m)


def _garbled_listing(bundle: Path) -> None:
    m = read_manifest(bundle)
    m["graphs"][GRAPH]["external_data"] = "graphs/segment_0.onnx.data"
    write_manifest(bundle, m)


DATA_FILES = {
    "tampered": (lambda b: _flip(b / "graphs" / f"{GRAPH}.onnx.data"), IntegrityError, "fails its sha256 check"),
    "truncated": (lambda b: _truncate(b / "graphs" / f"{GRAPH}.onnx.data"), IntegrityError, "has 100 bytes, manifest"),
    "missing": (lambda b: (b / "graphs" / f"{GRAPH}.onnx.data").unlink(), IntegrityError, "missing bundle file"),
    "not-listed": (_unlisted, BundleError, "not a file the manifest lists"),
    "listed-outside-its-folder": (_escaping_listing, BundleError, "is not a file next to it"),
    "garbled-listing": (_garbled_listing, BundleError, "external_data must be a list of file records"),
}


@pytest.mark.parametrize("case", DATA_FILES)
def test_damaged_data_files_and_listings_are_refused(ext_copy, run_cli, case):
    damage, error, message = DATA_FILES[case]
    damage(ext_copy)
    for command in (("run", ext_copy, "--task", "semseg"), ("inspect", ext_copy, "--check")):
        result = run_cli(*command)
        assert result.exit_code == error.exit_code, (command, result.output)
        assert message in _one_line(result)


# -- the reference scanner sees every place a tensor can sit ---------------------------------------


def _external_tensor(name: str, shape=(4,)):
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    tensor = numpy_helper.from_array(np.zeros(shape, np.float32), name)
    set_external_data(tensor, location=f"{name}.bin", offset=0, length=4 * int(np.prod(shape)))
    tensor.ClearField("raw_data")
    return tensor


def _placements():
    from onnx import helper

    def graph(**kw):
        return helper.make_graph(kw.pop("nodes", []), "g", [], [], **kw)

    def model(g, **kw):
        return helper.make_model(g, **kw)

    def constant(name):
        return helper.make_node("Constant", [], ["c"], value=_external_tensor(name))

    sparse = helper.make_sparse_tensor(_external_tensor("sparse"), _external_tensor("indices"), [8])
    branch = graph(initializer=[_external_tensor("branch")])
    function = helper.make_function("f", "fn", [], ["c"], [constant("function")], [helper.make_opsetid("", 17)])
    training = model(graph())
    training.training_info.add().initialization.CopyFrom(graph(initializer=[_external_tensor("training")]))
    return {
        "initializer": (model(graph(initializer=[_external_tensor("init")])), {"init.bin"}),
        "constant-node": (model(graph(nodes=[constant("const")])), {"const.bin"}),
        "if-branch": (
            model(graph(nodes=[helper.make_node("If", ["b"], ["y"], then_branch=branch, else_branch=graph())])),
            {"branch.bin"},
        ),
        "sparse-initializer": (model(graph(sparse_initializer=[sparse])), {"sparse.bin", "indices.bin"}),
        "function": (model(graph(), functions=[function]), {"function.bin"}),
        "training-info": (training, {"training.bin"}),
    }


PLACEMENTS = ["initializer", "constant-node", "if-branch", "sparse-initializer", "function", "training-info"]


@pytest.mark.parametrize("where", PLACEMENTS)
def test_external_references_are_found_wherever_the_tensor_sits(where):
    model, locations = _placements()[where]
    data = model.SerializeToString()
    assert {r.location for r in external_refs(data)} == locations
    with pytest.raises(BundleError, match="not a file the manifest lists"):
        check_external_refs({"file": "graphs/g.onnx", "bytes": len(data), "sha256": "0" * 64}, data)


def test_bytes_that_are_not_protobuf_are_a_bundle_error():
    with pytest.raises(BundleError, match=r"graph graphs/g\.onnx is not a readable ONNX model"):
        check_external_refs({"file": "graphs/g.onnx"}, b"\x0a\xff\xff\xff\xff")


def test_onnxruntime_gets_a_table_even_for_a_graph_without_data_files(tmp_path, monkeypatch):
    """Behind edgemoe's own check: onnxruntime resolves references only in the table it is given."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edgemoe.targets.onnx.executor import add_external_data, session_options

    weight = _external_tensor("w", (4, 4))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "y")]
    graph = helper.make_model(helper.make_graph(nodes, "g", io[:1], io[1:], [weight])).SerializeToString()
    (tmp_path / "w.bin").write_bytes(np.ones((4, 4), np.float32).tobytes())
    monkeypatch.chdir(tmp_path)  # where onnxruntime looks for "w.bin" in a graph given as bytes
    x = np.ones((1, 4), np.float32)
    unguarded = ort.InferenceSession(graph, session_options(), providers=["CPUExecutionProvider"])
    assert unguarded.run(None, {"x": x})[0].tolist() == [[4.0] * 4]  # it read w.bin from the cwd
    opts = session_options()
    add_external_data(opts, {}, ort.__version__)
    with pytest.raises(Exception, match="not found"):
        ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"])


def test_a_tools_per_tensor_files_without_lengths_become_the_one_listed_file(tmp_path, monkeypatch):
    """The torch exporter writes a graph above 2 GB as one file per tensor, with no ``length``: normalized."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgemoe.targets.onnx.external import data_file, normalize_graph

    w = np.arange(4096, dtype=np.float32).reshape(64, 64)
    tensor = numpy_helper.from_array(w, "w")
    (tmp_path / "w").write_bytes(tensor.raw_data)  # the exporter's file, named after the tensor
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="w")  # no offset, no length
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [tensor])
    path = tmp_path / "segment_0.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(BundleError, match="without a length"):
        external_refs(path.read_bytes())  # what the runtime would say of it

    shutil.copytree(tmp_path, tmp_path / "small")
    # Above the threshold: the weights go to the graph's one data file, with lengths.
    monkeypatch.setenv("EDGEMOE_ONNX_EXTERNAL_DATA", "0")
    normalize_graph(path)
    refs = external_refs(path.read_bytes())
    assert {r.location for r in refs} == {data_file(path).name} and not (tmp_path / "w").exists()
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]), w)
    # Below it: back inside the graph, the tool's file removed.
    monkeypatch.setenv("EDGEMOE_ONNX_EXTERNAL_DATA", str(10**9))
    small = tmp_path / "small" / "segment_0.onnx"
    normalize_graph(small)
    assert external_refs(small.read_bytes()) == [] and not (small.parent / "w").exists()
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(small)).graph.initializer[0]), w)
