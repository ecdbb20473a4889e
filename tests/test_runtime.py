import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
from helpers import GUARD_CODE, guard_prelude, read_manifest

from edgemoe.bundle import sample_input
from edgemoe.runtime import Session

REPO = Path(__file__).resolve().parents[1]


def test_runtime_imports_no_torch_and_no_compiler(bundle_factory):
    """Running an ONNX bundle imports the onnx backend's executor, never torch nor compiler code."""
    bundle = bundle_factory("m3vit-micro")
    code = (
        guard_prelude()
        + "import edgemoe.runtime, edgemoe.runtime.run, edgemoe.bundle.describe, edgemoe.report, edgemoe.cli\n"
        + "from edgemoe.bundle import sample_input\n"
        + f"s = edgemoe.runtime.Session({str(bundle)!r}, 'depth')\n"
        + "s.run(sample_input(s.input_spec, batch=1))\n"
        + "assert 'edgemoe.targets.onnx.executor' in sys.modules\n"
        + GUARD_CODE
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_session_never_loads_outside_the_task_set(bundle_factory):
    bundle = bundle_factory("m3vit-micro-windows")
    m = read_manifest(bundle)
    assert m["tasks"]["semseg"]["experts"] != m["tasks"]["depth"]["experts"]
    for task, window in (("semseg", {0, 1, 2, 3}), ("depth", {4, 5, 6, 7})):
        session = Session(bundle, task)
        assert session.stats.experts_loaded == 0  # lazy: nothing before the first token
        for seed in range(4):
            session.run(sample_input(session.input_spec, batch=2, seed=seed))
            for layer, loaded in session.loaded_experts.items():
                kept = set(m["tasks"][task]["experts"][layer])
                assert set(loaded) <= kept <= window
        stats = session.stats
        assert 0 < stats.experts_loaded <= stats.experts_task == sum(len(s) for s in m["tasks"][task]["experts"])
        assert stats.experts_total == 16 and stats.experts_bundle == 16
        loaded_bytes = sum(
            e["bytes"]
            for li, loaded in session.loaded_experts.items()
            for e in m["moe_layers"][li]["experts"]
            if e["index"] in loaded
        )
        assert stats.expert_bytes_loaded == loaded_bytes
        assert stats.expert_bytes_loaded <= stats.expert_bytes_total // 2 + 1


def test_session_loads_only_its_task_graphs(bundle_factory):
    bundle = bundle_factory("m3vit-micro")
    m = read_manifest(bundle)
    session = Session(bundle, "depth")
    names = [*m["segments"], *m["tasks"]["depth"]["gates"], m["tasks"]["depth"]["head"], "expert_kernel_32x48"]
    assert session.stats.graph_bytes == sum(m["graphs"][n]["bytes"] for n in names)


def test_only_activated_experts_are_loaded(bundle_factory):
    """One token routed through a layer loads at most top-k experts there."""
    bundle = bundle_factory("m3vit-micro")
    session = Session(bundle, "semseg")
    session.run(sample_input(session.input_spec, batch=1, seed=0))
    for layer, idx in enumerate(session.last_routing):
        assert set(session.loaded_experts[layer]) == set(np.unique(idx).tolist())


def test_runtime_threads_are_safe(bundle_factory):
    from concurrent.futures import ThreadPoolExecutor

    bundle = bundle_factory("m3vit-micro")
    session = Session(bundle, "semseg")
    xs = [sample_input(session.input_spec, batch=1, seed=s) for s in range(8)]
    want = [Session(bundle, "semseg").run(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(session.run, xs))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.slow
@pytest.mark.isolated
def test_runtime_installs_alone_without_torch(bundle_factory, tmp_path):
    """A fresh venv with only the runtime extra runs and inspects a bundle compiled here."""
    bundle = bundle_factory("m3vit-micro")
    env_dir = tmp_path / "rtvenv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def pip(*args):
        subprocess.run([str(py), "-m", "pip", "install", "-q", *args], check=True, env=env, cwd=tmp_path)

    # The runtime extra (numpy, click, onnxruntime, pillow) and nothing else.
    pip("setuptools>=77")
    pip("--no-build-isolation", f"{REPO}[runtime]")
    probe = subprocess.run([str(py), "-c", "import torch"], capture_output=True, env=env, cwd=tmp_path)
    assert probe.returncode != 0, "torch must not be installed by the runtime extra"
    probe = subprocess.run([str(py), "-c", "import onnx"], capture_output=True, env=env, cwd=tmp_path)
    assert probe.returncode != 0, "onnx (compiler side) must not be installed by the runtime extra"

    exe = str(env_dir / "bin" / "edgemoe")
    run = subprocess.run(
        [exe, "run", str(bundle), "--task", "semseg", "--json"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr
    res = json.loads(run.stdout)
    assert res["task"] == "semseg" and res["output_shape"] == [1, 7, 32, 64]
    assert 0 < res["experts_loaded"] <= res["experts_total"]
    insp = subprocess.run(
        [exe, "inspect", str(bundle), "--json", "--check"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert insp.returncode == 0, insp.stderr
    assert json.loads(insp.stdout)["model"]["name"] == "m3vit-micro"
    # The compiler commands say clearly what is missing instead of crashing.
    comp = subprocess.run(
        [exe, "compile", "m3vit-micro", "-o", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert comp.returncode != 0 and "Traceback" not in comp.stderr
    assert "compiler" in comp.stderr
