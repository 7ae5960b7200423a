"""pyproject.toml's dependencies against the imports of the package (``lightning_fls/``).

Every required dependency is used by the package, every third-party module the package imports is
a required dependency, and what only the benchmarks need (matplotlib) stays in an extra.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Any

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_fls"

# The module a distribution is imported as, where it is not the name with "-" read as "_".
MODULE_OF = {"typing-extensions": "typing_extensions"}

# Required but never imported by the package itself: what in the package needs each (a file and a
# name it uses or documents), so that the entry goes when that use goes.
NEEDED_BY = {
    "jsonargparse": ("cli.py", "LightningCLI"),  # LightningCLI parses with jsonargparse
    "wandb": ("cli.py", "WandbLogger"),  # the documented `--trainer.logger WandbLogger`
}

# Optional dependencies the package imports only inside a function (so that `import lightning_fls`
# never needs them): module → the extra that installs it.
OPTIONAL = {"safetensors": "hf"}  # export_pruned's .safetensors format


def project() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return table


def distribution(requirement: str) -> str:
    """The normalised distribution name of a requirement (``"jsonargparse[x]>=4"`` → its name)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def module_of(name: str) -> str:
    return MODULE_OF.get(name, name.replace("-", "_"))


def imported_modules() -> dict[str, set[Path]]:
    """Top-level module of each absolute import in ``lightning_fls/`` → the files importing it."""
    found: dict[str, set[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT))
    return found


def module_level_imports() -> set[str]:
    """Top-level modules imported outside every function body of ``lightning_fls/``."""
    found: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        pending: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
        while pending:
            node = pending.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            pending.extend(ast.iter_child_nodes(node))
    return found


def third_party(modules: dict[str, set[Path]]) -> set[str]:
    own = {"lightning_fls", "__future__"}
    return {name for name in modules if name not in own and name not in sys.stdlib_module_names}


def test_requirements_are_parsed() -> None:
    required = [distribution(r) for r in project()["dependencies"]]
    assert {"torch", "lightning", "torchmetrics", "jsonargparse"} <= set(required)
    assert len(set(required)) == len(required)


def test_every_required_dependency_is_used_by_the_package() -> None:
    modules = imported_modules()
    for name in map(distribution, project()["dependencies"]):
        if name in NEEDED_BY:
            file, user = NEEDED_BY[name]
            assert user in (PACKAGE / file).read_text(), f"{name}: {file} no longer uses {user}"
        else:
            assert module_of(name) in modules, (
                f"{name} is required but lightning_fls never imports it"
            )


def test_every_imported_module_is_a_required_dependency() -> None:
    modules = imported_modules()
    declared = {module_of(distribution(r)) for r in project()["dependencies"]}
    undeclared = {
        name: sorted(map(str, modules[name]))
        for name in third_party(modules) - declared - set(OPTIONAL)
    }
    assert not undeclared, f"imported but not in [project].dependencies: {undeclared}"


def test_optional_imports_are_lazy_and_in_their_extra() -> None:
    modules = imported_modules()
    eager = module_level_imports()
    assert {"torch", "lightning"} <= eager  # the walk does see module-level imports
    required = set(map(distribution, project()["dependencies"]))
    extras = project()["optional-dependencies"]
    for module, extra in OPTIONAL.items():
        assert module in modules, f"{module} is listed as optional but never imported"
        assert module not in eager, f"{module} is imported at module level: import it lazily"
        assert module not in required, f"{module} is required, not optional"
        for group in (extra, "dev"):  # CI installs .[dev], which runs the tests using it
            assert module in map(module_of, map(distribution, extras[group])), (module, group)


def test_matplotlib_is_only_a_benchmark_extra() -> None:
    assert "matplotlib" not in imported_modules()
    for path in PACKAGE.rglob("*.py"):
        assert "matplotlib" not in path.read_text(), path
    assert "matplotlib" not in map(distribution, project()["dependencies"])
    extras = project()["optional-dependencies"]
    for extra in ("bench", "dev"):  # CI installs .[dev], which runs the report's tests
        assert "matplotlib" in map(distribution, extras[extra]), extra
