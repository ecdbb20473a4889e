"""MetaSchedule tuning of the TVM target: a database from a tiny budget is applied when compiling."""

import json

import numpy as np
import pytest
from helpers import read_manifest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.devices import get_device
from edgemoe.errors import ConfigError
from edgemoe.passes.capture_model import capture_model
from edgemoe.runtime import Session
from edgemoe.targets.tvm.target import import_partition, tvm_target
from edgemoe.targets.tvm.tuning_db import SHAPES_FILE, TuningShapes, apply_tuning, scheduled_functions, specialise

MODEL = "m3vit-micro"
SHAPES = TuningShapes(token_buckets=(8, 32), dims={"batch": 1})

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


@pytest.fixture(scope="module")
def kernel():
    return capture_model(CompileConfig(model=MODEL)).adapter.expert_kernel(0)


@pytest.fixture(scope="module")
def database(tuning_run):
    """The database ``edgemoe tune --json`` wrote (conftest: one run per session) and its summary."""
    return tuning_run


def test_tuning_writes_a_database(database, kernel):
    db, summary = database
    records = (db / "database_tuning_record.json").read_text().splitlines()
    assert records and len(summary["tasks"]) == 4  # (matmul+gelu, matmul) x 2 buckets
    assert summary["model"] == MODEL and summary["partitions"] == [kernel.name]
    assert any(t["best_ms"] is not None for t in summary["tasks"])
    assert json.loads((db / SHAPES_FILE).read_text())["token_buckets"] == [8, 32]


def test_dispatch_matches_torch_at_every_token_count(kernel):
    """Padded buckets and the generic fallback compute what the kernel computes, untuned."""
    import torch
    import tvm
    from tvm import relax

    mod = specialise(import_partition(kernel), kernel, SHAPES)
    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(tvm_target(get_device("host")))), tvm.cpu())
    weights = [t.numpy() for t in kernel.example_inputs[1:]]
    for n in (1, 7, 8, 9, 32, 33):  # below, at and above each bucket
        x = np.random.default_rng(n).standard_normal((n, weights[0].shape[0]), dtype=np.float32)
        got = vm["main"](tvm.runtime.tensor(x), *(tvm.runtime.tensor(w) for w in weights))[0].numpy()
        with torch.no_grad():
            want = kernel.module(torch.from_numpy(x), *(torch.from_numpy(w) for w in weights))
        want = (want[0] if isinstance(want, tuple) else want).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5, n


def test_database_is_applied_and_bundle_matches_torch(database, kernel, tmp_path):
    db, summary = database
    target = tvm_target(get_device("host"))
    tuned = scheduled_functions(apply_tuning(import_partition(kernel), kernel, target, db))
    assert len(tuned) == sum(t["best_ms"] is not None for t in summary["tasks"]) > 0
    # The untuned bundle's kernel differs from the tuned one; both run every task within 1e-4 of torch.
    bundles = {}
    for name, tuning_db in (("plain", None), ("tuned", str(db))):
        bundles[name] = tmp_path / name
        compile_model(CompileConfig(model=MODEL, target="tvm", tasks=("semseg",), tuning_db=tuning_db), bundles[name])
    kname = read_manifest(bundles["tuned"])["moe_layers"][0]["kernel"]
    files = {k: (b / "graphs" / f"{kname}.so").read_bytes() for k, b in bundles.items()}
    assert files["plain"] != files["tuned"]
    adapter = capture_model(CompileConfig(model=MODEL)).adapter
    m = read_manifest(bundles["tuned"])
    keep = {li: tuple(s) for li, s in enumerate(m["tasks"]["semseg"]["experts"])}
    session = Session(bundles["tuned"], "semseg")
    from edgemoe.bundle import sample_input

    for batch in (1, 2):
        x = sample_input(session.input_spec, batch=batch, seed=batch)
        err = float(np.abs(session.run(x).astype(np.float64) - adapter.reference(x, "semseg", keep)).max())
        assert err <= 1e-4, (batch, err)


def test_bad_database_is_refused(kernel, tmp_path):
    with pytest.raises(ConfigError, match="not a tuning database"):
        apply_tuning(import_partition(kernel), kernel, tvm_target(get_device("host")), tmp_path)
    with pytest.raises(ConfigError, match="ascending"):
        TuningShapes(token_buckets=(64, 16))
