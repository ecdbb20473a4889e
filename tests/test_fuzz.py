"""Fuzz and fault suite (issue 17, items 4 and 6): mutants of every untrusted file edgemoe reads.

Manifests, graphs, checkpoints and input files are mutated (structured mutations guided by the
manifest's JSON Schema, byte flips, truncations, hand-made headers) and fed to the CLI in-process
(``edgemoe run``, ``inspect --check``, ``verify``, ``compile --weights``). Every mutant must end in success or
in its class's documented exit code, with exactly one ``error:`` line and no traceback; never exit 1
(internal error), never hang, never write anything half-way; and the good files must still give the
same output bits afterwards.

The mutants are drawn by hypothesis with ``derandomize=True`` (the same ones on every CI run) and
counted: :func:`test_at_least_500_mutants_ran` checks the total when the whole file ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from edgemoe.cli import cli
from edgemoe.errors import (
    EXIT_CODES,
    BundleError,
    EdgeMoEError,
    InputError,
    IntegrityError,
    ModelError,
    OutputPathError,
)

# Every documented error code; 1 (internal error: an exception nobody turned into a message) is a bug.
ERROR_CODES = frozenset(EXIT_CODES.values()) - {1}
# Mutants run per test, by test name (the total is checked once the whole file ran).
COUNTS: dict[str, int] = {}
# Seconds one mutant may take before it counts as a hang (a run of m3vit-micro takes 0.2 s).
HANG_S = 60

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


def _fuzz_settings(examples: int) -> settings:
    """Reproducible hypothesis settings: no example database, no deadline, the same mutants every run."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class Hung(BaseException):
    """A mutant ran past HANG_S (a BaseException, so no ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    def alarm(_signum, _frame):
        raise Hung(f"a mutant ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_RUNNER = CliRunner()


def _invoke(*args) -> object:
    """The CLI in-process; an exception the CLI did not turn into an exit code fails the test."""
    with _time_limit(HANG_S):
        return _RUNNER.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _check(result, allowed: frozenset[int] | set[int], what: str) -> str | None:
    """Assert an exit in ``allowed`` (0 or documented error codes) with one error line; return it."""
    code = result.exit_code
    assert code in allowed, f"{what}: exit {code}, expected one of {sorted(allowed)}\n{result.stderr}"
    assert code != 1 and "Traceback" not in result.stderr and "internal error" not in result.stderr, (
        f"{what}: {result.stderr}"
    )
    if code == 0:
        return None
    lines = result.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], f"{what}: not one error line: {lines}"
    assert len(errors[0]) < 2000, f"{what}: a {len(errors[0])}-character error line"
    return errors[0]


def _count(name: str, n: int = 1) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + n


def _listing(root: Path, skip: str = "manifest.json") -> dict[str, tuple[int, int]]:
    """Every file under ``root`` but ``skip``, with size and mtime: what a failed command must not change."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        if rel != skip:
            st_ = path.lstat()
            out[rel] = (st_.st_size, st_.st_mtime_ns)
    return out


class Bundle:
    """A private m3vit-micro bundle for one module's mutants, with its pristine state and reference outputs."""

    def __init__(self, root: Path, work: Path):
        self.root, self.work = root, work
        self.manifest_path = root / "manifest.json"
        self.pristine = self.manifest_path.read_bytes()
        self.manifest = json.loads(self.pristine)
        self.listing = _listing(root)
        self.out = work / "out.npy"
        self.reference = {task: self.run_bits(task) for task in self.manifest["tasks"]}
        self.out.unlink()

    def run_bits(self, task: str, *extra) -> bytes:
        """Output bits of a good run of ``task``."""
        if self.out.exists():
            self.out.unlink()
        result = _invoke("run", self.root, "--task", task, "-o", self.out, *extra)
        assert result.exit_code == 0, result.stderr
        return np.load(self.out).tobytes()

    def write_manifest(self, manifest: dict | bytes) -> None:
        self.manifest_path.write_bytes(manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode())

    def restore(self) -> None:
        self.manifest_path.write_bytes(self.pristine)

    def assert_unchanged(self) -> None:
        """Nothing but the manifest we wrote changed, and no run left an output file behind."""
        assert _listing(self.root) == self.listing
        assert not self.out.exists()

    def assert_good(self) -> None:
        """The restored bundle still gives the reference bits (no state leaked between mutants)."""
        self.restore()
        for task, bits in self.reference.items():
            assert self.run_bits(task) == bits, f"task {task} gives other bits after the mutants"
        self.out.unlink()


@pytest.fixture(scope="module")
def fuzz_bundle(bundle_factory, tmp_path_factory) -> Bundle:
    work = tmp_path_factory.mktemp("fuzz")
    root = work / "bundle"
    shutil.copytree(bundle_factory("m3vit-micro"), root)
    return Bundle(root, work)


# -- manifests -------------------------------------------------------------------------------------------

# Values of other types and sizes than a field holds: what a hand-edited or hostile manifest may say.
ODD_VALUES = (
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**31,
    2**63,
    -(2**63),
    10**30,
    -(10**30),
    0.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    "",
    "x",
    "semseg",
    "A" * 100_000,
    "../../../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "..",
    ".",
    "graphs",
    "experts/L0_E0.bin",
    "\u0000",
    "line\nbreak",
    "\u00e9\u6f22",
    [],
    [None],
    [[]],
    [0, 0],
    [-1],
    [2**40, 2**40],
    {},
    {"": None},
    {"file": "/etc/passwd", "bytes": 1, "sha256": "0" * 64},
)


