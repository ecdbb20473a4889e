"""Shared expert kernel (weights fed at run time) vs one ONNX file per expert (weights baked in).

The design question behind the bundle format: a bundle ships ONE expert graph per expert
shape, ``gelu(x @ w1 + b1) @ w2 + b2`` with every weight a graph input, plus raw weight
files that the runtime feeds to it; the alternative is one ONNX file per expert with its
weights as initializers. This script exports both for layer 0 of m3vit-tiny
(192 -> 384 -> 192, 16 experts) with the ONNX target's settings (TorchScript exporter,
opset 17, dynamic token axis) and measures, on onnxruntime's CPU provider:

* latency: median wall time of one expert call at 16, 64 and 258 tokens (at batch 1 the
  model routes 129 tokens x top-2 = 258 slots over 16 experts, 16 per expert on average).
  Every expert is called in turn (as the runtime does); each variant is timed in its own
  block, with the same session options, for each intra-op thread count in ``--threads``
  (default: the CPU count, 1, and 0 = onnxruntime's default, which also pins its threads).
* memory and load time: in a fresh subprocess per variant (median of a few), RSS before and
  after loading all 16 experts -- (a) one session plus 16 weight sets read with numpy,
  (b) 16 sessions -- and after one call per expert. The subprocess first creates a tiny
  session, so onnxruntime's one-off environment set-up is not charged to either variant.
* on-disk bytes of what each variant ships for the layer.
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

NAME = "bench_expert_kernel"
EXPERTS = 16


def export_all(tmp: Path) -> tuple[list[dict[str, np.ndarray]], dict]:
    """Export the shared kernel, the 16 baked experts, their weight files and a tiny warm-up graph."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from edgemoe.frontends.m3vit import M3ViTAdapter
    from edgemoe.models import resolve_model

    class Baked(nn.Module):
        def __init__(self, w: dict[str, np.ndarray]):
            super().__init__()
            for k, v in w.items():
                self.register_buffer(k, torch.from_numpy(v))

        def forward(self, x):
            return F.gelu(x @ self.w1 + self.b1) @ self.w2 + self.b2

    def export(module, inputs, names, path):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                inputs,
                str(path),
                input_names=names,
                output_names=["y"],
                dynamic_axes={"x": {0: "tokens"}, "y": {0: "tokens"}},
                opset_version=17,
                do_constant_folding=True,
                dynamo=False,
            )

    adapter = M3ViTAdapter(resolve_model("m3vit-tiny").build())
    part = adapter.expert_kernel(0)
    weights = [adapter.expert_weights(0, e) for e in range(EXPERTS)]
    export(part.module, part.example_inputs, list(part.input_names), tmp / "shared.onnx")
    (tmp / "baked").mkdir()
    (tmp / "weights").mkdir()
    for e, w in enumerate(weights):
        export(Baked(w), (part.example_inputs[0],), ["x"], tmp / "baked" / f"E{e}.onnx")
        np.savez(tmp / "weights" / f"E{e}.npz", **w)
    write_tiny(tmp / "tiny.onnx")
    size = lambda pattern: sum(p.stat().st_size for p in tmp.glob(pattern))  # noqa: E731
    disk = {
        "shared": size("shared.onnx") + size("weights/*.npz"),
        "shared_graph": size("shared.onnx"),
        "baked": size("baked/*.onnx"),
    }
    return weights, disk


def child(variant: str, tmp: Path, threads: int) -> None:
    """Subprocess body: load one variant's 16 experts and print RSS deltas and load time as JSON."""
    ort_session(tmp / "tiny.onnx", threads).run(None, {"x": np.zeros(1, np.float32)})
    before = rss_bytes()
    start = time.perf_counter()
    if variant == "shared":
        kernel = ort_session(tmp / "shared.onnx", threads)
        experts = []
        for e in range(EXPERTS):
            with np.load(tmp / "weights" / f"E{e}.npz") as f:
                experts.append({k: f[k] for k in ("w1", "b1", "w2", "b2")})
        calls = [lambda x, w=w: kernel.run(None, {"x": x, **w}) for w in experts]
    else:
        sessions = [ort_session(tmp / "baked" / f"E{e}.onnx", threads) for e in range(EXPERTS)]
        calls = [lambda x, s=s: s.run(None, {"x": x}) for s in sessions]
    load_ms = (time.perf_counter() - start) * 1e3
    loaded = rss_bytes()
    x = np.random.default_rng(0).standard_normal((64, 192), dtype=np.float32)
    for call in calls:
        call(x)
    print(json.dumps({"load_ms": load_ms, "rss_load": loaded - before, "rss_run": rss_bytes() - before}))


