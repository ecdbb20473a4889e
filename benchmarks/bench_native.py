"""edgemoe-rt (native) vs `edgemoe run` (Python) on the same TVM bundle: output, latency, RSS, start-up.

One TVM bundle of m3vit-tiny for the host, untuned and MetaSchedule-tuned (``EDGEMOE_BENCH_TRIALS``
trials per library, default 64), one input; per round, interleaved: each runtime as a fresh process
with ``--repeat 1`` (wall time from process start to exit with the output written = start-up to
first output, GNU time's few ms included; its peak RSS, by GNU time = RSS after one run) and with
``--repeat R`` (median latency of the timed runs). Medians over the rounds; outputs compared.
Threads: both runtimes use TVM's default thread pool, sized by ``TVM_NUM_THREADS`` where it is
set (passed to both) and otherwise by TVM (on x86, half the logical CPUs: one worker on 2 CPUs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, parse_args, table, write_results

ROOT = Path(__file__).resolve().parents[1]
RT = ROOT / "build" / "native" / "edgemoe-rt"
MODEL, TASK = "m3vit-tiny", "semseg"


def run_process(cmd: list[str], env: dict, rss_file: Path) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes) and stdout of one process.

    The peak RSS comes from GNU time (``/usr/bin/time``), whose child is forked from it: a child
    forked from this (torch-laden) process would report this process's RSS from before its exec.
    """
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *cmd], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr[-2000:]}")
    return wall, int(rss_file.read_text().split()[-1]) * 1024, proc.stdout  # %M is KiB


def build_bundle(work: Path, trials: int) -> Path:
    from edgemoe.compiler import compile_model
    from edgemoe.config import CompileConfig

    db = None
    if trials:
        from edgemoe.targets.tvm.tune import TuningShapes, tune_model

        db = work / "db"
        tune_model(MODEL, db, trials, shapes=TuningShapes())
    out = work / f"bundle-{'tuned' if trials else 'untuned'}"
    compile_model(CompileConfig(model=MODEL, target="tvm", tuning_db=str(db) if db else None), out)
    return out


def measure(bundle: Path, x_path: Path, work: Path, rounds: int, repeat: int) -> dict:
    py = [str(Path(sys.executable).parent / "edgemoe"), "run"]
    env_py = dict(os.environ)
    env_rt = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}  # no Python on this path
    # The thread pool's size must be the same for both runtimes.
    env_rt.update({k: os.environ[k] for k in ("TVM_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ})
    rows = {
        "python": {"startup_s": [], "rss": [], "latency_ms": []},
        "native": {"startup_s": [], "rss": [], "latency_ms": []},
    }
    outputs = {}
    for _ in range(rounds):
        for name, base, env in (("python", py, env_py), ("native", [str(RT)], env_rt)):
            y = work / f"y-{name}.npy"
            cmd = [*base, str(bundle), "--task", TASK, "--input", str(x_path), "--output", str(y), "--json"]
            wall, rss, _ = run_process(cmd, env, work / "rss.txt")
            rows[name]["startup_s"].append(wall)
            rows[name]["rss"].append(rss)
            outputs[name] = np.load(y)
            _, _, out = run_process([*cmd, "--repeat", str(repeat)], env, work / "rss.txt")
            rows[name]["latency_ms"].append(json.loads(out)["latency_ms"])
    diff = float(np.abs(outputs["python"].astype(np.float64) - outputs["native"]).max())
    summary = {name: {k: median(v) for k, v in r.items()} for name, r in rows.items()}
    return {"rounds": rows, "median": summary, "max_abs_diff": diff}


def main() -> None:
    args = parse_args(__doc__, "bench_native")
    subprocess.run(["make", "native"], cwd=ROOT, check=True, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="bench-native-"))
    rounds, repeat = (2, 2) if args.quick else (9, 5)
    trials = [0] if args.quick else [0, int(os.environ.get("EDGEMOE_BENCH_TRIALS", "64"))]
    spec_bundle = None
    data = {"machine": machine(), "quick": args.quick, "model": MODEL, "task": TASK, "bundles": {}}
    for t in trials:
        bundle = build_bundle(work, t)
        spec_bundle = spec_bundle or bundle
        spec = json.loads((bundle / "manifest.json").read_text())["input"]
        from edgemoe.bundle import sample_input

        x_path = work / "x.npy"
        np.save(x_path, sample_input(spec, batch=1, seed=0))
        label = f"tuned ({t} trials)" if t else "untuned"
        data["bundles"][label] = measure(bundle, x_path, work, rounds, repeat)
        print(label, json.dumps(data["bundles"][label]["median"]), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for label, r in data["bundles"].items():
        p, n = r["median"]["python"], r["median"]["native"]
        rows.append(
            [
                label,
                f"{p['latency_ms']:.1f} / {n['latency_ms']:.1f} ({n['latency_ms'] / p['latency_ms']:.2f}x)",
                f"{p['rss'] / 2**20:.1f} / {n['rss'] / 2**20:.1f} MiB ({n['rss'] / p['rss']:.2f}x)",
                f"{p['startup_s']:.2f} / {n['startup_s']:.3f} s ({n['startup_s'] / p['startup_s']:.2f}x)",
                f"{r['max_abs_diff']:.1e}",
            ]
        )
    md = table(
        ["m3vit-tiny semseg, host TVM bundle", "latency Python / native", "peak RSS, one run", "start-up to output",
         "max |diff|"],
        rows,
    )  # fmt: skip
    md += f"\n\nMedians of {rounds} interleaved rounds; latency: median of {repeat} timed runs per process."
    write_results(args.out, "bench_native", "Native runtime (edgemoe-rt) vs Python runtime", data, md)


if __name__ == "__main__":
    main()
