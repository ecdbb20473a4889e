"""Compiling a checkpoint folder streamed vs loaded whole: peak RSS and time, side by side.

Random bf16 checkpoints with OLMoE-1B-7B's dimensions (hidden 2048, 64 experts of width 1024,
vocabulary 50304) and 2 or 3 layers, written tensor by tensor in the hub's layout
(tests/big_checkpoint.py). Each folder is compiled twice, each compile in its own process whose peak
RSS (``VmHWM``: its own address space's high-water mark) is reported: ``--no-stream``
(transformers loads the model, float32, then the partitions are exported) and ``--stream`` (the
model is built without weights; each graph's and each expert's tensors are read from the shards as
they are written). Both bundles must hold the same expert blobs (sha256) and the same routing profile.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, machine, parse_args, ratio, table, write_results

sys.path.insert(0, str(HERE.parent))  # the checkpoint writer lives with the tests that use it

from edgemoe.bundle.format import read_manifest
from tests.big_checkpoint import OLMOE_1B_7B, compile_peak_rss, olmoe_tensors, write_checkpoint

GB = 1e9


def main() -> None:
    args = parse_args(__doc__, "bench_stream_compile")
    layer_counts = [1] if args.quick else [2, 3]
    rows, runs = [], []
    root = Path(tempfile.mkdtemp(prefix="stream-compile-"))
    try:
        for layers in layer_counts:
            cfg = {**OLMOE_1B_7B, "num_hidden_layers": layers}
            folder = root / f"olmoe-{layers}"
            size = write_checkpoint(folder, cfg, olmoe_tensors(cfg))
            result = {"layers": layers, "checkpoint_bytes": size}
            hashes = {}
            for mode in ("--no-stream", "--stream"):
                out = root / f"bundle-{layers}{mode}"
                start = time.perf_counter()
                rss, _ = compile_peak_rss(folder, out, mode, "-q")
                seconds = time.perf_counter() - start
                m = read_manifest(out)
                hashes[mode] = (
                    [[e["sha256"] for e in layer["experts"]] for layer in m["moe_layers"]],
                    {t: v["expert_counts"] for t, v in m["tasks"].items()},
                )
                result[mode.strip("-")] = {"peak_rss_bytes": rss, "seconds": seconds}
                print(f"{layers} layers {mode}: peak RSS {rss / GB:.2f} GB, {seconds:.1f} s", flush=True)
                shutil.rmtree(out)
            result["same_bundle_content"] = hashes["--no-stream"] == hashes["--stream"]
            assert result["same_bundle_content"], "streamed and loaded bundles differ"
            shutil.rmtree(folder)
            runs.append(result)
            loaded, streamed = result["no-stream"], result["stream"]
            rows.append(
                [
                    f"{layers} ({size / GB:.2f} GB bf16)",
                    f"{loaded['peak_rss_bytes'] / GB:.2f} GB ({loaded['peak_rss_bytes'] / size:.2f}x)",
                    f"{streamed['peak_rss_bytes'] / GB:.2f} GB ({streamed['peak_rss_bytes'] / size:.2f}x)",
                    ratio(loaded["peak_rss_bytes"], streamed["peak_rss_bytes"]),
                    f"{loaded['seconds']:.0f} s",
                    f"{streamed['seconds']:.0f} s",
                ]
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = ["layers (checkpoint)", "peak RSS loaded", "peak RSS streamed", "loaded/streamed"]
    header += ["time loaded", "time streamed"]
    md = table(header, rows) + (
        "\n\nPeak RSS of the whole compile process (`VmHWM`), x = share of the checkpoint's bytes. "
        "Both bundles hold the same expert blobs (sha256) and routing profile. The streamed peak is the "
        "process (torch, transformers, onnx, onnxruntime: ~0.45 GB) plus its largest partition, the "
        "embedding or the LM head (50304 x 2048 in fp32: 0.41 GB), whatever the layer count."
    )
    print("\n" + md)
    write_results(
        args.out,
        "bench_stream_compile",
        "Streamed compile of a checkpoint folder",
        {"machine": machine(), "quick": args.quick, "runs": runs},
        md,
    )


if __name__ == "__main__":
    main()