def memory(variant: str, tmp: Path, threads: int, reps: int) -> dict:
    runs = []
    for _ in range(reps):
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, str(tmp), str(threads)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return {k: median([r[k] for r in runs]) for k in runs[0]}


def latency(weights, tmp: Path, threads: int, tokens: int, rounds: int) -> dict:
    """Median ms per expert call for both variants, each timed in its own block."""
    shared = ort_session(tmp / "shared.onnx", threads)
    baked = [ort_session(tmp / "baked" / f"E{e}.onnx", threads) for e in range(EXPERTS)]
    x = np.random.default_rng(tokens).standard_normal((tokens, 192), dtype=np.float32)
    err = max(
        float(np.abs(baked[e].run(None, {"x": x})[0] - shared.run(None, {"x": x, **weights[e]})[0]).max())
        for e in range(EXPERTS)
    )
    if err > 1e-4:
        raise SystemExit(f"shared and baked kernels disagree by {err:.3g}")
    calls = {
        "shared": [lambda w=w: shared.run(None, {"x": x, **w}) for w in weights],
        "baked": [lambda s=s: s.run(None, {"x": x}) for s in baked],
    }
    result = {"max_abs_diff": err}
    for variant, fns in calls.items():
        for fn in fns:  # warm-up round
            fn()
        result[variant] = median([timed(fn) for _ in range(rounds) for fn in fns])
    return result


def main() -> None:
    args = parse_args(__doc__, NAME)
    rounds, reps, token_counts = (3, 1, (16, 258)) if args.quick else (40, 3, (16, 64, 258))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        weights, disk = export_all(tmp)
        print(f"exported 1 shared + {EXPERTS} baked graphs in {time.perf_counter() - t0:.1f} s")
        lat = [
            {"threads": t, "tokens": n, **latency(weights, tmp, t, n, rounds)}
            for t in args.threads
            for n in token_counts
        ]
        mem = {v: memory(v, tmp, args.threads[0], reps) for v in ("shared", "baked")}

    rows = [
        [
            thread_label(r["threads"]),
            r["tokens"],
            f"{r['shared']:.3f}",
            f"{r['baked']:.3f}",
            ratio(r["shared"], r["baked"]),
        ]
        for r in lat
    ]
    lat_md = table(["threads", "tokens", "shared kernel ms/call", "per-expert ONNX ms/call", "shared / baked"], rows)
    s, b = mem["shared"], mem["baked"]
    mem_rows = [
        [label, f"{s[k] / scale:.1f}", f"{b[k] / scale:.1f}", ratio(s[k], b[k])]
        for label, k, scale in (
            ("RSS after loading 16 experts (MiB)", "rss_load", MiB),
            ("RSS after one call per expert (MiB)", "rss_run", MiB),
            ("load time, 16 experts (ms)", "load_ms", 1),
        )
    ] + [
        [
            "on disk (MiB)",
            f"{disk['shared'] / MiB:.2f} (graph {disk['shared_graph'] / 1024:.1f} KiB)",
            f"{disk['baked'] / MiB:.2f}",
            ratio(disk["shared"], disk["baked"]),
        ],
    ]
    mem_md = table(
        ["m3vit-tiny layer 0, 16 experts", "(a) shared kernel + weights", "(b) 16 per-expert ONNX", "(a) / (b)"],
        mem_rows,
    )
    md = (
        f"Median per expert call over {rounds} rounds x {EXPERTS} experts (onnxruntime CPU):\n\n"
        f"{lat_md}\n\nMemory and load time in a fresh subprocess (median of {reps}, "
        f"{thread_label(args.threads[0])} threads):\n\n{mem_md}\n"
    )
    print("\n" + md)
    data = {
        "name": NAME,
        "quick": args.quick,
        "machine": machine(),
        "model": "m3vit-tiny",
        "layer": 0,
        "experts": EXPERTS,
        "rounds": rounds,
        "memory_reps": reps,
        "latency_ms": lat,
        "memory": mem,
        "disk_bytes": disk,
    }
    title = "Expert kernel: shared graph + runtime weights vs one ONNX per expert"
    write_results(args.out, NAME, title, data, md)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