def _paths(node, prefix=()):
    """Every location in a JSON document (root excluded), depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def _at(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _numbers(value) -> list:
    """Numbers near and far from ``value``: off by one, negated, zero, huge."""
    return [value - 1, value + 1, -value - 1, 0, value * 2**20 + 1, 2**62, 2**64 + 1, 10**100, -(2**63)]


def _strings(value: str) -> list[str]:
    """Strings derived from ``value``: empty, escaped upward, absolute, longer, a sibling's name."""
    return [
        "",
        value + "x",
        "../" + value,
        "../../" + value,
        "/" + value.lstrip("/"),
        value + "/..",
        value * 1000,
        value.upper(),
        value[:-1],
        value.replace("0", "1") if "0" in value else value + "0",
    ]


def mutate(doc: dict, data, under: str | None = None) -> tuple[str, dict]:
    """Apply one structured mutation drawn from ``data`` to ``doc`` (in place; within ``doc[under]``); describe it.

    The kinds: delete a key or list item, change a value's type, move a number (negative, huge,
    off by one), change a string (empty, ``..``, absolute, huge), duplicate a list item (duplicate
    ids), swap two items or two keys' values (swapped indices), rename a key (unknown names).
    """
    paths = [p for p in _paths(doc) if under is None or p[0] == under]
    path = data.draw(st.sampled_from(paths), label="path")
    parent, key = _at(doc, path[:-1]), path[-1]
    value = parent[key]
    kinds = ["delete", "retype", "duplicate", "swap"]
    if isinstance(value, int | float) and not isinstance(value, bool):
        kinds.append("number")
    if isinstance(value, str):
        kinds.append("string")
    if isinstance(parent, dict):
        kinds.append("rename")
    kind = data.draw(st.sampled_from(kinds), label="kind")
    if kind == "delete":
        del parent[key]
    elif kind == "retype":
        parent[key] = data.draw(st.sampled_from(ODD_VALUES), label="value")
    elif kind == "number":
        parent[key] = data.draw(st.sampled_from(_numbers(value)), label="value")
    elif kind == "string":
        parent[key] = data.draw(st.sampled_from(_strings(value)), label="value")
    elif kind == "duplicate":
        if isinstance(parent, list):
            parent.insert(data.draw(st.integers(0, len(parent)), label="at"), json.loads(json.dumps(value)))
        else:
            others = [k for k in parent if k != key] or [key]
            parent[data.draw(st.sampled_from(others), label="onto")] = json.loads(json.dumps(value))
    elif kind == "swap":
        others = [k for k in (range(len(parent)) if isinstance(parent, list) else parent) if k != key] or [key]
        other = data.draw(st.sampled_from(others), label="with")
        parent[key], parent[other] = parent[other], parent[key]
    else:  # rename
        names = ["zz-unknown", "", "semseg", "depth", "segment_0", "../x", "new\nline", str(key) + "2"]
        new = data.draw(st.sampled_from(names), label="name")
        parent[new] = parent.pop(key)
    return f"{kind} {'/'.join(map(str, path))}", doc


# Exit codes each command may give for a bundle it is handed: success or the classes a bundle can cause.
INSPECT_CODES = frozenset({0, BundleError.exit_code, IntegrityError.exit_code})
RUN_CODES = frozenset({0, 4, BundleError.exit_code, IntegrityError.exit_code, 8, 9, 11, 12})


def _run_mutant(fz: Bundle, what: str, task: str = "semseg", inspect: bool = True, options=()) -> tuple[int, ...]:
    """``inspect --check`` and ``run`` on the bundle as it is now; the checks of one mutant."""
    codes = []
    if inspect:
        result = _invoke("inspect", fz.root, "--check", "--json")
        _check(result, INSPECT_CODES, f"inspect --check after {what}")
        codes.append(result.exit_code)
    result = _invoke("run", fz.root, "--task", task, "-o", fz.out, *options)
    _check(result, RUN_CODES, f"run {' '.join(options)} after {what}")
    if result.exit_code:
        assert not fz.out.exists(), f"run after {what} failed but wrote {fz.out}"
    elif fz.out.exists():
        fz.out.unlink()
    codes.append(result.exit_code)
    return tuple(codes)


@_fuzz_settings(150)
@given(data=st.data())
def test_structured_manifest_mutants(fuzz_bundle, data):
    fz = fuzz_bundle
    what, mutant = mutate(json.loads(fz.pristine), data)
    fz.write_manifest(mutant)
    try:
        _run_mutant(fz, what, task=data.draw(st.sampled_from(["semseg", "depth"]), label="task"))
        fz.assert_unchanged()
    finally:
        fz.restore()
    _count("manifest-structured")


@pytest.fixture(scope="module")
def scheduled_bundle(bundle_factory, tmp_path_factory) -> Bundle:
    """m3vit-micro with a swap schedule (``compile --memory-budget``): budget, policy, predictors, task switches."""
    work = tmp_path_factory.mktemp("fuzz-scheduled")
    shutil.copytree(bundle_factory("m3vit-micro", memory_budget="50%"), work / "bundle")
    return Bundle(work / "bundle", work)


# Run options that make a session read each part of a schedule.
SCHEDULE_OPTIONS = [
    (),
    ("--prefetch", "static"),
    ("--prefetch", "affinity"),
    ("--prefetch", "pregate"),
    ("--prefetch", "plan"),
    ("--policy", "lru", "--memory-budget", "30%"),
]


