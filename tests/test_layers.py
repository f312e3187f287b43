"""The packages form layers; an import may only point to the same or a lower layer.

The order is the README's (section "Layout"). The test reads every module's imports with
``ast`` (including imports inside functions, which a lazy import would otherwise hide) and
fails on any edge that points upwards, naming the file and the line.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. Packages in one tuple are siblings: they may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("core",),
    ("datamodules",),
    ("losses",),
    ("lightning_modules",),
    ("retrieval",),
    ("recognition", "cleaning"),
    ("callbacks",),
    ("sweeps",),
    ("cli",),
]
LEVEL = {package: level for level, group in enumerate(LAYERS) for package in group}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level package)`` of every import in ``path`` that names a project package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue  # relative imports stay inside their package
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in LEVEL]
    return found


def back_edges() -> list[str]:
    problems = []
    for package in LEVEL:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, target in imported_packages(path):
                if target == package:
                    continue
                if LEVEL[target] >= LEVEL[package]:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {package} (layer {LEVEL[package]}) imports "
                                    f"{target} (layer {LEVEL[target]})")
    return problems


def test_every_package_is_in_a_layer():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"}
    assert packages == set(LEVEL), f"packages not placed in LAYERS (or gone): {packages ^ set(LEVEL)}"


def test_imports_point_downwards_only():
    problems = back_edges()
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    # A module that imports upwards, inside a function (a lazy import), must be reported.
    fake = tmp_path / "core"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from cli.main import main\n    return main\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__), "LEVEL", {"core": 0, "cli": 8})
    assert back_edges() == ["core/bad.py:2: core (layer 0) imports cli (layer 8)"]


@pytest.mark.parametrize("folder", ["experiments"])
def test_experiments_hold_configuration_only(folder):
    code = sorted(p.name for p in (ROOT / folder).rglob("*.py"))
    assert not code, f"{folder}/ holds only configuration, found Python files: {code}"
