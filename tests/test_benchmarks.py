"""The benchmark scripts run (``--quick``) and produce the numbers they exist for.

Timings are not asserted (they belong to RESULTS.md); what a benchmark's comparison rests on is:
every cell it reports exists and is positive, the runners it compares compute the same values,
and the sizes it compares (deterministic: bytes on disk, bytes resident) keep their order.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


def _run(script: str, out: Path) -> tuple[dict, str]:
    subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--threads", "1", "--out", str(out)],
        check=True,
        capture_output=True,
        text=True,
    )
    md = (out / "RESULTS.md").read_text()
    assert f"<!-- BEGIN {script} -->" in md and f"<!-- END {script} -->" in md
    return json.loads((out / "results" / f"{script}.json").read_text()), md


def test_bench_expert_kernel_compares_one_shared_kernel_with_baked_graphs(tmp_path):
    result, md = _run("bench_expert_kernel", tmp_path)
    assert result["quick"] and result["experts"] == 16
    assert [(r["threads"], r["tokens"]) for r in result["latency_ms"]] == [(1, 16), (1, 258)]
    assert all(r["shared"] > 0 and r["baked"] > 0 for r in result["latency_ms"])
    for variant in ("shared", "baked"):
        assert result["memory"][variant]["load_ms"] > 0 and result["memory"][variant]["rss_load"] > 0
    disk = result["disk_bytes"]
    # "An expert is data": the same weight bytes either way, and the one shared graph is a sliver of them.
    assert 0 < disk["shared_graph"] < disk["shared"] / 100
    assert abs(disk["shared"] - disk["baked"]) < disk["baked"] / 100
    assert "shared / baked" in md


def test_bench_runtime_compares_runners_on_the_same_outputs(tmp_path):
    result, md = _run("bench_runtime", tmp_path)
    (row,) = result["latency"]
    for runner in ("edgemoe", "torch", "onnx"):
        assert row[runner]["median_ms"] > 0
    assert row["edgemoe"]["max_abs_err"] <= 1e-4 and row["onnx"]["max_abs_err"] <= 1e-4
    stats = result["edgemoe_stats"]
    # edgemoe holds only the experts the task's tokens were routed to, never more than the task keeps.
    assert 0 < stats["experts_loaded"] <= stats["experts_task"] <= stats["experts_bundle"]
    weights = result["resident_weight_bytes"]
    assert 0 < weights["edgemoe"] < weights["torch"]
    assert all(result["rss_bytes"][r]["rss_load"] > 0 for r in ("edgemoe", "torch", "onnx"))
    assert "vs PyTorch" in md


def test_bench_generate_decodes_the_same_tokens_every_way_within_the_budget(tmp_path):
    pytest.importorskip("accelerate")
    result, md = _run("bench_generate", tmp_path)
    (data,) = result["models"].values()
    rows = data["rows"]
    assert set(rows) == {"transformers@100"} | {
        f"{kind}@{b}"
        for b in (100, 50, 25)
        for kind in ("accelerate", "edgemoe-lru", "edgemoe-lru-routed", "edgemoe-planned", "edgemoe-planned-noprefetch")
    }
    for key, row in rows.items():
        # greedy decoding: every configuration gives transformers' tokens, whatever it keeps resident
        assert row["same_tokens"] and row["decode_tok_s"] > 0 and row["peak_rss_mib"] > 0, key
        if key.startswith("edgemoe"):
            assert 0 < row["peak_expert_bytes"] <= row["budget_bytes"], key
    # below 100 % accelerate really offloads, and edgemoe's budget shrinks with the percentage
    assert rows["accelerate@25"]["offloaded_bytes"] > 0
    assert rows["edgemoe-lru@25"]["budget_bytes"] < rows["edgemoe-lru@50"]["budget_bytes"]
    assert rows["edgemoe-lru@25"]["prefetch"] is None and rows["edgemoe-lru-routed@25"]["prefetch"] == "routed"
    assert (tmp_path / "results" / "bench_generate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench_generate.png" in md and "vs LRU" in md