@pytest.mark.filterwarnings("ignore::edgemoe.swap.budget.ThrashWarning")  # small budgets are among the mutants
@_fuzz_settings(70)
@given(data=st.data())
def test_structured_schedule_mutants(scheduled_bundle, data):
    """The swap schedule: what the expert cache, its eviction policy and the prefetchers read."""
    fz = scheduled_bundle
    what, mutant = mutate(json.loads(fz.pristine), data, under="schedule")
    fz.write_manifest(mutant)
    try:
        task = data.draw(st.sampled_from(["semseg", "depth"]), label="task")
        options = data.draw(st.sampled_from(SCHEDULE_OPTIONS), label="options")
        _run_mutant(fz, what, task=task, inspect=False, options=options)
        fz.assert_unchanged()
    finally:
        fz.restore()
    _count("schedule")


@_fuzz_settings(12)
@given(data=st.data())
def test_verify_on_mutated_model_records(fuzz_bundle, data):
    """``verify`` rebuilds the source model from the manifest's ``model`` record: its config is untrusted too."""
    fz = fuzz_bundle
    what, mutant = mutate(json.loads(fz.pristine), data, under="model")
    fz.write_manifest(mutant)
    try:
        result = _invoke("verify", fz.root, "--samples", "1", "-q")
        _check(result, ERROR_CODES | {0}, f"verify after {what}")
        fz.assert_unchanged()
    finally:
        fz.restore()
    _count("verify")


# Per JSON type, a value of another type (what a schema-guided type change writes).
OTHER_TYPE = {
    "integer": "12",
    "number": "1.5",
    "string": 7,
    "boolean": "true",
    "array": {"0": 1},
    "object": [1, 2],
    "null": 0,
}


def _resolve_ref(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def schema_mutations(schema: dict, doc, node=None, path=(), pattern=()):
    """Mutations the manifest's JSON Schema suggests, as (kind, path, value, pattern): delete each required
    key, give each typed field a value of another type, put numbers with a minimum just below it.

    ``pattern`` is the path with list indices and free keys (graph and task names) as ``*``.
    """
    node = _resolve_ref(schema, schema if node is None else node)
    for part in node.get("allOf", []):
        yield from schema_mutations(schema, doc, part, path, pattern)
    declared = node.get("type")
    if isinstance(declared, str) and path:
        yield ("retype", path, OTHER_TYPE[declared], pattern)
        if declared in ("integer", "number") and "minimum" in node:
            yield ("below-minimum", path, node["minimum"] - 1, pattern)
    if "const" in node and path:
        yield ("not-const", path, f"{node['const']}-other", pattern)
    if isinstance(doc, dict):
        for key in node.get("required", []):
            if key in doc:
                yield ("delete", (*path, key), None, (*pattern, key))
        props = node.get("properties", {})
        extra = node.get("additionalProperties")
        for key, value in doc.items():
            if key in props:
                yield from schema_mutations(schema, value, props[key], (*path, key), (*pattern, key))
            elif isinstance(extra, dict):
                yield from schema_mutations(schema, value, extra, (*path, key), (*pattern, "*"))
    elif isinstance(doc, list) and isinstance(node.get("items"), dict):
        for i, value in enumerate(doc):
            yield from schema_mutations(schema, value, node["items"], (*path, i), (*pattern, "*"))


def _schema_cases(manifest: dict) -> list[tuple[str, tuple, object]]:
    """The schema's mutations of ``manifest``, one per kind and location pattern (list items repeat one
    shape: the 16 experts' records need not be mutated 16 times; the structured mutants pick any)."""
    schema = json.loads((Path(__file__).parents[1] / "edgemoe" / "bundle" / "manifest.schema.json").read_text())
    cases: dict[tuple, tuple] = {}
    for kind, path, value, pattern in schema_mutations(schema, manifest):
        cases.setdefault((kind, pattern), (kind, path, value))
    return list(cases.values())


def test_schema_guided_manifest_mutants(fuzz_bundle):
    """Every required key deleted, every typed field retyped, every minimum undercut (per location pattern)."""
    fz = fuzz_bundle
    cases = _schema_cases(fz.manifest)
    assert len(cases) > 150
    for kind, path, value in cases:
        mutant = json.loads(fz.pristine)
        parent = _at(mutant, path[:-1])
        if kind == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        fz.write_manifest(mutant)
        try:
            _run_mutant(fz, f"{kind} {'/'.join(map(str, path))}")
            fz.assert_unchanged()
        finally:
            fz.restore()
        _count("manifest-schema")
    fz.assert_good()


def _raw_manifest_mutants(pristine: bytes) -> list[tuple[str, bytes]]:
    """Byte-level damage to manifest.json: truncations, flips, encodings, nesting."""
    rng = np.random.default_rng(17)
    out = [(f"truncated at {n}", pristine[:n]) for n in (0, 1, 2, len(pristine) // 3, len(pristine) - 1)]
    for i in range(24):
        data = bytearray(pristine)
        for pos in rng.integers(0, len(data), size=1 + i % 4):
            data[pos] ^= 1 << int(rng.integers(0, 8))
        out.append((f"bit flips #{i}", bytes(data)))
    out += [
        ("invalid utf-8", b"\xff\xfe" + pristine),
        ("utf-16", pristine.decode().encode("utf-16")),
        ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000),
        ("object nested 100000 deep", b'{"a":' * 100_000 + b"1" + b"}" * 100_000),
        ("a list", b"[" + pristine + b"]"),
        ("a string", json.dumps(pristine.decode()).encode()),
        ("null", b"null"),
        ("NaN", b"NaN"),
        ("two documents", pristine + pristine),
        ("huge number", pristine.replace(b'"schema_version": 1', b'"schema_version": 1' + b"0" * 5000)),
        ("NUL bytes", pristine.replace(b'"graphs"', b'"gra\x00phs"')),
    ]
    return out


def test_raw_manifest_mutants(fuzz_bundle):
    fz = fuzz_bundle
    for what, data in _raw_manifest_mutants(fz.pristine):
        fz.write_manifest(data)
        try:
            _run_mutant(fz, what)
            fz.assert_unchanged()
        finally:
            fz.restore()
        _count("manifest-raw")
    # A manifest of gigabytes is refused on its size, before it is read (a sparse file: nothing is written).
    with open(fz.manifest_path, "r+b") as f:
        f.truncate(300 << 20)
    try:
        result = _invoke("run", fz.root, "--task", "semseg")
        assert "more than a manifest may have" in _check(result, {BundleError.exit_code}, "a 300 MB manifest")
        _count("manifest-raw")
    finally:
        fz.restore()
    fz.assert_good()


# -- graphs and expert blobs -----------------------------------------------------------------------------


def damage(data: bytes, draw) -> tuple[str, bytes]:
    """One kind of damage to a file's bytes: bit flips, truncation, zeroed or inserted ranges, junk, emptiness."""
    kind = draw(st.sampled_from(["flip", "truncate", "zero", "insert", "append", "empty", "head"]), label="damage")
    n = len(data)
    if kind == "flip":
        out = bytearray(data)
        for pos in draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=8), label="at"):
            out[pos] ^= draw(st.integers(1, 255), label="xor")
        return f"flipped bytes of {n}", bytes(out)
    if kind == "truncate":
        cut = draw(st.integers(0, n - 1), label="cut")
        return f"cut to {cut} of {n} bytes", data[:cut]
    if kind == "zero":
        start = draw(st.integers(0, n - 1), label="start")
        end = min(n, start + draw(st.integers(1, 4096), label="length"))
        return f"bytes {start}:{end} zeroed", data[:start] + bytes(end - start) + data[end:]
    if kind == "insert":
        at = draw(st.integers(0, n), label="at")
        return f"{at} bytes repeated at {at}", data[:at] + data[:at] + data[at:]
    if kind == "append":
        return "junk appended", data + draw(st.binary(min_size=1, max_size=64), label="junk")
    if kind == "empty":
        return "emptied", b""
    return "only its first 64 bytes", data[:64]


