"""Small helpers shared by the tests."""

import json
from pathlib import Path


def read_manifest(bundle: Path) -> dict:
    return json.loads((Path(bundle) / "manifest.json").read_text())


def write_manifest(bundle: Path, manifest: dict) -> None:
    (Path(bundle) / "manifest.json").write_text(json.dumps(manifest))
