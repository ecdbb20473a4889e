"""TVM (untuned and MetaSchedule-tuned) vs onnxruntime, side by side in one run on this CPU.

For each model, three bundles of the same model: ``--target onnx``, ``--target tvm`` and
``--target tvm --tuning-db DB`` where DB comes from ``edgemoe tune`` (``tune_model``: expert
kernels per token bucket 16/64/256 and trunk segments at batch 1 (sequence 16 for the token
model), random search, a small trial budget). Measured, each variant in its own block, with
every executor at its default threads:

(a) the expert kernel alone: layer 0's kernel graph loaded from each bundle, called with one
    expert's weights at 16 tokens (m3vit-tiny's average per expert at batch 1) and 40 tokens
    (between buckets: padded to 64 in the tuned build); median ms per call;
(b) a whole task through ``edgemoe.runtime.Session`` at batch 1; median ms per run, and the
    max abs difference of each TVM output from the onnxruntime one.

Ratios are against onnxruntime. Tuning time is reported too.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, median, parse_args, ratio, table, timed, write_results

NAME = "bench_tvm"
# model, task, tuning trials, tuned batch/seq of the trunk
MODELS = [("m3vit-tiny", "semseg", 128, {"batch": 1}), ("mixtral-lm-micro", None, 64, {"batch": 1, "seq": 16})]
TOKENS = (16, 40)
VARIANTS = {"ort": "onnxruntime", "tvm": "TVM untuned", "tuned": "TVM tuned"}


def kernel_graph(bundle: Path, manifest: dict):
    """Layer 0's expert kernel of a bundle, loaded by the bundle's executor, and its input names."""
    from edgemoe.runtime.executor import get_executor

    name = manifest["moe_layers"][0]["kernel"]
    record = manifest["graphs"][name]
    return get_executor(manifest["target"]["executor"]).load(bundle, record)


def bench_model(model, task, trials, dims, tmp: Path, runs: int, rounds: int, progress) -> dict:
    from edgemoe.bundle import read_manifest, sample_input
    from edgemoe.compiler import compile_model
    from edgemoe.config import CompileConfig
    from edgemoe.passes.capture_model import capture_model
    from edgemoe.runtime import Session
    from edgemoe.targets.tvm.tune import TuningShapes, tune_model

    db = tmp / f"{model}-db"
    t0 = time.perf_counter()
    summary = tune_model(model, db, trials, shapes=TuningShapes(dims=dims), progress=progress)
    tune_s = time.perf_counter() - t0
    bundles, compile_s = {}, {}
    for key, target, tuning in (("ort", "onnx", None), ("tvm", "tvm", None), ("tuned", "tvm", str(db))):
        bundles[key] = tmp / f"{model}-{key}"
        t0 = time.perf_counter()
        compile_model(CompileConfig(model=model, target=target, tuning_db=tuning), bundles[key])
        compile_s[key] = time.perf_counter() - t0
        progress(f"{model}: compiled {key} in {compile_s[key]:.0f} s")
    manifest = read_manifest(bundles["ort"])
    task = task or next(iter(manifest["tasks"]))

    # (a) expert kernel alone: expert 0 of layer 0 (the kernel partition's example weights).
    kpart = capture_model(CompileConfig(model=model)).adapter.expert_kernel(0)
    weights = [t.numpy() for t in kpart.example_inputs[1:]]
    d_in = kpart.example_inputs[0].shape[1]
    kernels = {k: kernel_graph(b, read_manifest(b)) for k, b in bundles.items()}
    kernel_rows = []
    for n in TOKENS:
        x = np.random.default_rng(n).standard_normal((n, d_in), dtype=np.float32)
        want = kernels["ort"].run(x, *weights)[0]
        row = {"tokens": n}
        for k, g in kernels.items():
            err = float(np.abs(g.run(x, *weights)[0] - want).max())
            for _ in range(3):
                g.run(x, *weights)
            times = [timed(lambda g=g, x=x: g.run(x, *weights)) for _ in range(rounds)]
            row[k] = {"median_ms": median(times), "err": err}
        kernel_rows.append(row)

    # (b) whole task through Session.
    sessions = {k: Session(b, task) for k, b in bundles.items()}
    x = sample_input(sessions["ort"].input_spec, batch=1, seed=0)
    if "seq" in dims and x.ndim == 2:
        x = np.random.default_rng(0).integers(0, sessions["ort"].input_spec.get("high", 2), (1, dims["seq"]))
    want = sessions["ort"].run(x)
    task_row = {"input_shape": list(x.shape)}
    for k, s in sessions.items():
        err = float(np.abs(s.run(x).astype(np.float64) - want).max())
        for _ in range(3):
            s.run(x)
        task_row[k] = {"median_ms": median([timed(lambda s=s: s.run(x)) for _ in range(runs)]), "err_vs_ort": err}
    progress(f"{model}: measured")
    return {
        "model": model,
        "task": task,
        "trials": trials,
        "tune_s": tune_s,
        "compile_s": compile_s,
        "tuning": {k: summary[k] for k in ("shapes", "search", "cost_model", "trials_per_task", "tasks", "partitions")},
        "kernel": {"name": kpart.name, "rows": kernel_rows},
        "whole_task": task_row,
    }


def main() -> None:
    args = parse_args(__doc__, NAME)
    runs, rounds = (5, 20) if args.quick else (30, 200)
    models = [(m, t, 8 if args.quick else n, d) for m, t, n, d in MODELS]
    start = time.perf_counter()

    def progress(msg):
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory() as d:
        results = [bench_model(*m, Path(d), runs, rounds, progress) for m in models]

    krows, trows = [], []
    for r in results:
        for row in r["kernel"]["rows"]:
            base = row["ort"]["median_ms"]
            krows.append(
                [r["model"], r["kernel"]["name"], row["tokens"]]
                + [f"{row[k]['median_ms']:.3f} ({ratio(row[k]['median_ms'], base)})" for k in VARIANTS]
            )
        t = r["whole_task"]
        base = t["ort"]["median_ms"]
        trows.append(
            [r["model"], r["task"], "x".join(map(str, t["input_shape"]))]
            + [f"{t[k]['median_ms']:.2f} ({ratio(t[k]['median_ms'], base)})" for k in VARIANTS]
            + [f"{max(t['tvm']['err_vs_ort'], t['tuned']['err_vs_ort']):.1g}", f"{r['trials']} / {r['tune_s']:.0f} s"]
        )
    head = [VARIANTS[k] + " ms (vs ORT)" for k in VARIANTS]
    md = (
        f"Every variant at its executor's default threads, each in its own block. Tuned: `edgemoe tune` with "
        f"random search (cost model `random`), expert kernels tuned per token bucket 16/64/256 (40 tokens run "
        f"padded to 64), trunk segments at batch 1 (sequence 16 for the token model); other shapes run the "
        f"untuned generic code.\n\n(a) Expert kernel alone, layer 0, one expert, median of {rounds} calls:\n\n"
        + table(["model", "kernel", "tokens", *head], krows)
        + f"\n\n(b) Whole task through `Session`, batch 1, median of {runs} runs:\n\n"
        + table(["model", "task", "input", *head, "max abs diff vs ORT", "trials / tuning time"], trows)
        + "\n\nAbsolute times move with whatever else shares the 2 cores; ratios come from the same run.\n"
    )
    print("\n" + md)
    data = {"name": NAME, "quick": args.quick, "machine": machine(), "runs": runs, "rounds": rounds, "models": results}
    import tvm

    data["machine"]["tvm"] = tvm.__version__
    write_results(args.out, NAME, "TVM vs onnxruntime (untuned and MetaSchedule-tuned)", data, md)


if __name__ == "__main__":
    main()
