import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["bench_expert_kernel", "bench_runtime"])
def test_benchmark_quick_run(script, tmp_path):
    subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--threads", "1", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads((tmp_path / "results" / f"{script}.json").read_text())
    assert result
    md = (tmp_path / "RESULTS.md").read_text()
    assert f"<!-- BEGIN {script} -->" in md and f"<!-- END {script} -->" in md
