"""Run a CUDA bundle of the tvm target on a real GPU: errors against torch references, latency per task.

Two steps, on two machines:

``prepare`` (the build machine, with torch and the compiler) writes reference inputs and outputs
of every task of a bundle as .npy files next to it::

    edgemoe compile m3vit-tiny --target tvm --device benchmarks/devices/h100.toml -o CARRY/bundle
    python benchmarks/bench_tvm_cuda.py prepare CARRY

``run`` (the GPU machine: numpy and a runtime-only TVM, no torch needed) runs each task through
``edgemoe.runtime.Session`` (tvm executor, kernels on the GPU), compares with the references
(bar: max abs error <= 1e-4), times ``Session.run`` (median of ``--runs`` calls after warm-up)
with activations kept on the GPU (the default) beside the same graphs with activations copied to
numpy between graphs (``TvmExecutor(resident=False)``), interleaved, and the expert kernel alone
with the VM's ``time_evaluator`` (inputs resident on the GPU), and writes JSON::

    python benchmarks/bench_tvm_cuda.py run CARRY --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import timed

BATCHES = (1, 2)
BAR = 1e-4


def prepare(carry: Path) -> None:
    """Reference inputs and torch outputs of every task of ``carry/bundle`` into ``carry/ref``."""
    from edgemoe.bundle import sample_input
    from edgemoe.config import CompileConfig
    from edgemoe.passes.capture_model import capture_model

    m = json.loads((carry / "bundle" / "manifest.json").read_text())
    adapter = capture_model(CompileConfig(model=m["model"]["name"])).adapter
    ref = carry / "ref"
    ref.mkdir(parents=True, exist_ok=True)
    for task, rec in m["tasks"].items():
        keep = {li: tuple(s) for li, s in enumerate(rec["experts"])}
        for batch in BATCHES:
            x = sample_input(m["input"], batch=batch, seed=batch)
            np.save(ref / f"{task}_b{batch}_x.npy", x)
            np.save(ref / f"{task}_b{batch}_y.npy", np.asarray(adapter.reference(x, task, keep), np.float32))
    print(f"references for {list(m['tasks'])} x batch {BATCHES} in {ref}")


def _stats(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms)
    return {
        "median_ms": float(np.median(t)),
        "p10_ms": float(np.percentile(t, 10)),
        "p90_ms": float(np.percentile(t, 90)),
        "runs": len(t),
    }


def _gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(carry: Path, runs: int, warmup: int) -> dict:
    """Errors and latencies of every task and of the expert kernels of ``carry/bundle`` on the GPU."""
    from edgemoe.runtime import Session
    from edgemoe.targets.tvm.executor import TvmExecutor, import_tvm

    bundle, ref = carry / "bundle", carry / "ref"
    m = json.loads((bundle / "manifest.json").read_text())
    tvm = import_tvm()
    result: dict = {
        "model": m["model"]["name"],
        "device_profile": m["device"]["name"],
        "tvm_target": m["target"]["tvm_target"],
        "gpu": _gpu_name(),
        "tvm": tvm.__version__,
        "python": platform.python_version(),
        "bar_max_abs_error": BAR,
        "tasks": {},
        "expert_kernels": {},
        "graph_bytes": {n: g["bytes"] for n, g in m["graphs"].items()},
    }
    for task in m["tasks"]:
        t0 = time.perf_counter()
        session = Session(bundle, task)  # activations stay on the GPU (ResidentProgram)
        entry: dict = {
            "load_s": time.perf_counter() - t0,
            "executor": session.executor.name,
            "program": type(session.program).__name__,
        }
        # The same graphs, activations copied to numpy between graphs (the path before dispatch graphs).
        host = Session(bundle, task, executor=TvmExecutor(resident=False))
        for batch in BATCHES:
            x, want = np.load(ref / f"{task}_b{batch}_x.npy"), np.load(ref / f"{task}_b{batch}_y.npy")
            got = session.run(x)
            err = float(np.abs(got.astype(np.float64) - want).max())
            same = bool(np.array_equal(got, host.run(x)))
            for _ in range(warmup):
                session.run(x), host.run(x)
            copies = getattr(session.program, "host_copies", 0)
            times, host_times = [], []
            for _ in range(runs):  # interleaved: both see the same GPU clocks
                times.append(timed(lambda s=session, x=x: s.run(x)))
                host_times.append(timed(lambda s=host, x=x: s.run(x)))
            entry[f"batch_{batch}"] = {
                "max_abs_error": err,
                "passes_bar": err <= BAR,
                "equals_host_path": same,
                "host_copies_per_run": (getattr(session.program, "host_copies", 0) - copies) / runs,
                **_stats(times),
                "host_path": _stats(host_times),
                "resident_over_host_path": float(np.median(times) / np.median(host_times)),
            }
            print(
                f"{task} batch {batch}: max abs error {err:.3g}, median {np.median(times):.3f} ms resident, "
                f"{np.median(host_times):.3f} ms through numpy",
                flush=True,
            )
        result["tasks"][task] = entry
    executor = TvmExecutor()
    for name, rec in m["graphs"].items():
        if rec["kind"] != "expert_kernel":
            continue
        graph = executor.load(bundle, rec)
        layer = next(layer for layer in m["moe_layers"] if layer["kernel"] == name)
        rng = np.random.default_rng(0)
        for tokens in (16, 256):
            args = [rng.standard_normal((tokens, layer["expert_shape"]["d_model"])).astype(np.float32)]
            args += [rng.standard_normal(p["shape"]).astype(np.float32) * 0.05 for p in layer["expert_shape"]["params"]]
            dev_args = [tvm.runtime.tensor(a, graph._device) for a in args]
            timer = graph._vm.time_evaluator("main", graph._device, number=100, repeat=5, min_repeat_ms=50)
            res = timer(*dev_args)
            result["expert_kernels"][f"{name}_tokens{tokens}"] = {
                "median_us": float(np.median(res.results) * 1e6),
                "mean_us": float(res.mean * 1e6),
                "repeats": len(res.results),
                "number": 100,
            }
            print(f"{name} tokens {tokens}: {np.median(res.results) * 1e6:.2f} us", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "run"))
    parser.add_argument("carry", type=Path, help="folder holding bundle/ (and ref/ after prepare)")
    parser.add_argument("--out", type=Path, help="JSON result file (run)")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.carry)
        return 0
    result = run(args.carry, args.runs, args.warmup)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    ok = all(v["passes_bar"] for t in result["tasks"].values() for k, v in t.items() if k.startswith("batch_"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