def _files(fz: Bundle) -> list[tuple[str, dict]]:
    """(path in the manifest, record) of every graph and expert blob."""
    out = [(f"graphs/{name}", g) for name, g in fz.manifest["graphs"].items()]
    for li, layer in enumerate(fz.manifest["moe_layers"]):
        out += [(f"moe_layers/{li}/experts/{j}", e) for j, e in enumerate(layer["experts"])]
    return out


@contextlib.contextmanager
def _replaced(path: Path, data: bytes):
    """``path`` holds ``data`` meanwhile; then its bytes and mtime are put back."""
    before, st_ = path.read_bytes(), path.stat()
    path.write_bytes(data)
    try:
        yield
    finally:
        path.write_bytes(before)
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns))


@_fuzz_settings(60)
@given(data=st.data())
def test_damaged_graphs_and_blobs(fuzz_bundle, data):
    """Damaged files fail their sha256 (exit 6); with the sha256 rewritten to match, the graph parser and the
    expert decoder get the garbage themselves and must still answer with one line of the right class."""
    fz = fuzz_bundle
    where, record = data.draw(st.sampled_from(_files(fz)), label="file")
    path = fz.root / record["file"]
    what, garbage = damage(path.read_bytes(), data.draw)
    fix_sha = data.draw(st.booleans(), label="sha256 rewritten")
    what = f"{where} {what}" + (" (sha256 rewritten)" if fix_sha else "")
    task = data.draw(st.sampled_from(list(fz.manifest["tasks"])), label="task")
    graph = where.startswith("graphs")
    with _replaced(path, garbage):
        if fix_sha:
            mutant = json.loads(fz.pristine)
            entry = _at(mutant, [int(p) if p.isdigit() else p for p in where.split("/")])
            entry.update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
            fz.write_manifest(mutant)
        try:
            codes = _run_mutant(fz, what, task=task)
        finally:
            fz.restore()
    if not fix_sha:
        assert codes[0] == IntegrityError.exit_code, what
        if graph:  # loaded at session start if the task has it (trunk and kernels: every task)
            assert codes[1] == (IntegrityError.exit_code if record.get("task") in (None, task) else 0), what
        else:  # sizes are checked at session start, bytes when the expert is first routed to
            assert codes[1] in (0, IntegrityError.exit_code), what
    elif not graph and len(garbage) < record["bytes"]:
        assert codes == (BundleError.exit_code, BundleError.exit_code), what  # its tensors run past its end
    fz.assert_unchanged()
    _count("graphs-and-blobs")


def test_graph_records_pointing_at_other_graphs(fuzz_bundle):
    """A record naming another (intact, checked) graph: the runtime gets graphs that do not fit together."""
    fz = fuzz_bundle
    names = list(fz.manifest["graphs"])
    for a in names:
        for b in names:
            if a >= b:
                continue
            mutant = json.loads(fz.pristine)
            graphs = mutant["graphs"]
            for key in ("file", "bytes", "sha256"):
                graphs[a][key], graphs[b][key] = graphs[b][key], graphs[a][key]
            fz.write_manifest(mutant)
            try:
                task = graphs[a].get("task") or graphs[b].get("task") or "semseg"
                _run_mutant(fz, f"graphs {a} and {b} swapped", task=task, inspect=False)
            finally:
                fz.restore()
            _count("graph-swaps")
    fz.assert_unchanged()
    fz.assert_good()


