"""FPGA target (--target hls): emulator vs C simulation, accuracy, DDR traffic, executor, drivers, project files."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import GUARD_CODE, guard_prelude, read_manifest

from edgemoe.bundle import sample_input
from edgemoe.errors import ConfigError, EdgeMoEWarning, TargetError
from edgemoe.runtime import Session
from edgemoe.targets.hls.check import Emulator
from edgemoe.targets.hls.csim import ap_types_dir
from edgemoe.targets.hls.design import OP_FORWARD, Design
from edgemoe.targets.hls.executor import FpgaExecutor
from edgemoe.targets.hls.fixed import FixedType, convert, quantize, round_shift

HLS = {"target": "hls", "device": "zcu102"}

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


@pytest.fixture(scope="module")
def micro(bundle_factory):
    return bundle_factory("m3vit-micro", **HLS)


def _csim_forward(bundle: Path, task: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole images through OP_FORWARD (every kept expert resident), returning raw outputs and pool words read."""
    m = read_manifest(bundle)
    ex = FpgaExecutor(driver="csim")
    ex.program(bundle, m, task)
    d = ex.design
    t = d.tasks.index(task)
    kept = [(li, e) for li in range(d.moe_layers) for e in d.kept[t][li]]
    records = {(li, r["index"]): r for li, layer in enumerate(m["moe_layers"]) for r in layer["experts"]}
    pool = np.concatenate([np.fromfile(bundle / records[k]["file"], dtype="<i2") for k in kept])
    slots = np.full(d.moe_layers * d.num_experts, -1, dtype=np.int32)
    for i, (li, e) in enumerate(kept):
        slots[li * d.num_experts + e] = i
    acc = ex.driver.accelerator
    outs, words = [], []
    for img in x:
        inp = quantize(img, d.types["input"]).astype(np.int32).ravel()
        out = np.zeros(int(np.prod(d.output_shape(task))), dtype=np.int32)
        state = np.zeros(d.state_layout()["WORDS"], dtype=np.int32)
        acc.reset_counters()
        assert acc.call(OP_FORWARD, t, 0, 0, 0, ex.params, pool, slots, inp, out, state) == 1
        outs.append(out.reshape(d.output_shape(task)))
        words.append(acc.pool_words())
    return np.stack(outs), np.stack(words)


def test_fixed_point_rounding_is_ap_rnd_and_saturates():
    t = FixedType(8, 3)  # step 1/32, range [-4, 4 - 1/32]
    assert quantize(np.array([0.015625, -0.015625, 0.03, 100.0, -100.0]), t).tolist() == [1, 0, 1, 127, -128]
    assert round_shift(np.array([3, -3, 2, -2]), 1).tolist() == [2, -1, 1, -1]  # halves round up
    assert convert(np.array([1 << 20]), 10, t).tolist() == [127]
    assert FixedType.parse("ap_ufixed<8,0>") == FixedType(8, 0, signed=False)
    with pytest.raises(ConfigError):
        FixedType.parse("ap_fixed<64,10>")


def test_csim_equals_the_emulator_bit_for_bit_and_is_close_to_pytorch(micro):
    m = read_manifest(micro)
    emu = Emulator.from_bundle(micro, m)
    x = sample_input(m["input"], batch=3, seed=11)
    for task in m["tasks"]:
        raw, _ = _csim_forward(micro, task, x)
        np.testing.assert_array_equal(raw, emu.raw(x, task))
        # the stepped protocol (the runtime's path, through the expert cache) gives the same bits
        session = Session(micro, task)
        y = session.run(x)
        np.testing.assert_array_equal(session.program.last_raw, raw)
        assert y.dtype == np.float32 and y.shape == (3, *emu.design.output_shape(task))


