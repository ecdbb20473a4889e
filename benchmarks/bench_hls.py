"""FPGA target: calibrated vs Edge-MoE fixed-point types, the estimate beside Edge-MoE / UbiMoE, C-sim speed.

For each model, in one run: compile for the ZCU102 with types calibrated per tensor class and with
Edge-MoE's hand-chosen types (same widths: 32-bit activations, 16-bit parameters), then compare on
held-out inputs (the bit-exact emulator stands for the accelerator): output MSE and max error
against fp32 PyTorch, the task metrics, and each design's estimated resources and latency. The
estimator is also run at Edge-MoE's own tiling (16x16 linear unit, 4 attention lanes, from its
include/hardware.hpp) for m3vit-tiny-edgemoe, to set our estimate beside its measured 34.64 ms.
Finally the C simulation of one m3vit-tiny image is timed (library built), forward and stepped.

Reported by others, not measured here (see the README for sources): Edge-MoE 34.64 ms per image
on the ZCU102 at 300 MHz (14.54 W); UbiMoE 25.76 ms on the same board (1.34x Edge-MoE's throughput).
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parse_args, table, write_results

EDGE_MOE_TILES = {"tile_in": 16, "tile_out": 16, "attn_par": 4}  # sharc-lab/Edge-MoE include/hardware.hpp
MODELS = {
    # model -> Edge-MoE type set: its pixel type holds raw pixels only, so normalised inputs keep a signed one
    "m3vit-tiny": "edge-moe,input=ap_fixed<16,4>",
    "m3vit-tiny-edgemoe": "edge-moe",
    "m3vit-micro": "edge-moe,input=ap_fixed<16,4>",
}


def compile_pair(model: str, edge_types: str, work: Path, eval_samples: int) -> dict:
    from edgemoe.compiler import compile_model
    from edgemoe.config import CompileConfig
    from edgemoe.quantization import QuantConfig

    out = {}
    for label, fixed in (("calibrated", None), ("edge-moe", edge_types)):
        cfg = CompileConfig(
            model=model, target="hls", device="zcu102", fixed=fixed, quant=QuantConfig(eval_samples=eval_samples)
        )
        start = time.perf_counter()
        m = compile_model(cfg, work / f"{model}-{label}")
        h = m["hls"]
        out[label] = {
            "compile_s": time.perf_counter() - start,
            "types": h["design"]["types"],
            "accuracy": h["accuracy"],
            "estimate": {k: h["estimate"][k] for k in ("dsp", "bram_18k", "uram", "lut", "ff", "latency_ms", "tiles")},
            "saturated_tensors": [r["tensor"] for r in h["range_report"]],
        }
        print(
            f"{model} {label}: {out[label]['compile_s']:.0f} s, {h['estimate']['latency_ms']:.2f} ms est.", flush=True
        )
    return out


def estimate_at(bundle: Path, tiles: dict) -> dict:
    """The estimator on a compiled design with other tiles (e.g. Edge-MoE's)."""
    from edgemoe.bundle.format import read_manifest
    from edgemoe.devices import get_device
    from edgemoe.targets.hls.design import Design
    from edgemoe.targets.hls.estimate import estimate

    m = read_manifest(bundle)
    d = Design.from_json(m["hls"]["design"])
    full = {**d.tiles, **tiles}
    tpe = {}
    for task, per_layer in m["tasks"].items():
        counts = np.asarray(per_layer["expert_counts"], dtype=np.float64)
        tpe[task] = (counts / m["calibration"]["samples"]).tolist()
    est = estimate(dataclasses.replace(d, tiles=full), full, get_device("zcu102").fpga, tpe)
    return {k: est[k] for k in ("dsp", "bram_18k", "lut", "ff", "latency_ms", "tiles")}


def time_csim(bundle: Path, repeat: int) -> dict:
    """Wall time of the C simulation of one image: whole model (OP_FORWARD) and the runtime's stepped path."""
    from edgemoe.bundle import sample_input
    from edgemoe.bundle.format import read_manifest
    from edgemoe.runtime import Session
    from edgemoe.targets.hls.csim import build_library

    m = read_manifest(bundle)
    start = time.perf_counter()
    build_library(bundle / "hls" / "src")
    build_s = time.perf_counter() - start
    task = next(iter(m["tasks"]))
    session = Session(bundle, task)
    x = sample_input(m["input"], batch=1, seed=0)
    session.run(x)  # loads the library and the experts
    stepped = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(x)
        stepped.append(time.perf_counter() - start)
    from edgemoe.targets.hls.check import Emulator

    emu = Emulator.from_bundle(bundle, m)
    start = time.perf_counter()
    emu.raw(x, task)
    return {
        "task": task,
        "library_build_s_or_cached": build_s,
        "csim_stepped_s_per_image": float(np.median(stepped)),
        "emulator_s_per_image": time.perf_counter() - start,
    }


def main() -> None:
    args = parse_args(__doc__, "bench_hls")
    work = Path(tempfile.mkdtemp(prefix="bench-hls-"))  # the compiled bundles are not results
    models = ["m3vit-micro"] if args.quick else list(MODELS)
    eval_samples = 4 if args.quick else 16
    data = {"machine": machine(), "quick": args.quick, "models": {}}
    for model in models:
        data["models"][model] = compile_pair(model, MODELS[model], work, eval_samples)
    if "m3vit-tiny-edgemoe" in models:
        data["edge_moe_tiling"] = estimate_at(work / "m3vit-tiny-edgemoe-edge-moe", EDGE_MOE_TILES)
    timed_model = "m3vit-micro" if args.quick else "m3vit-tiny"
    data["csim"] = {"model": timed_model, **time_csim(work / f"{timed_model}-calibrated", 1 if args.quick else 3)}

    rows = []
    for model, pair in data["models"].items():
        for label, r in pair.items():
            acc = r["accuracy"]["tasks"]
            metrics = "; ".join(
                f"{t} {a['metric_name']} {a['metric']:.4f} (fp32 {a['metric_fp32']:.4f})" for t, a in acc.items()
            )
            mse = max(a["mse_vs_fp32"] for a in acc.values())
            err = max(a["max_abs_error_vs_fp32"] for a in acc.values())
            t = r["types"]
            e = r["estimate"]
            rows.append(
                [
                    model,
                    label,
                    f"act {t['act']}, weight {t['weight']}, input {t['input']}",
                    f"{mse:.2e}",
                    f"{err:.3g}",
                    metrics,
                    f"{e['dsp']:,} / {e['bram_18k']:,}",
                    f"{e['latency_ms']:.2f}",
                    ", ".join(r["saturated_tensors"]) or "none",
                ]
            )
    md = table(
        ["model", "types", "key types", "MSE vs fp32 (worst task)", "max error", "metrics", "DSP / BRAM18K (est.)",
         "ms/image (est.)", "saturating tensors"],
        rows,
    )  # fmt: skip
    if "edge_moe_tiling" in data:
        e = data["edge_moe_tiling"]
        md += (
            f"\n\nOur estimator at Edge-MoE's tiling (16x16 linear unit, 4 attention lanes) on m3vit-tiny-edgemoe: "
            f"{e['latency_ms']:.2f} ms, {e['dsp']:,} DSP, {e['bram_18k']:,} BRAM18K (Edge-MoE reports 34.64 ms)."
        )
    c = data["csim"]
    md += (
        f"\n\nC simulation of one {c['model']} image (task {c['task']}, library built): "
        f"{c['csim_stepped_s_per_image']:.1f} s through the runtime's stepped path; emulator "
        f"{c['emulator_s_per_image']:.2f} s."
    )
    shutil.rmtree(work, ignore_errors=True)
    write_results(args.out, "bench_hls", "FPGA target: fixed-point types, estimate, C simulation", data, md)


if __name__ == "__main__":
    main()