# -- checkpoints ------------------------------------------------------------------------------------------


class WeightsAccepted(EdgeMoEError):
    """Raised in place of the compile's next pass once the weights loaded: the mutant was accepted."""

    exit_code = 99


CHECKPOINT_CODES = frozenset({ModelError.exit_code, WeightsAccepted.exit_code})


class Checkpoint(dict):
    """A dict with a short repr: hypothesis prints its arguments when a mutant fails."""

    def __repr__(self) -> str:
        return f"Checkpoint({self['work']})"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, fuzz_bundle):
    """m3vit-micro's weights as safetensors (header, data) and as a torch file, and the digest they load to."""
    from safetensors.torch import save_file

    from edgemoe.models import resolve_model

    work = tmp_path_factory.mktemp("checkpoints")
    model = resolve_model("m3vit-micro").build()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(work / "w.safetensors"))
    raw = (work / "w.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    import torch

    torch.save(state, work / "w.pt")
    return Checkpoint(
        work=work,
        header=json.loads(raw[8 : 8 + n]),
        data=raw[8 + n :],
        pt=(work / "w.pt").read_bytes(),
        sha256=fuzz_bundle.manifest["model"]["source"]["state_sha256"],
    )


def safetensors_bytes(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the JSON header (space-padded to 8), the data."""
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@contextlib.contextmanager
def _stop_after_loading():
    """Compiles stop right after their weights loaded (and passed the finite check), with exit 99."""
    from edgemoe.passes import profile_routing

    def accepted(captured, *_args, **_kwargs):
        raise WeightsAccepted(f"weights accepted: {captured.source['state_sha256']}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(profile_routing, "profile_routing", accepted)  # what the profile stage calls
        yield


def _compile_mutant(work: Path, name: str, data: bytes, what: str, weights_format: str = "edgemoe") -> str | None:
    """``compile m3vit-micro --weights`` on the bytes; nothing may be left at the output."""
    ckpt = work / name
    ckpt.write_bytes(data)
    out = work / "out"
    with _stop_after_loading():
        result = _invoke(
            "compile", "m3vit-micro", "--weights", ckpt, "--weights-format", weights_format, "-o", out, "-q"
        )
    line = _check(result, CHECKPOINT_CODES, what)
    assert not out.exists() and not [p for p in work.iterdir() if p.name.startswith(".out.")], what
    return line


def test_a_good_checkpoint_loads_to_the_same_bits(checkpoint):
    work = checkpoint["work"]
    for name, data in (("w.safetensors", safetensors_bytes(checkpoint["header"], checkpoint["data"])),
                       ("w.pt", checkpoint["pt"])):  # fmt: skip
        line = _compile_mutant(work, name, data, f"the good {name}")
        assert line == f"error: weights accepted: {checkpoint['sha256']}", line


DTYPES = ["F16", "BF16", "F64", "I32", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "XYZ", "", 7, None]


def mutate_safetensors(header: dict, data: bytes, draw) -> tuple[str, bytes]:
    """One structured mutation of a safetensors file: its length field, JSON, a tensor's offsets, dtype or
    shape, a key named twice, the metadata, or the data area."""
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    name = draw(st.sampled_from(names), label="tensor")
    rec = header[name]
    begin, end = rec["data_offsets"]
    kind = draw(
        st.sampled_from(
            ["length", "json", "offsets", "dtype", "shape", "twice", "rename", "delete", "metadata", "data", "extra"]
        ),
        label="kind",
    )
    if kind == "length":
        text = json.dumps(header, separators=(",", ":")).encode()
        padded = len(text) + (-len(text) % 8)
        choices = [0, 1, 7, padded - 1, padded + 8, padded + len(data), 2**32, 2**63 - 1, 2**64 - 1]
        length = draw(st.sampled_from(choices), label="length")
        return f"header length {length}", safetensors_bytes(header, data, length)
    if kind == "json":
        text = json.dumps(header, separators=(",", ":")).encode()
        choices = [text[: len(text) // 2], b"[]", b"null", b"{", b'{"a":1}', b"\xff\xfe{}", b"[" * 5000 + b"]" * 5000]
        choices += [text.replace(b"{", b"[", 1), text.replace(b'"', b"'"), text + b"}"]
        return "garbled header JSON", safetensors_bytes(draw(st.sampled_from(choices), label="text"), data)
    if kind == "offsets":
        other = header[draw(st.sampled_from(names), label="other")]["data_offsets"]
        choices = [[end, begin], [begin, end + 4], [begin, end - 4], [other[0], other[0] + end - begin], [0, len(data)],
                   [begin, 2**64 - 1], [-1, end], [str(begin), end], [begin], [begin, end, end], other]  # fmt: skip
        rec["data_offsets"] = draw(st.sampled_from(choices), label="offsets")
        return f"{name} offsets {rec['data_offsets']}", safetensors_bytes(header, data)
    if kind == "dtype":
        rec["dtype"] = draw(st.sampled_from(DTYPES), label="dtype")
        return f"{name} dtype {rec['dtype']!r}", safetensors_bytes(header, data)
    if kind == "shape":
        shape = rec["shape"]
        choices = [[], [0], [-1], [2**62, 4], [*shape, 1], shape[::-1], [math.prod(shape)], [math.prod(shape) + 1],
                   [1, *shape], "4", [2.0] * len(shape)]  # fmt: skip
        rec["shape"] = draw(st.sampled_from(choices), label="shape")
        return f"{name} shape {rec['shape']!r}", safetensors_bytes(header, data)
    if kind == "twice":  # JSON parsers keep the last of a key named twice, silently
        other = draw(st.sampled_from(names), label="other")
        text = json.dumps(header, separators=(",", ":"))
        entry = f'"{name}":' + json.dumps(header[other], separators=(",", ":"))
        return f"{name} named twice", safetensors_bytes((text[:-1] + "," + entry + "}").encode(), data)
    if kind == "rename":
        header[draw(st.sampled_from([name + ".x", "", "__metadata__x", "../" + name]), label="to")] = header.pop(name)
        return f"{name} renamed", safetensors_bytes(header, data)
    if kind == "delete":
        del header[name]
        return f"{name} deleted", safetensors_bytes(header, data)
    if kind == "metadata":
        choices = [{"format": "edgemoe-int8-rows"}, {"format": 7}, [], "pt", {"format": "pt", "x": {"y": 1}}]
        header["__metadata__"] = draw(st.sampled_from(choices), label="metadata")
        return f"metadata {header['__metadata__']!r}", safetensors_bytes(header, data)
    if kind == "extra":
        header[name + "_extra"] = dict(rec)
        return f"{name} listed again as {name}_extra", safetensors_bytes(header, data)
    what, garbage = damage(data, draw)
    return f"data area {what}", safetensors_bytes(header, garbage)


@_fuzz_settings(60)
@given(data=st.data())
def test_mutated_safetensors_checkpoints(checkpoint, data):
    what, blob = mutate_safetensors(checkpoint["header"], checkpoint["data"], data.draw)
    _compile_mutant(checkpoint["work"], "m.safetensors", blob, what)
    _count("checkpoints")


@_fuzz_settings(40)
@given(data=st.data())
def test_damaged_torch_checkpoints(checkpoint, data):
    what, blob = damage(checkpoint["pt"], data.draw)
    weights_format = data.draw(st.sampled_from(["edgemoe", "m3vit"]), label="format")
    _compile_mutant(checkpoint["work"], "m.pt", blob, f"torch file {what}", weights_format)
    _count("checkpoints")


def _torch_bytes(state: dict, legacy: bool = False) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _zip_with(data: bytes, member_suffix: str, change) -> bytes:
    """A copy of a zip archive whose member ending in ``member_suffix`` is ``change(its bytes)`` (stored)."""
    import io
    import zipfile

    src, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            dst.writestr(info.filename, change(body) if info.filename.endswith(member_suffix) else body)
    return out.getvalue()


def _key_twice_cases(checkpoint) -> list[tuple[str, str, bytes, str]]:
    """(what, file name, bytes, the key named twice): a safetensors header, torch zip and legacy pickles."""
    import torch

    header, data = checkpoint["header"], checkpoint["data"]
    names = sorted(k for k in header if k != "__metadata__")
    first, second = names[0], names[1]
    # The second entry reuses the first one's name; both records stay valid (JSON keeps the last).
    text = json.dumps(header, separators=(",", ":")).replace(f'"{second}":', f'"{first}":', 1).encode()
    state = {k: torch.zeros(2) for k in ("aa.weight", "bb.weight")}
    rename = lambda body: body.replace(b"bb.weight", b"aa.weight")  # noqa: E731  same length: the pickle stays whole
    return [
        ("safetensors header", "w.safetensors", safetensors_bytes(text, data), first),
        ("torch zip pickle", "w.pt", _zip_with(_torch_bytes(state), "data.pkl", rename), "aa.weight"),
        ("torch legacy pickle", "w.pt", rename(_torch_bytes(state, legacy=True)), "aa.weight"),
        (
            "torch zip pickle inside a training checkpoint",
            "w.pth",
            _zip_with(_torch_bytes({"epoch": 3, "state_dict": state, "optimizer": {}}), "data.pkl", rename),
            "aa.weight",
        ),
    ]


def test_a_key_named_twice_is_refused_by_name(checkpoint):
    """Issue 17 item 4: each loader would keep one of two same-named tensors silently; exit 3 names the key."""
    for what, name, blob, key in _key_twice_cases(checkpoint):
        line = _compile_mutant(checkpoint["work"], name, blob, what)
        assert f"names {key!r} twice" in line, (what, line)


def test_a_safetensors_shard_naming_a_key_twice_is_refused(checkpoint, tmp_path):
    from edgemoe.models.hf.checkpoint import weight_files

    _what, _name, blob, key = _key_twice_cases(checkpoint)[0]
    (tmp_path / "model.safetensors").write_bytes(blob)
    with pytest.raises(ModelError, match=f"names '{key}' twice"):
        weight_files(tmp_path)


def test_an_m3vit_checkpoint_naming_a_tensor_twice_under_two_spellings_is_refused(checkpoint):
    import torch

    from edgemoe.models.m3vit import CONFIGS, build_m3vit

    model = build_m3vit(CONFIGS["m3vit-micro"])
    state = {"module.backbone." + k: v for k, v in model.state_dict().items()}
    # M3ViT's spelling beside edgemoe's: both are renamed to patch_embed.weight.
    state["module.backbone.patch_embed.proj.weight"] = torch.zeros_like(model.patch_embed.weight)
    line = _compile_mutant(checkpoint["work"], "c.pth", _torch_bytes({"state_dict": state}), "two spellings", "m3vit")
    assert "names patch_embed.weight twice" in line


def test_wrong_gate_widths_and_dtypes_name_their_keys(checkpoint):
    """A gate of the wrong width used to fail as "Error(s) in loading state_dict for M3ViT:" and nothing after."""
    import torch

    from edgemoe.models.m3vit import CONFIGS, build_m3vit

    model = build_m3vit(CONFIGS["m3vit-micro"])
    gate = "blocks.1.moe.gates.0.w_gate.weight"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[gate] = torch.zeros(9, 32)
    line = _compile_mutant(checkpoint["work"], "g.pt", _torch_bytes(state), "a gate 9 wide")
    assert f"1 mis-shaped key(s): {gate} (9, 32) (model (8, 32))" in line and "Error(s) in loading" not in line
    m3vit = {
        "module.backbone." + k.replace("patch_embed.", "patch_embed.proj."): v
        for k, v in model.state_dict().items()
        if ".moe." not in k
    }
    for b in model.cfg.moe_blocks:
        moe = model.blocks[b].moe
        for linear, fc in (("htoh4", "fc1"), ("h4toh", "fc2")):
            for kind in ("weight", "bias"):
                stacked = torch.stack([getattr(e, fc).__getattr__(kind) for e in moe.experts])
                m3vit[f"module.backbone.blocks.{b}.mlp.experts.{linear}.{kind}"] = stacked.detach()
        for t, g in enumerate(moe.gates):
            m3vit[f"module.backbone.blocks.{b}.mlp.gate.{t}.w_gate"] = g.w_gate.weight.T.detach()
    m3vit["module.backbone.blocks.1.mlp.gate.0.w_gate"] = torch.zeros(32, 5)
    line = _compile_mutant(checkpoint["work"], "g.pth", _torch_bytes({"state_dict": m3vit}), "M3ViT gate", "m3vit")
    assert f"1 mis-shaped key(s): {gate} (5, 32) (model (8, 32))" in line and "Error(s) in loading" not in line
    state[gate] = torch.zeros(8, 32, dtype=torch.int32)  # right shape, integer data
    line = _compile_mutant(checkpoint["work"], "g.pt", _torch_bytes(state), "an int32 gate")
    assert f"1 mis-typed key(s): {gate} (int32, model float32)" in line


# -- input files ------------------------------------------------------------------------------------------

INPUT_CODES = frozenset({0, InputError.exit_code})


def _input_mutant(fz: Bundle, name: str, data: bytes, what: str) -> int:
    path = fz.work / name
    path.write_bytes(data)
    result = _invoke("run", fz.root, "--task", "semseg", "--input", path, "-o", fz.out)
    _check(result, INPUT_CODES, what)
    if result.exit_code:
        assert not fz.out.exists(), what
    elif fz.out.exists():
        fz.out.unlink()
    return result.exit_code


NPY_DESCRS = ["<f4", ">f4", "<f8", "<f2", "<i4", "|u1", "|b1", "|O", "<U3", "|V4", "<c8", "<m8", "xx", "[('a', '<f4')]"]
NPY_SHAPES = ["(1, 3, 32, 64)", "(3, 32, 64)", "(1, 3, 64, 32)", "()", "(0,)", "(-1, 3, 32, 64)", "(2**62, 2)",
              "(4611686018427387904, 2)", "(100000, 100000)", "(1, 3, 32, 64, 1)", "'x'", "(1.5,)", "[1, 3, 32, 64]",
              "(1, 3, 32, 64"]  # fmt: skip


def _npy_header(descr: str, fortran: str, shape: str, version: int = 1) -> bytes:
    """A hand-written .npy header: magic, version, length, the dict as text (any text), padded to 64."""
    text = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape}, }}".encode()
    size = 2 if version == 1 else 4
    pad = -(6 + 2 + size + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + len(text).to_bytes(size, "little") + text


@_fuzz_settings(70)
@given(data=st.data())
def test_mutated_npy_inputs(fuzz_bundle, data):
    fz = fuzz_bundle
    good = np.random.default_rng(0).standard_normal((1, 3, 32, 64)).astype(np.float32)
    payload = good.tobytes()
    kind = data.draw(st.sampled_from(["header", "bytes", "payload"]), label="kind")
    if kind == "header":
        descr = data.draw(st.sampled_from([repr(d) if not d.startswith("[") else d for d in NPY_DESCRS]), label="descr")
        fortran = data.draw(st.sampled_from(["False", "True", "1", "'x'", "None"]), label="fortran_order")
        shape = data.draw(st.sampled_from(NPY_SHAPES), label="shape")
        version = data.draw(st.sampled_from([1, 2]), label="version")
        what, blob = f".npy header {descr} {fortran} {shape} v{version}", _npy_header(descr, fortran, shape, version)
        blob += payload
    elif kind == "bytes":
        what, blob = damage(_npy_header("'<f4'", "False", "(1, 3, 32, 64)") + payload, data.draw)
        what = f".npy {what}"
    else:
        size = data.draw(st.sampled_from([0, 1, len(payload) - 1, len(payload) + 1, 2 * len(payload)]), label="n")
        what, blob = f".npy with {size} data bytes", _npy_header("'<f4'", "False", "(1, 3, 32, 64)") + payload[:size]
        blob += bytes(max(0, size - len(payload)))
    _input_mutant(fz, "x.npy", blob, what)
    _count("inputs")


def _image_bytes(fmt: str, mode: str, size=(64, 32)) -> bytes:
    import io

    from PIL import Image

    rng = np.random.default_rng(1)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "CMYK": 4, "P": 1, "1": 1, "I;16": 1, "I": 1, "F": 1}[mode]
    if mode in ("I;16", "I", "F"):
        img = Image.fromarray(rng.integers(0, 60000, size[::-1]).astype({"I;16": "<u2", "I": "<i4", "F": "<f4"}[mode]))
    else:
        arr = rng.integers(0, 256, (*size[::-1], channels), dtype=np.uint8)
        img = Image.fromarray(arr[..., 0] if channels == 1 else arr, "L" if channels == 1 else None)
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# (format, mode) pairs Pillow writes; each file is then read back as an input image.
IMAGE_KINDS = [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "1"),
               ("PNG", "I;16"), ("TIFF", "F"), ("TIFF", "I"), ("JPEG", "CMYK"), ("JPEG", "RGB"), ("BMP", "RGB"),
               ("GIF", "P"), ("WEBP", "RGB"), ("PPM", "RGB")]  # fmt: skip


@_fuzz_settings(60)
@given(data=st.data())
def test_mutated_image_inputs(fuzz_bundle, data):
    fz = fuzz_bundle
    fmt, mode = data.draw(st.sampled_from(IMAGE_KINDS), label="image")
    blob = _image_bytes(fmt, mode)
    what = f"{fmt} {mode}"
    if data.draw(st.booleans(), label="damaged"):
        damaged, blob = damage(blob, data.draw)
        what += f" {damaged}"
    suffix = data.draw(st.sampled_from([f".{fmt.lower()}", ".png", ".jpg"]), label="suffix")
    _input_mutant(fz, f"x{suffix}", blob, what)
    _count("inputs")


def test_image_headers_that_claim_too_much(fuzz_bundle):
    """PNG and BMP headers declaring huge sizes over a few bytes of data: refused before decoding."""
    import zlib

    fz = fuzz_bundle

    def png(width: int, height: int, body: bytes) -> bytes:
        def chunk(kind: bytes, payload: bytes) -> bytes:
            return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")

    rows = zlib.compress(b"\x00" * (1 + 3 * 64) * 32)
    cases = [
        ("png 100000x100000", "x.png", png(100_000, 100_000, rows), InputError.exit_code),
        ("png 4000x4000 of 32 rows", "x.png", png(4000, 4000, rows), InputError.exit_code),
        ("png 0x0", "x.png", png(0, 0, rows), InputError.exit_code),
        ("png 2^31-1 wide", "x.png", png(2**31 - 1, 1, rows), InputError.exit_code),
        ("png 64x32 without data", "x.png", png(64, 32, b""), InputError.exit_code),
        ("png 64x32", "x.png", png(64, 32, rows), 0),
        ("bmp 50000x50000", "x.bmp", _image_bytes("BMP", "RGB")[:18] + struct.pack("<ii", 50_000, 50_000), 9),
    ]
    for what, name, blob, code in cases:
        assert _input_mutant(fz, name, blob, what) == code, what
        _count("inputs")


# -- outputs ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """Writes past ``nbytes`` fail with EFBIG meanwhile: a full disk, without the privileges a small mount needs."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel stops the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_run_outputs_that_cannot_be_written(fuzz_bundle, tmp_path):
    """``run -o``: a read-only place, a full disk, a folder in the way: exit 7 naming it, nothing left."""
    fz = fuzz_bundle
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "folder.npy").mkdir()
    cases = [
        (Path("/proc/edgemoe-out.npy"), "cannot write the output /proc/edgemoe-out.npy"),
        (afile / "out.npy", "File exists"),  # its folder is a file
        (tmp_path / "folder.npy", "Is a directory"),
        (tmp_path / "full.npy", "full.npy: "),  # numpy: "14336 requested and 992 written"
    ]
    for out, message in cases:
        with _file_size_limit(4096) if out.name == "full.npy" else contextlib.nullcontext():
            result = _invoke("run", fz.root, "--task", "semseg", "-o", out)
        assert message in _check(result, {OutputPathError.exit_code}, f"run -o {out}")
        _count("outputs")
    assert afile.read_text() == "x" and not list((tmp_path / "folder.npy").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder.npy"]  # no partial output


def test_good_files_still_give_the_same_bits(fuzz_bundle, scheduled_bundle):
    """After every mutant: the restored bundles, a good .npy and a good image give the bits they gave first."""
    for fz in (fuzz_bundle, scheduled_bundle):
        fz.assert_good()
    fz = fuzz_bundle
    good = np.random.default_rng(0).standard_normal((1, 3, 32, 64)).astype(np.float32)
    np.save(fz.work / "good.npy", good)
    (fz.work / "good.png").write_bytes(_image_bytes("PNG", "RGB"))
    for name in ("good.npy", "good.png"):
        bits = {fz.run_bits("semseg", "--input", fz.work / name) for _ in range(2)}
        assert len(bits) == 1, name
    # The .npy run is the sample run's arithmetic on another input: same bits as the Python API's.
    from edgemoe.runtime import Session

    assert Session(fz.root, "semseg").run(good).tobytes() == fz.run_bits("semseg", "--input", fz.work / "good.npy")
    fz.out.unlink()


def test_at_least_500_mutants_ran():
    """The acceptance floor of issue 17: 500 mutants in the default test run (when this whole file ran)."""
    expected = {
        "manifest-structured",
        "manifest-schema",
        "manifest-raw",
        "schedule",
        "verify",
        "graphs-and-blobs",
        "graph-swaps",
        "checkpoints",
        "inputs",
        "outputs",
    }
    if not expected <= set(COUNTS):
        pytest.skip(f"only part of the file ran ({', '.join(sorted(COUNTS)) or 'none'})")
    assert sum(COUNTS.values()) >= 500, COUNTS
