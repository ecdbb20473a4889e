"""edgemoe runtime vs the PyTorch reference vs one monolithic ONNX graph, m3vit-tiny semseg, batch 1.

Three ways to run the same task on the same deterministic input (``sample_input``, seed 0):

(i) edgemoe: ``Session(bundle, task="semseg")`` on a bundle freshly compiled into a temporary
    folder (trunk segments, gates and head as ONNX graphs; one shared expert kernel per shape;
    expert weights read lazily);
(ii) PyTorch: the reference ``nn.Module`` under ``torch.no_grad()`` in eval mode;
(iii) monolithic ONNX: the whole model for this task exported as one graph (TorchScript
    exporter, opset 17, dynamic batch; the MoE's nonzero / index_add dispatch exports as is)
    and run in onnxruntime. Its output must match PyTorch to 1e-4 or the script fails.

For each intra-op thread count in ``--threads`` every runner is timed in its own block: a
few warm-up runs, then the median of N runs (N = 30; 5 with ``--quick``). onnxruntime's
``intra_op_num_threads`` and ``torch.set_num_threads`` get the same value; the default
list is the CPU count, 1, and 0: both libraries' defaults (what ``edgemoe run`` uses;
onnxruntime then takes one thread per physical core and pins them).

"Peak resident weight bytes" is what each runner keeps resident for weights after the runs:
edgemoe ``stats.graph_bytes + stats.resident_expert_bytes``; PyTorch the bytes of all
parameters and buffers (every task's gates and heads included); monolithic ONNX the size of
the ``.onnx`` file. As a cross-check, each runner is also loaded in a fresh subprocess and its
RSS increase after loading and after one run is recorded (onnxruntime's one-off environment
set-up is paid before the first reading, torch's import too).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from _common import (
    MiB,
    machine,
    median,
    ort_session,
    parse_args,
    ratio,
    rss_bytes,
    table,
    thread_label,
    timed,
    write_results,
    write_tiny,
)

NAME = "bench_runtime"
MODEL, TASK = "m3vit-tiny", "semseg"
RUNNERS = {"edgemoe": "edgemoe Session", "torch": "PyTorch reference", "onnx": "monolithic ONNX"}


def export_monolithic(model, x: np.ndarray, path: Path) -> None:
    import torch

    class OneTask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, img):
            return self.model(img, TASK)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            OneTask().eval(),  # a training-mode wrapper would leave BatchNorm in training mode after export
            (torch.from_numpy(x),),
            str(path),
            input_names=["image"],
            output_names=[TASK],
            dynamic_axes={"image": {0: "batch"}, TASK: {0: "batch"}},
            opset_version=17,
            do_constant_folding=True,
            dynamo=False,
        )


def child(runner: str, tmp: Path, threads: int) -> None:
    """Subprocess body: load one runner, run it once, print RSS deltas as JSON."""
    x = np.load(tmp / "input.npy")
    if runner == "torch":
        import torch

        from edgemoe.models import m3vit, resolve_model

        if threads:
            torch.set_num_threads(threads)
        assert m3vit.M3ViT  # imported before the first reading
        before = rss_bytes()
        model = resolve_model(MODEL).build()
        loaded = rss_bytes()
        with torch.no_grad():
            model(torch.from_numpy(x), TASK)
    else:
        ort_session(tmp / "tiny.onnx", threads).run(None, {"x": np.zeros(1, np.float32)})
        if runner == "edgemoe":
            from edgemoe.runtime import Session

            before = rss_bytes()
            sess = Session(tmp / "bundle", TASK, threads=threads)
            loaded = rss_bytes()
            sess.run(x)
        else:
            before = rss_bytes()
            sess = ort_session(tmp / "model.onnx", threads)
            loaded = rss_bytes()
            sess.run(None, {"image": x})
    print(json.dumps({"rss_load": loaded - before, "rss_run": rss_bytes() - before}))


def rss(runner: str, tmp: Path, threads: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", runner, str(tmp), str(threads)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    args = parse_args(__doc__, NAME)
    runs, warmup = (5, 1) if args.quick else (30, 3)

    import torch

    from edgemoe.bundle import sample_input
    from edgemoe.compiler import compile_model
    from edgemoe.config import CompileConfig
    from edgemoe.models import resolve_model
    from edgemoe.runtime import Session

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        manifest = compile_model(CompileConfig(MODEL), tmp / "bundle")
        compile_s = time.perf_counter() - t0
        x = sample_input(manifest["input"], batch=1, seed=0)
        np.save(tmp / "input.npy", x)
        model = resolve_model(MODEL).build()
        t0 = time.perf_counter()
        export_monolithic(model, x, tmp / "model.onnx")
        export_s = time.perf_counter() - t0
        write_tiny(tmp / "tiny.onnx")
        print(f"compiled the bundle in {compile_s:.1f} s, exported the monolithic graph in {export_s:.1f} s")
        with torch.no_grad():
            want = model(torch.from_numpy(x), TASK).numpy()

        results, torch_default = [], torch.get_num_threads()
        for threads in args.threads:
            torch.set_num_threads(threads or torch_default)
            session = Session(tmp / "bundle", TASK, threads=threads)
            mono = ort_session(tmp / "model.onnx", threads)
            fns = {
                "edgemoe": lambda s=session: s.run(x),
                "torch": lambda: model(torch.from_numpy(x), TASK).numpy(),
                "onnx": lambda m=mono: m.run(None, {"image": x})[0],
            }
            row = {"threads": threads}
            with torch.no_grad():
                for name, fn in fns.items():
                    err = float(np.abs(fn() - want).max())
                    if name == "onnx" and err > 1e-4:
                        raise SystemExit(f"monolithic ONNX differs from PyTorch by {err:.3g} (> 1e-4)")
                    for _ in range(warmup):
                        fn()
                    row[name] = {"median_ms": median([timed(fn) for _ in range(runs)]), "max_abs_err": err}
            stats = session.stats
            results.append(row)
            del session, mono

        weights = {
            "edgemoe": stats.graph_bytes + stats.resident_expert_bytes,
            "torch": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())),
            "onnx": (tmp / "model.onnx").stat().st_size,
        }
        mem = {r: rss(r, tmp, args.threads[0]) for r in RUNNERS}

    rows = []
    for r in results:
        base = r["torch"]["median_ms"]
        rows += [
            [
                thread_label(r["threads"]),
                label,
                f"{r[k]['median_ms']:.1f}",
                ratio(r[k]["median_ms"], base),
                "0 (reference)" if k == "torch" else f"{r[k]['max_abs_err']:.2g}",
            ]
            for k, label in RUNNERS.items()
        ]
    lat_md = table(["threads", "runner", "median ms", "vs PyTorch", "max abs err vs PyTorch"], rows)
    mem_rows = [
        [
            label,
            f"{weights[k] / MiB:.1f}",
            ratio(weights[k], weights["torch"]),
            f"{mem[k]['rss_load'] / MiB:.1f}",
            f"{mem[k]['rss_run'] / MiB:.1f}",
        ]
        for k, label in RUNNERS.items()
    ]
    mem_md = table(
        ["runner", "peak resident weights (MiB)", "vs PyTorch", "RSS after load (MiB)", "RSS after 1 run (MiB)"],
        mem_rows,
    )
    md = (
        f"{MODEL} `{TASK}`, batch 1: median of {runs} runs after {warmup} warm-up runs, each runner in its own "
        f"block.\n\n{lat_md}\n\nedgemoe loaded {stats.experts_loaded} of the task's {stats.experts_task} experts "
        f"({stats.expert_bytes_loaded / MiB:.1f} of {stats.expert_bytes_task / MiB:.1f} MiB); graphs "
        f"{stats.graph_bytes / MiB:.1f} MiB. RSS columns: increase in a fresh subprocess "
        f"({thread_label(args.threads[0])} threads).\n\n{mem_md}\n"
    )
    print("\n" + md)
    data = {
        "name": NAME,
        "quick": args.quick,
        "machine": machine(),
        "model": MODEL,
        "task": TASK,
        "batch": 1,
        "runs": runs,
        "warmup": warmup,
        "compile_s": compile_s,
        "export_s": export_s,
        "latency": results,
        "resident_weight_bytes": weights,
        "rss_bytes": mem,
        "edgemoe_stats": {k: getattr(stats, k) for k in stats.__dataclass_fields__},
    }
    write_results(args.out, NAME, f"Runtime: edgemoe vs PyTorch vs monolithic ONNX ({MODEL}, {TASK})", data, md)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
