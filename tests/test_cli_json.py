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

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


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


def test_native_output_on_stdout_goes_to_stderr_under_json(tmp_path):
    """What native code writes to fd 1 (MetaSchedule's tuning logs did) lands on stderr, not before the object.

    ``tune``, ``moefy`` and ``package`` take minutes each in a fresh process; the guard they share
    with every command is exercised here directly, at the file-descriptor level, in a child process.
    """
    code = (
        "import os, sys\n"
        "from edgemoe.cli import _emit, _json_only_stdout\n"
        "with _json_only_stdout(True):\n"
        "    os.write(1, b'native log line\\n')\n"
        "    print('python print')\n"
        "    _emit({'ok': 1}, True, None)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"ok": 1}
    assert "native log line" in proc.stderr and "python print" in proc.stderr
