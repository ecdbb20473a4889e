"""Quantized bundles of the trained m3vit-tiny: size, task metrics and latency vs fp32, in one run.

Part 1, schemes: the model is compiled for the host with ``--quant`` fp32, fp16, int8 (static,
calibrated), int8-dynamic and int4 (group 32), and with per-expert mixed precision at 3.5 and
3 average bits per expert weight (dense partitions int8, gates fp32). For each bundle: its bytes
and ratio to fp32, the task metrics written into its manifest by the compiler (mIoU for
``semseg``, depth RMSE for ``depth``, on held-out procedural scenes never used in training),
and the median latency of one ``semseg`` run at batch 1 through the runtime (20 runs after
warm-up; 5 with ``--quick``), all side by side.

Part 2, mixed vs uniform precision at the same byte budget: for budgets of expert weight bytes
at 2.5, 3 and 3.5 average bits, the solver's per-expert plan (bits from {2, 4, 8}) against the
best uniform bit-width whose experts fit in the same budget (every bundle: dense partitions int8,
group 32).

``--quick`` runs the same on ``m3vit-micro`` (random weights) with few samples, for the tests.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from _common import machine, median, parse_args, table, timed, write_results

from edgemoe.bundle import sample_input
from edgemoe.compiler import compile_model
from edgemoe.config import CompileConfig
from edgemoe.quantization import QuantConfig
from edgemoe.runtime import Session

NAME = "bench_quant"


def _compile(model: str, quant: QuantConfig, out: Path, calib: int) -> dict:
    start = time.perf_counter()
    m = compile_model(CompileConfig(model, quant=quant, calib_samples=calib), out)
    m["_compile_s"] = time.perf_counter() - start
    return m


def _latency(bundle: Path, runs: int) -> float:
    session = Session(bundle, "semseg")
    x = sample_input(session.input_spec, batch=1, seed=0)
    for _ in range(3):
        session.run(x)
    return median([timed(lambda: session.run(x)) for _ in range(runs)])


def _bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def main() -> None:
    args = parse_args(__doc__, NAME)
    model = "m3vit-micro" if args.quick else "m3vit-tiny"
    eval_samples, calib, runs = (4, 4, 5) if args.quick else (256, 16, 20)
    tmp = Path(tempfile.mkdtemp(prefix="bench-quant-"))
    schemes = {
        "fp32": QuantConfig(),
        "fp16": QuantConfig(scheme="fp16", eval_samples=eval_samples),
        "int8": QuantConfig(scheme="int8", eval_samples=eval_samples),
        "int8-dynamic": QuantConfig(scheme="int8-dynamic", eval_samples=eval_samples),
        "int4": QuantConfig(scheme="int4", eval_samples=eval_samples),
        "mixed 3.5 bits": QuantConfig(avg_bits=3.5, eval_samples=eval_samples),
        "mixed 3 bits": QuantConfig(avg_bits=3.0, eval_samples=eval_samples),
    }
    results: dict = {"machine": machine(), "quick": args.quick, "model": model, "schemes": {}, "budgets": []}
    # fp32 metrics: the accuracy report of any quantized bundle carries them (metric_fp32).
    for name, q in schemes.items():
        out = tmp / name.replace(" ", "_")
        print(f"compile {model} {name} ...", flush=True)
        m = _compile(model, q, out, calib)
        results["schemes"][name] = {
            "bundle_bytes": _bytes(out),
            "expert_bytes": m["totals"]["expert_bytes_bundle"],
            "avg_expert_bits": m.get("quantization", {}).get("avg_expert_bits", 32.0),
            "accuracy": m.get("accuracy"),
            "latency_ms": _latency(out, runs),
            "compile_s": m["_compile_s"],
        }
    fp32 = results["schemes"]["fp32"]
    ref_acc = results["schemes"]["int8"]["accuracy"]["tasks"]
    rows = []
    for name, r in results["schemes"].items():
        acc = (r["accuracy"] or {}).get("tasks")
        cells = []
        for task in ("semseg", "depth"):
            if acc:
                cells.append(f"{acc[task]['metric']:.4f}")
            else:
                cells.append(f"{ref_acc[task]['metric_fp32']:.4f}")
        rows.append(
            [
                name,
                f"{r['bundle_bytes'] / 2**20:.2f}",
                f"{r['bundle_bytes'] / fp32['bundle_bytes']:.3f}x",
                f"{r['avg_expert_bits']:.2f}",
                *cells,
                f"{r['latency_ms']:.1f}",
                f"{r['latency_ms'] / fp32['latency_ms']:.2f}x",
            ]
        )
    md = [
        f"`{model}`, host CPU. Metrics on {eval_samples} held-out scenes (semseg: mIoU, higher is better; "
        "depth: RMSE, lower is better); latency: `semseg`, batch 1, median of "
        f"{runs} runs. Gates stay fp32; mixed precision quantizes dense partitions to int8.",
        "",
        table(
            [
                "scheme",
                "bundle MiB",
                "vs fp32",
                "bits/expert weight",
                "semseg mIoU",
                "depth RMSE",
                "latency ms",
                "vs fp32",
            ],
            rows,
        ),
    ]

    # Part 2: same budget, mixed vs best uniform.
    ex = {b: None for b in (2, 4, 8)}
    for b in ex:
        out = tmp / f"uniform{b}"
        print(f"compile {model} uniform {b}-bit experts ...", flush=True)
        m = _compile(model, QuantConfig(avg_bits=float(b), bit_choices=(b,), eval_samples=eval_samples), out, calib)
        ex[b] = {"expert_bytes": m["quantization"]["mixed_precision"]["expert_bytes"], "accuracy": m["accuracy"]}
    # Budgets between the 2- and 4-bit bundles (2.5, 3 and 3.5 bits per weight on average): above
    # 4 bits both are lossless on this model, so only there does the choice of bits matter.
    budgets = [
        int(ex[2]["expert_bytes"] + f * (ex[4]["expert_bytes"] - ex[2]["expert_bytes"])) for f in (0.25, 0.5, 0.75)
    ]
    brows = []
    for budget in budgets:
        out = tmp / f"budget{budget}"
        print(f"compile {model} mixed at {budget} B ...", flush=True)
        m = _compile(model, QuantConfig(weight_budget=budget, eval_samples=eval_samples), out, calib)
        uniform = max(b for b in ex if ex[b]["expert_bytes"] <= budget)
        mixed_acc, uni_acc = m["accuracy"]["tasks"], ex[uniform]["accuracy"]["tasks"]
        entry = {
            "budget_bytes": budget,
            "mixed": {
                "expert_bytes": m["quantization"]["mixed_precision"]["expert_bytes"],
                "avg_bits": m["quantization"]["avg_expert_bits"],
                "metrics": {t: a["metric"] for t, a in mixed_acc.items()},
            },
            "uniform": {
                "bits": uniform,
                "expert_bytes": ex[uniform]["expert_bytes"],
                "metrics": {t: a["metric"] for t, a in uni_acc.items()},
            },
        }
        results["budgets"].append(entry)
        brows.append(
            [
                f"{budget / 2**20:.2f}",
                f"{entry['mixed']['avg_bits']:.2f}",
                f"{mixed_acc['semseg']['metric']:.4f}",
                f"{mixed_acc['depth']['metric']:.4f}",
                f"{uniform}",
                f"{uni_acc['semseg']['metric']:.4f}",
                f"{uni_acc['depth']['metric']:.4f}",
            ]
        )
    md += [
        "",
        "Mixed vs uniform precision at the same expert-weight budget (uniform: the widest single bit-width that fits):",
        "",
        table(
            [
                "expert budget MiB",
                "mixed bits/weight",
                "mixed mIoU",
                "mixed depth RMSE",
                "uniform bits",
                "uniform mIoU",
                "uniform depth RMSE",
            ],
            brows,
        ),
    ]
    print("\n".join(md))
    json.dumps(results)  # fail early on anything not serialisable
    write_results(args.out, NAME, "Quantization: size, accuracy and latency vs fp32", results, "\n".join(md))


if __name__ == "__main__":
    main()
