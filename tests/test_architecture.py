"""Module boundaries of STYLE.md, checked on the source: stages never import a concrete plugin."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lit_saferlhf"


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
    return modules


def test_stages_import_no_concrete_plugin() -> None:
    for path in (PACKAGE / "stages").glob("*.py"):
        plugins = {m for m in imported_modules(path) if m.startswith(("lit_saferlhf_plugins", "plugins"))}
        assert not plugins, f"{path.name} imports {plugins}: stages use the solver contract only"


def test_losses_import_torch_only() -> None:
    code = (
        "import sys; import lit_saferlhf.losses; "
        "bad = [m for m in ('lightning', 'transformers', 'deepspeed', 'torchmetrics') if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plugins_are_installed_under_the_project_namespace() -> None:
    import lit_saferlhf_plugins.solvers as solvers

    assert Path(solvers.__file__).parent.name == "solvers"
    assert {"DualAscent", "FixedPenalty", "PIDLagrangian"} <= set(dir(solvers))


def imports_the_cli(path: Path) -> bool:
    """``import lit_saferlhf.cli``, ``from lit_saferlhf.cli import ...`` or ``from lit_saferlhf import cli``."""
    names = [
        alias.name
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module == "lit_saferlhf"
        for alias in node.names
    ]
    return "cli" in names or "lit_saferlhf.cli" in imported_modules(path)


def test_only_the_entry_point_imports_the_cli() -> None:
    """Command modules share ``lit_saferlhf.commands.fit``; importing ``lit_saferlhf.cli`` from them makes circles."""
    importers = [
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if path.name != "cli.py" and imports_the_cli(path)
    ]
    assert not importers, f"{importers} import lit_saferlhf.cli: import lit_saferlhf.commands.fit instead"
