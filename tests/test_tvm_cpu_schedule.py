"""Default CPU schedules of the TVM target (targets/tvm/cpu_schedule.py): what untuned libraries run."""

import numpy as np
import pytest

pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")

from edgemoe.config import CompileConfig
from edgemoe.devices import get_device
from edgemoe.passes.capture_model import capture_model
from edgemoe.targets.tvm.cpu_schedule import default_schedules
from edgemoe.targets.tvm.target import TvmTarget, import_partition, tvm_target
from edgemoe.targets.tvm.tuning_db import legalize_and_fuse

MODEL = "m3vit-micro"

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


@pytest.fixture(scope="module")
def parts():
    adapter = capture_model(CompileConfig(model=MODEL)).adapter
    return {"kernel": adapter.expert_kernel(0), "segment": adapter.segment(1)}


@pytest.fixture(scope="module")
def tiny_segment():
    """Two m3vit-tiny blocks (random weights): big enough for parallel loops (the micro model has none)."""
    return capture_model(CompileConfig(model="m3vit-tiny-patch")).adapter.segment(1)


def _prim_funcs(mod) -> dict:
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _scheduled(func) -> bool:
    return bool(func.attrs and func.attrs.get("tirx.is_scheduled"))


def _run(mod, part):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(tvm_target(get_device("host")))), tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(t.numpy()) for t in part.example_inputs))[0].numpy()


# Runs a library in a fresh process: TVM sizes its thread pool once per process, from
# TVM_NUM_THREADS (its default on x86 is half the logical CPUs: one worker on 2 CPUs).
RUN_LIBRARY = """
import sys, numpy as np, tvm
from tvm import relax
vm = relax.VirtualMachine(tvm.runtime.load_module(sys.argv[1]), tvm.cpu())
inputs = np.load(sys.argv[2])
out = vm["main"](*(tvm.runtime.tensor(inputs[k]) for k in sorted(inputs.files)))
np.save(sys.argv[3], out[0].numpy())
"""


@pytest.mark.parametrize("name", ["kernel", "segment"])
def test_every_contraction_is_scheduled_and_results_match(parts, name):
    """Matmuls get a schedule; the scheduled library computes what the unscheduled one does."""
    import tvm

    part = parts[name]
    target = tvm_target(get_device("host"))
    plain = legalize_and_fuse(import_partition(part), tvm.target.Target(target))
    scheduled = default_schedules(import_partition(part), target)
    funcs = _prim_funcs(scheduled)
    assert set(funcs) == set(_prim_funcs(plain))  # same operators, only their loops differ
    matmuls = [n for n in funcs if "matmul" in n]
    assert matmuls and all(_scheduled(funcs[n]) for n in matmuls)
    assert sum(map(_scheduled, funcs.values())) >= 0.8 * len(funcs)
    want, got = _run(plain, part), _run(scheduled, part)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_results_do_not_depend_on_the_thread_count(tiny_segment, tmp_path):
    """Only spatial loops run in parallel: one worker and two give the same bits."""
    import os
    import subprocess
    import sys

    import tvm
    import tvm_ffi
    from tvm import tirx

    part = tiny_segment
    target = tvm_target(get_device("host"))
    mod = default_schedules(import_partition(part), target)
    loops: list = []
    for func in _prim_funcs(mod).values():
        tvm_ffi.structural_walk(func.body, (tirx.For, loops.append), order="post")
    assert sum(lp.kind == tirx.ForKind.PARALLEL for lp in loops) >= 10  # matmuls, softmax, norms, copies
    lib = tmp_path / "segment.so"
    tvm.compile(mod, target=tvm.target.Target(target)).export_library(str(lib))
    np.savez(tmp_path / "x.npz", **{f"{i:02d}": t.numpy() for i, t in enumerate(part.example_inputs)})
    outs = []
    for threads in (1, 2):
        y = tmp_path / f"y{threads}.npy"
        env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-c", RUN_LIBRARY, lib, tmp_path / "x.npz", y], env=env, check=True)
        outs.append(np.load(y))
    assert np.array_equal(outs[0], outs[1])


def test_aarch64_builds_get_neon_sized_tiles(parts):
    """An aarch64 profile gets the same schedules with 4-lane vectors (2 per tile row), and they compile."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    target = tvm_target(get_device("raspberry-pi-5"))
    mod = default_schedules(import_partition(parts["kernel"]), target)
    loops: list = []
    for func in _prim_funcs(mod).values():
        assert _scheduled(func)
        tvm_ffi.structural_walk(func.body, (tirx.For, loops.append), order="post")
    vector_extents = {int(lp.extent) for lp in loops if lp.kind == tirx.ForKind.VECTORIZED}
    assert max(vector_extents) == 8
    tvm.compile(mod, target=tvm.target.Target(target))  # code generation only: linking needs the cross linker


def test_a_failing_schedule_falls_back_to_the_unscheduled_build(parts, monkeypatch):
    import edgemoe.targets.tvm.target as tvm_target_module

    def broken(*_a, **_k):
        raise RuntimeError("schedule broke")

    monkeypatch.setattr(tvm_target_module, "default_schedules", broken)
    part = parts["kernel"]
    with pytest.warns(UserWarning, match="default CPU schedules fail on .*schedule broke"):
        exe = TvmTarget._compile_cpu(part, import_partition(part), tvm_target(get_device("host")), legalized=False)
    assert exe is not None