def test_verify_passes_with_csim_equal_to_the_emulator(micro, run_cli):
    res = run_cli("verify", micro, "--json", "-q")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["quantization"] == "fixed point"
    for t in rep["tasks"].values():
        assert t["passed"] and t["extra"]["csim_equals_emulator"]
        assert t["extra"]["mse_heldout"] <= 1e-3 and t["extra"]["mse"] <= 1e-3
        assert abs(t["metric"] - t["metric_fp32"]) <= 0.01 * max(1.0, abs(t["metric_fp32"]))


def test_pool_reads_only_routed_experts_once_per_layer(micro):
    m = read_manifest(micro)
    d = Design.from_json(m["hls"]["design"])
    x = sample_input(m["input"], batch=2, seed=3)
    for task in m["tasks"]:
        _, words = _csim_forward(micro, task, x)
        routes = []
        from edgemoe.targets.hls import emulate

        emu = Emulator.from_bundle(micro, m)
        for i in range(len(x)):
            routes.clear()
            emulate.forward(d, emulate.FixedMath(d), x[i : i + 1], task, emu.params.__getitem__, emu._expert, routes)
            for li, (idx, _) in enumerate(routes):
                routed = set(np.unique(idx).tolist())
                for e in range(d.num_experts):
                    want = d.expert_data_words if e in routed else 0
                    assert words[i][li][e] == want, (task, i, li, e)


def test_fpga_and_onnxruntime_route_identically_with_equal_cache_counters(bundle_factory, micro):
    ort = bundle_factory("m3vit-micro")
    mo, mh = read_manifest(ort), read_manifest(micro)
    for task in mo["tasks"]:
        assert mo["tasks"][task]["experts"] == mh["tasks"][task]["experts"]
        size_o = mo["moe_layers"][0]["experts"][0]["bytes"]
        size_h = mh["moe_layers"][0]["experts"][0]["bytes"]
        so = Session(ort, task, memory_budget=5 * size_o)
        sh = Session(micro, task, memory_budget=5 * size_h)
        for seed in range(3):
            x = sample_input(mo["input"], batch=2, seed=seed)
            so.run(x)
            sh.run(x)
            for a, b in zip(so.last_routing, sh.last_routing, strict=True):
                np.testing.assert_array_equal(np.sort(a, -1), np.sort(b, -1))
        a, b = so.stats, sh.stats
        assert (a.cache_hits, a.cache_misses, a.evictions) == (b.cache_hits, b.cache_misses, b.evictions)
        assert b.evictions > 0 and b.peak_expert_bytes <= 5 * size_h


def test_budgeted_pool_gives_the_same_bits_and_task_switch_works(micro):
    m = read_manifest(micro)
    size = m["moe_layers"][0]["experts"][0]["bytes"]
    x = sample_input(m["input"], batch=1, seed=5)
    full = {task: Session(micro, task).run(x) for task in m["tasks"]}
    s = Session(micro, "semseg", memory_budget=3 * size)
    np.testing.assert_array_equal(s.run(x), full["semseg"])
    assert s.executor.pool.size == 3 * s.executor.design.expert_words  # the DDR pool is the budget
    s.switch_task("depth")
    np.testing.assert_array_equal(s.run(x), full["depth"])
    assert s.stats.peak_expert_bytes <= 3 * size


def test_pynq_driver_makes_the_same_calls_as_csim(micro, tmp_path):
    """The board driver's code path, with the C simulation standing in for PYNQ's overlay and DDR buffers."""
    from edgemoe.targets.hls.pynq_driver import PynqDriver

    bundle = tmp_path / "b"
    shutil.copytree(micro, bundle)
    (bundle / "edgemoe.bit").write_bytes(b"bitstream")
    m = read_manifest(bundle)
    csim = FpgaExecutor(driver="csim")
    csim.program(bundle, m, "semseg")
    flushed, invalidated = [], []

    class Buffer(np.ndarray):
        def flush(self):
            flushed.append(self.size)

        def invalidate(self):
            invalidated.append(self.size)

    class Ip:
        def call(self, *args):
            return csim.driver.accelerator.call(*args)

    class Board:
        def __init__(self, path):
            assert Path(path).name == "edgemoe.bit"
            self.ip_dict = {"edgemoe_top_0": {}}
            self.edgemoe_top_0 = Ip()

    class Pynq:
        Overlay = Board

        @staticmethod
        def allocate(shape, dtype):
            return np.zeros(shape, dtype=dtype).view(Buffer)

    driver = PynqDriver(bundle, pynq=Pynq)
    x = sample_input(m["input"], batch=2, seed=8)
    board = Session(
        bundle,
        "semseg",
        executor=FpgaExecutor(driver=driver),
        memory_budget=4 * m["moe_layers"][0]["experts"][0]["bytes"],
    )
    np.testing.assert_array_equal(board.run(x), Session(bundle, "semseg").run(x))
    assert flushed and invalidated  # params, inputs, pool slots flushed; states and outputs invalidated


