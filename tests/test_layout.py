"""The package's layers: the import contracts in pyproject.toml hold, catch an upward import, and no module
borrows another module's private (underscore) names."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tokenret"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(text: str, module: str, is_package: bool = False) -> list[tuple[str, str, int]]:
    """(module imported from, name, line) of every import in ``text``, the source code of ``module``;
    relative imports resolved (``import M`` gives (M, "", line))."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                source = ".".join(
                    parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else [])
                )
            else:
                source = node.module or ""
            found += [(source, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names]
    return found


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(text: str, module: str, is_package: bool = False) -> list[str]:
    """The imports in ``text`` that take a private name (or a private module) of tokenret."""
    offences = []
    for source, name, line in imported_names(text, module, is_package):
        if source.startswith("tokenret") and (any(map(is_private, source.split("."))) or is_private(name)):
            offences.append(f"{module}:{line}: from {source} import {name}")
    return offences


def test_no_module_imports_another_modules_private_names():
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        offences += private_imports(path.read_text(), module_name(path), path.name == "__init__.py")
    assert offences == [], "private names borrowed across modules:\n" + "\n".join(offences)


def test_the_private_name_check_sees_relative_and_absolute_imports():
    text = (
        "from .streams import _hidden, shown\nfrom tokenret.models import _secret\n"
        "from tokenret.data._internal import thing\nfrom os import _exit\nfrom . import __version__\n"
    )
    found = private_imports(text, "tokenret.extraction.descriptors")
    assert found == [
        "tokenret.extraction.descriptors:1: from tokenret.extraction.streams import _hidden",
        "tokenret.extraction.descriptors:2: from tokenret.models import _secret",
        "tokenret.extraction.descriptors:3: from tokenret.data._internal import thing",
    ]


def lint_imports(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' installs import-linter")
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([exe, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory):
    """A copy of the package and its pyproject.toml, to break on purpose."""
    root = tmp_path_factory.mktemp("layout")
    shutil.copytree(PACKAGE, root / "src" / "tokenret", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_import_contracts_hold_on_the_package(package_copy):
    result = lint_imports(package_copy, package_copy / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout and "KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("data/files.py", "import tokenret.extraction", "Layers"),
        ("models/margin.py", "from tokenret.collection import ImageIndex", "models and data import no"),
        ("index/exact.py", "import tokenret.rerank", "index/ holds vector indexes only"),
        ("serve/__init__.py", "import tokenret.train", "train is imported by nothing but"),
        ("collection/recall.py", "import tokenret.cli", "nothing below the command line imports cli"),
        ("extraction/streams.py", "import tokenret.extraction.descriptors", "No import cycle"),
    ],
)
def test_a_deliberate_bad_import_breaks_the_build(package_copy, module, line, contract):
    target = package_copy / "src" / "tokenret" / module
    original = target.read_text()
    target.write_text(original + f"\n{line}  # deliberately wrong\n")
    try:
        result = lint_imports(package_copy, package_copy / "src")
    finally:
        target.write_text(original)
    assert result.returncode != 0
    broken = result.stdout.split("Broken contracts")[-1]
    assert contract in broken, result.stdout
