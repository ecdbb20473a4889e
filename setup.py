"""Package list for setuptools: every backend folder under ``targets/`` and model family under ``models/``.

``targets/`` and ``models/`` live at the repository root but install inside the ``edgemoe``
namespace (see ``package-dir`` in pyproject.toml). Their sub-packages are found here by folder, so
adding a backend or a model family touches no list.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
packages = ["edgemoe", *(f"edgemoe.{p}" for p in find_packages(str(ROOT / "edgemoe")))]
for folder in ("targets", "models"):
    packages += [f"edgemoe.{folder}", *(f"edgemoe.{folder}.{p}" for p in find_packages(str(ROOT / folder)))]

# A backend's non-Python sources (the HLS kernel library, the native runtime's C++) ship with it,
# subfolders included (those that are not packages themselves).
package_data = {"edgemoe.bundle": ["*.json"], "edgemoe.models": ["*/*.safetensors", "*/*.json"]}
for pkg in packages:
    if pkg.startswith("edgemoe.targets."):
        folder = ROOT / "targets" / Path(*pkg.split(".")[2:])
        files = []
        for f in sorted(folder.rglob("*")):
            rel = f.relative_to(folder)
            inner = [folder / Path(*rel.parts[:i]) for i in range(1, len(rel.parts))]
            if any((d / "__init__.py").exists() or d.name == "__pycache__" for d in inner):
                continue  # a sub-package's files are its own
            if f.is_file() and f.suffix not in (".py", ".pyc"):
                files.append(rel.as_posix())
        if files:
            package_data[pkg] = files

setup(packages=packages, package_data=package_data)
