"""The wheel ships every package and module of the tree under its import name (packages are discovered, not listed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"lit_saferlhf": "lit_saferlhf", "plugins": "lit_saferlhf_plugins"}
"""Source folder -> the import name it installs as (``package-dir`` in ``pyproject.toml``)."""


def build_wheel(tmp_path: Path) -> zipfile.ZipFile:
    """Build the wheel offline from a copy of the tree, so the checkout gets no ``build/``."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    for folder in IMPORT_NAMES:
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    command += ["--disable-pip-version-check", "-q", "-w", str(tmp_path / "dist"), str(source)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("lit_saferlhf-*.whl")
    return zipfile.ZipFile(wheel)


def installed(path: Path) -> str:
    """Where a source file of the tree lands in the wheel: ``plugins/solvers/x.py`` -> ``lit_saferlhf_plugins/...``."""
    folder, *rest = path.relative_to(REPO_ROOT).parts
    return "/".join((IMPORT_NAMES[folder], *rest))


def tree(pattern: str) -> set[str]:
    """The installed paths of the tree's files matching ``pattern``."""
    return {
        installed(path)
        for folder in IMPORT_NAMES
        for path in (REPO_ROOT / folder).rglob(pattern)
        if "__pycache__" not in path.parts
    }


def test_the_wheel_holds_every_package_and_module_under_its_import_name(tmp_path: Path) -> None:
    with build_wheel(tmp_path) as wheel:
        names = set(wheel.namelist())
        (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
        scripts = wheel.read(entry_points).decode()
    packages = tree("__init__.py")  # every folder with an __init__.py, nested ones included
    assert {"lit_saferlhf/commands/evaluate/__init__.py", "lit_saferlhf_plugins/generators/__init__.py"} <= packages
    assert sorted(packages - names) == [], "packages missing from the wheel"
    assert sorted(tree("*.py") - names) == [], "modules missing from the wheel"
    assert not [name for name in names if name.startswith("plugins/")]  # only under its import name
    assert "lit-saferlhf = lit_saferlhf.cli:main" in scripts