def test_testbench_builds_with_gpp_and_passes(micro, tmp_path):
    hls = micro / "hls"
    exe = tmp_path / "tb"
    cmd = ["g++", "-O1", "-std=c++14", "-w", f"-I{ap_types_dir()}", f"-I{hls / 'src'}"]
    cmd += [str(hls / "tb" / "tb.cpp"), str(hls / "src" / "edgemoe_top.cpp"), "-o", str(exe)]
    subprocess.run(cmd, check=True)
    out = subprocess.run([str(exe), str(hls)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("PASS") == 2 and "0 of" in out.stdout


def test_run_hls_tcl_is_valid_tcl_naming_existing_files(micro, tmp_path):
    tclsh = shutil.which("tclsh")
    if tclsh is None:
        pytest.skip("tclsh is not installed")
    stubs = tmp_path / "check.tcl"
    stubs.write_text(
        "set called {}\n"
        'proc add_files {args} { set f [lindex $args [expr {[lindex $args 0] eq "-tb" ? 1 : 0}]]\n'
        '  if {![file exists $f]} { puts "missing $f"; exit 3 }; puts "file $f" }\n'
        "foreach p {open_project set_top open_solution set_part create_clock csim_design csynth_design "
        'cosim_design export_design} { proc $p {args} "puts {step $p}" }\n'
        "proc exit {args} {}\n"
        "set argv {}\n"
        f"source {micro / 'hls' / 'run_hls.tcl'}\n"
    )
    out = subprocess.run([tclsh, str(stubs)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    for step in ("csim_design", "csynth_design", "cosim_design", "export_design", "set_part"):
        assert f"step {step}" in out.stdout
    assert "edgemoe_top.cpp" in out.stdout and "tb.cpp" in out.stdout


@pytest.mark.vitis
def test_vitis_hls_csim(micro, tmp_path):
    if not shutil.which("vitis_hls") or not os.environ.get("EDGEMOE_VITIS"):
        pytest.skip("needs Vitis HLS on PATH and EDGEMOE_VITIS=1")
    out = subprocess.run(
        ["vitis_hls", "-f", str(micro / "hls" / "run_hls.tcl"), "-tclargs", "csim"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and out.stdout.count("PASS") == 2, out.stdout[-3000:]


def test_inspect_json_has_the_estimate(micro, run_cli):
    res = run_cli("inspect", micro, "--json", "--check")
    assert res.exit_code == 0, res.output
    est = json.loads(res.stdout)["hls"]["estimate"]
    for key in ("dsp", "bram_18k", "lut", "ff", "cycles", "latency_ms"):
        assert est[key] > 0
    assert est["dsp"] <= 0.9 * 2520 and est["part"].startswith("xczu9eg")


# Edge-MoE's pixel type (ap_ufixed<8,0>) holds raw pixels only: models fed normalised images keep a
# signed input type (the compile warns that [0, 1) saturates them otherwise).
EDGE_MOE_NORMALISED = "edge-moe,input=ap_fixed<16,4>"


def test_edge_moe_types_reproduce_the_model(bundle_factory):
    b = bundle_factory("m3vit-micro", fixed=EDGE_MOE_NORMALISED, **HLS)
    m = read_manifest(b)
    assert m["hls"]["design"]["types"]["act"] == "ap_fixed<32,10>"
    assert m["hls"]["design"]["types"]["weight"] == "ap_fixed<16,2>"
    assert m["hls"]["range_report"] == []
    for t in m["hls"]["accuracy"]["tasks"].values():
        assert t["mse_vs_fp32"] <= 1e-3
    with pytest.warns(UserWarning, match="beyond ap_ufixed<8,0>"):
        b = bundle_factory("m3vit-micro", fixed="edge-moe", **HLS)
    assert [r["tensor"] for r in read_manifest(b)["hls"]["range_report"]] == ["input"]


def test_bad_input_is_refused_clearly(bundle_factory, tmp_path, run_cli):
    small = tmp_path / "tiny-fpga.json"
    small.write_text(
        json.dumps(
            {
                "tiny-fpga": {
                    "memory_bytes": 1 << 30,
                    "cpu_arch": "aarch64",
                    "fpga": {
                        "part": "xc7z010",
                        "clock_mhz": 100,
                        "dsp": 80,
                        "bram_18k": 120,
                        "lut": 17600,
                        "ff": 35200,
                    },
                }
            }
        )
    )
    res = run_cli("compile", "m3vit-micro", "--target", "hls", "--device", small, "-o", tmp_path / "a")
    assert res.exit_code == TargetError.exit_code
    assert "does not fit xc7z010" in res.stderr and "dsp" in res.stderr and not (tmp_path / "a").exists()
    res = run_cli("compile", "mixtral-lm-micro", "--target", "hls", "--device", "zcu102", "-o", tmp_path / "b")
    assert res.exit_code == TargetError.exit_code
    assert "token-routed" in res.stderr and "missing" in res.stderr
    res = run_cli("compile", "m3vit-micro", "--target", "hls", "--device", "host", "-o", tmp_path / "c")
    assert res.exit_code == TargetError.exit_code and "no programmable logic" in res.stderr
    res = run_cli(
        "compile", "m3vit-micro", "--target", "hls", "--device", "zcu102", "--fixed", "act=int8", "-o", tmp_path / "d"
    )
    assert res.exit_code == ConfigError.exit_code and "fixed-point type" in res.stderr
    with pytest.warns(EdgeMoEWarning, match="programmable logic"):
        bundle_factory("m3vit-micro", device="zcu102")


def test_runtime_with_an_hls_bundle_imports_no_compiler(micro):
    code = (
        guard_prelude()
        + "from edgemoe.runtime import Session\n"
        + "from edgemoe.bundle import sample_input\n"
        + f"s = Session({str(micro)!r}, 'depth')\n"
        + "y = s.run(sample_input(s.input_spec, batch=1))\n"
        + "assert s.executor.name == 'fpga' and y.shape == (1, 1, 32, 64), y.shape\n"
        + "assert 'edgemoe.targets.hls.emulate' not in sys.modules\n"
        + GUARD_CODE
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "fixed"),
    [("m3vit-tiny", None), ("m3vit-tiny-patch", EDGE_MOE_NORMALISED), ("m3vit-tiny-edgemoe", "edge-moe")],
)
def test_tiny_models_verify_within_the_acceptance_bars(bundle_factory, model, fixed, run_cli):
    """m3vit-tiny (trained, conv stem), Edge-MoE's config with its types: C-sim of both tasks, MSE, metrics."""
    b = bundle_factory(model, fixed=fixed, **HLS)
    res = run_cli("verify", b, "--json", "-q")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    for task, t in rep["tasks"].items():
        assert t["extra"]["csim_equals_emulator"], task
        assert t["extra"]["mse_heldout"] <= 1e-3, task
        if t["metric_name"] == "miou":
            assert abs(t["metric"] - t["metric_fp32"]) <= 0.01
        elif t["metric_name"] == "depth_rmse":
            assert abs(t["metric"] / t["metric_fp32"] - 1) <= 0.02
