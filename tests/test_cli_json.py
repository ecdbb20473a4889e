"""With --json, every command's stdout is exactly one JSON object; progress and library logs go to stderr.

Each command runs in its own process (not click's in-process runner) so that what native code
and libraries write to file descriptor 1 counts too: MetaSchedule's tuning logs once preceded
``tune --json``'s object on stdout.
"""

import json
import subprocess
import sys

import pytest

EDGEMOE = [sys.executable, "-m", "edgemoe"]


def _json_stdout(*args, cwd) -> dict:
    """Run ``edgemoe ARGS --json`` and parse its whole stdout as one JSON object."""
    proc = subprocess.run([*EDGEMOE, *map(str, args), "--json"], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    obj = json.loads(proc.stdout)  # the whole of stdout: one object, nothing before or after it
    assert isinstance(obj, dict)
    return obj


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder holding an m3vit-micro ONNX bundle compiled through the CLI with --json."""
    cwd = tmp_path_factory.mktemp("json")
    compiled = _json_stdout("compile", "m3vit-micro", "-o", "b", cwd=cwd)
    assert compiled["kind"] == "bundle" and compiled["model"]["name"] == "m3vit-micro"
    return cwd


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (("run", "b", "--task", "semseg"), "latency_ms"),
        (("inspect", "b", "--check"), "bundle"),
        (("inspect", "m3vit-micro"), "family"),
        (("verify", "b"), "tolerance"),
        (("models",), "models"),
        (("devices",), "devices"),
        (("plan", "b", "--budget", "50%", "--no-write"), "budget_bytes"),
        (("bench", "b", "--repeat", "2"), "repeat"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v[:2]),
)
def test_bundle_commands_print_one_object(work, args, key):
    assert key in _json_stdout(*args, cwd=work)


def test_generate_prints_one_object(tmp_path):
    _json_stdout("compile", "mixtral-lm-micro", "--max-seq", "32", "-o", "lm", cwd=tmp_path)
    res = _json_stdout("generate", "lm", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", cwd=tmp_path)
    assert len(res["tokens"]) == 4 and "decode_tok_s" in res


@pytest.mark.slow
def test_moefy_prints_one_object(tmp_path):
    res = _json_stdout(
        "moefy", "bert-micro", "-o", "mf", "--experts", "4", "--top-k", "2", "--heldout", "40", cwd=tmp_path
    )
    assert res["source"] == "bert-micro"


@pytest.mark.slow
def test_tvm_tune_and_package_print_one_object(tmp_path):
    pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")
    # MetaSchedule logs its search on stdout by default: the object must still be all there is.
    tuned = _json_stdout(
        "tune", "m3vit-micro", "--trials", "2", "--token-buckets", "8", "--kinds", "expert_kernel", "-o", "db",
        cwd=tmp_path,
    )  # fmt: skip
    assert tuned["tasks"]
    _json_stdout("compile", "m3vit-micro", "--target", "tvm", "-o", "bt", cwd=tmp_path)
    packaged = _json_stdout("package", "bt", "--device", "host", "-o", "pk", cwd=tmp_path)
    assert packaged["device"] == "host"
