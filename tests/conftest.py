import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import json_stdout

from edgemoe.cli import cli
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """Compile a model once per session per (model, options) and hand out the bundle path."""
    cache: dict = {}

    def make(model: str, **options) -> Path:
        key = (model, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("bundles") / model.replace("/", "_")
            compile_model(CompileConfig(model=model, **options), out)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture
def micro_bundle(bundle_factory, tmp_path) -> Path:
    """A private copy of the m3vit-micro bundle that a test may damage."""
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_factory("m3vit-micro"), dst)
    return dst


@pytest.fixture
def run_cli():
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture
def one_torch_thread():
    """One torch thread: on a busy 2-core CI box two spinning OpenMP threads can stall for seconds per op."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="session")
def jetson_cpu_profile(tmp_path_factory) -> str:
    """A device file: the Jetson Orin Nano 8GB without its GPU, so every partition is CPU code.

    edgemoe-rt runs CPU libraries only (it links no TVM CUDA runtime: a CUDA library fails to load);
    a bundle compiled with ``--device <this file> --target tvm`` is what it runs on the Orin's CPU.
    One file per session, so bundles compiled for it are shared between test modules.
    """
    from edgemoe.devices import get_device

    entry = get_device("jetson-orin-nano-8gb").to_json()
    for key in ("name", "fpga"):
        entry.pop(key)
    entry.update(cuda_arch="", accelerator="none (CPU partitions only)", description="Jetson Orin Nano 8GB, CPU only")
    path = tmp_path_factory.mktemp("profiles") / "jetson-orin-nano-8gb-cpu.json"
    path.write_text(json.dumps({"jetson-orin-nano-8gb-cpu": entry}))
    return str(path)


@pytest.fixture(scope="session")
def tuning_run(tmp_path_factory) -> tuple[Path, dict]:
    """``edgemoe tune --json`` of m3vit-micro's expert kernel (4 trials, buckets 8 and 32) in its own process.

    Returns the database folder and the command's JSON summary. One run serves the tuning tests and
    the test that every command's ``--json`` stdout is one object (a fresh process spends ~40 s
    importing TVM's tensor intrinsics before the first trial).
    """
    db = tmp_path_factory.mktemp("tuning") / "db"
    summary = json_stdout(
        "tune", "m3vit-micro", "--kinds", "expert_kernel", "--token-buckets", "8,32", "--trials", "4", "-o", db, "-q"
    )
    return db, summary
