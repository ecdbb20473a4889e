"""With --json, every command's stdout is exactly one JSON object; progress and library logs go to stderr.

Each command runs in its own process (not click's in-process runner) so that what native code
and libraries write to file descriptor 1 counts too: MetaSchedule's tuning logs once preceded
``tune --json``'s object on stdout.
"""

import json
import subprocess
import sys

import pytest
from helpers import json_stdout

pytestmark = pytest.mark.slow  # not in the fast tier (make check)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder holding an m3vit-micro ONNX bundle compiled through the CLI with --json."""
    cwd = tmp_path_factory.mktemp("json")
    compiled = json_stdout("compile", "m3vit-micro", "-o", "b", cwd=cwd)
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
    assert key in json_stdout(*args, cwd=work)


def test_generate_prints_one_object(tmp_path):
    json_stdout("compile", "mixtral-lm-micro", "--max-seq", "32", "-o", "lm", cwd=tmp_path)
    res = json_stdout("generate", "lm", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", cwd=tmp_path)
    assert len(res["tokens"]) == 4 and "decode_tok_s" in res


def test_tune_prints_one_object(tuning_run):
    _db, summary = tuning_run  # conftest: `edgemoe tune ... --json` in its own process, parsed whole
    assert summary["model"] == "m3vit-micro" and len(summary["tasks"]) == 4


def test_moefy_prints_one_object(tmp_path):
    res = json_stdout(
        "moefy",
        "bert-micro",
        "--experts",
        "4",
        "--top-k",
        "2",
        "--router",
        "centroid",
        "--heldout",
        "8",
        "-o",
        "mo",
        cwd=tmp_path,
    )
    assert res["num_experts"] == 4 and (tmp_path / "mo" / "model.json").is_file()


def test_package_prints_one_object(bundle_factory, tmp_path):
    pytest.importorskip("tvm", reason="Apache TVM is not installed (pip install -e '.[tvm]')")
    bundle = bundle_factory("m3vit-micro", target="tvm")
    res = json_stdout("package", bundle, "--device", "host", "-o", "pkg", cwd=tmp_path)
    assert res["compiler_free"] and (tmp_path / "pkg" / "run.sh").is_file()


def test_native_output_on_stdout_goes_to_stderr_under_json(tmp_path):
    """What native code writes to fd 1 (MetaSchedule's tuning logs did) lands on stderr, not before the object.

    The guard every command shares, exercised directly at the file-descriptor level in a child process.
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


def test_every_command_is_covered_here():
    from edgemoe.cli import cli

    covered = {"compile", "run", "inspect", "verify", "models", "devices", "plan", "bench", "generate"}
    covered |= {"tune", "moefy", "package"}
    assert set(cli.commands) == covered, "a new command needs its --json test in this file"
