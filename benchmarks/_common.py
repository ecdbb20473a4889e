"""Shared helpers of the benchmark scripts: timing, RSS, machine info and result files.

Each script writes ``<out>/results/<name>.json`` and owns one section of ``<out>/RESULTS.md``,
delimited by ``<!-- BEGIN name -->`` / ``<!-- END name -->``; only that section is replaced.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def parse_args(doc: str, name: str) -> argparse.Namespace:
    """Common command line: ``--quick``, ``--threads``, ``--out``.

    A ``--quick`` run writes to a fresh temporary folder unless ``--out`` is given, so smoke
    runs never overwrite the committed results.
    """
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short smoke run (a few seconds)")
    p.add_argument(
        "--threads",
        default=None,
        help="comma-separated intra-op thread counts to compare; 0 is onnxruntime's default "
        "(one per physical core, pinned) and torch's (default: cpu count, 1, 0)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for results/<name>.json and RESULTS.md (default: benchmarks/; a temporary folder with --quick)",
    )
    args = p.parse_args()
    default = [*sorted({os.cpu_count() or 1, 1}, reverse=True), 0]
    args.threads = [int(t) for t in args.threads.split(",")] if args.threads else default
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix=f"{name}-quick-")) if args.quick else HERE
    return args


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one call, in milliseconds."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(xs))


def machine() -> dict:
    """Date, machine and library versions, recorded with every result."""
    import numpy
    import onnxruntime

    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def write_tiny(path: Path) -> None:
    """An Identity graph: creating a session of it pays onnxruntime's one-off set-up."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "tiny", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def ort_session(path: Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads, set as the runtime sets them."""
    import onnxruntime as ort

    from edgemoe.targets.onnx.executor import session_options

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def thread_label(threads: int) -> str:
    """``threads`` for a table (0 is the libraries' default)."""
    return str(threads) if threads else "default"


def ratio(a: float, b: float) -> str:
    """``a / b`` for a table ("n/a" when ``b`` is 0, e.g. RSS where ``/proc`` is missing)."""
    return f"{a / b:.2f}x" if b else "n/a"


def table(header: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out: Path, name: str, title: str, data: dict, markdown: str) -> None:
    """Write ``results/<name>.json`` and replace this benchmark's section of ``RESULTS.md``."""
    info = data["machine"]
    (out / "results").mkdir(parents=True, exist_ok=True)
    json_path = out / "results" / f"{name}.json"
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "onnxruntime", "numpy") if k in info)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = "\n".join(
        [
            begin,
            f"## {title}",
            "",
            f"`python benchmarks/{name}.py{' --quick' if data['quick'] else ''}` — {info['date']}, "
            f"{info['cpu_count']} CPUs ({info['cpu']}), {info['platform']}, Python {info['python']}, {versions}.",
            "",
            markdown.strip(),
            end,
        ]
    )
    md = out / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Benchmark results\n\nWritten by the scripts in benchmarks/.\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md.write_text(text)
    print(f"\nwrote {json_path} and {md}")
