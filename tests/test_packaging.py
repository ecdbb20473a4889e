import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_installs_everything_under_the_edgemoe_namespace(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("edgemoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"edgemoe", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for needed in (
        "edgemoe/cli.py",
        "edgemoe/targets/onnx/target.py",
        "edgemoe/models/m3vit/model.py",
        "edgemoe/bundle/manifest.schema.json",
        "edgemoe/runtime/session.py",
    ):
        assert needed in names, needed
    cli_src = zipfile.ZipFile(wheel).read("edgemoe/cli.py").decode()
    assert "click" in cli_src  # the real module, not a dangling link
