"""Packages point down only: simulators <- devices, models <- scanner.

``simulators`` imports none of our packages; ``devices`` and ``models`` import only
``simulators`` (and themselves); ``scanner`` may use all three. Every import counts: at the
top of a module, inside a function, under ``if TYPE_CHECKING``, and ``importlib.import_module``
or ``__import__`` of a literal module name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"simulators", "devices", "models", "scanner"}
#: packages that each package must not import
FORBIDDEN = {
    "simulators": {"devices", "models", "scanner"},
    "devices": {"models", "scanner"},
    "models": {"devices", "scanner"},
}
_DYNAMIC = {"import_module", "__import__"}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file below ``root``, wherever it
    stands in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = list(path.relative_to(root).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module or ""))
                continue
            up = node.level - 1
            if up >= len(package):  # climbs out of our packages: name it as written
                names = ", ".join(alias.name for alias in node.names)
                found.append((node.lineno, f"{'.' * node.level}{node.module or ''} ({names})"))
                continue
            base = package[: len(package) - up]
            found.append((node.lineno, ".".join([*base, *filter(None, [node.module])])))
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0]
            if name in _DYNAMIC and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value))
    return found


def violations(package: str, root: Path = ROOT) -> list[str]:
    """``file:line: imports X`` for every import of a package that ``package`` must not use."""
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, name in sorted(imported_modules(path, root)):
            if name.split(".")[0] in FORBIDDEN[package] or name.startswith("."):
                bad.append(f"{path.relative_to(root).as_posix()}:{line}: imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_down(package: str) -> None:
    assert list((ROOT / package).rglob("*.py")), f"{package}/ has no modules"
    bad = violations(package)
    allowed = ", ".join(sorted(OURS - FORBIDDEN[package] - {package})) or "nothing else of ours"
    assert not bad, (f"{package}/ may import only itself and {allowed}:\n  "
                     + "\n  ".join(bad))


def test_imports_are_found_wherever_they_stand(tmp_path: Path) -> None:
    """The walk sees imports in functions, under TYPE_CHECKING, relative and dynamic ones."""
    pkg = tmp_path / "devices" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from scanner.recipe import Recipe\n"
        "def f():\n"
        "    import models.errors\n"
        "    from ..errors import X\n"
        "    from ... import scanner\n"
        "    importlib.import_module('scanner.geometry')\n",
        encoding="utf-8",
    )
    assert violations("devices", tmp_path) == [
        "devices/sub/mod.py:3: imports scanner.recipe",
        "devices/sub/mod.py:5: imports models.errors",
        "devices/sub/mod.py:7: imports ... (scanner)",
        "devices/sub/mod.py:8: imports scanner.geometry",
    ]


def test_moved_names_are_the_same_objects() -> None:
    """What moved down is re-exported, not copied: ``except UserError`` catches either name."""
    import devices.errors
    import devices.spec
    import scanner.errors
    import scanner.geometry
    import scanner.recipe
    import simulators.errors
    import simulators.geometry

    assert scanner.errors.UserError is devices.errors.UserError is simulators.errors.UserError
    assert issubclass(scanner.errors.RecipeError, devices.errors.UserError)
    for name in ("CameraSpec", "StageSpec", "FocusSpec", "ObjectiveSpec", "FaultsSpec",
                 "RolesSpec", "SimulatedMicroscope", "MicroManagerMicroscope"):
        assert getattr(scanner.recipe, name) is getattr(devices.spec, name)
    assert scanner.recipe.Microscope is devices.spec.Microscope
    for name in ("usable_polygon", "wafer_outline", "image_shape", "place"):
        assert getattr(scanner.geometry, name) is getattr(simulators.geometry, name)


#: inside scanner/, the stage packages each stage may read (besides the shared core and the
#: layers below): inspection and reports read the alignment record, napari the reports' files
STAGES = {"acquisition", "stitching", "inspection", "reports", "napari"}
STAGE_MAY_USE = {
    "acquisition": set(),
    "stitching": set(),
    "inspection": {"acquisition"},
    "reports": {"acquisition"},
    "napari": {"reports"},
}


def stage_violations(root: Path = ROOT) -> list[str]:
    """``file:line: imports X`` where a stage package of scanner/ reaches into another stage
    package it may not use, or where the shared core reaches into any stage package."""
    bad = []
    for path in sorted((root / "scanner").rglob("*.py")):
        parts = path.relative_to(root / "scanner").parts
        own = parts[0] if len(parts) > 1 and parts[0] in STAGES else None
        for line, name in sorted(imported_modules(path, root)):
            bits = name.split(".")
            if bits[0] != "scanner" or len(bits) < 2 or bits[1] not in STAGES or bits[1] == own:
                continue
            if own is None and path.name in ("pipeline.py", "batch.py", "cluster.py") \
                    or own is None and path.name.startswith("cli"):
                continue  # running the stages: what composes them may use them all
            if own is None or bits[1] not in STAGE_MAY_USE[own]:
                bad.append(f"{path.relative_to(root).as_posix()}:{line}: imports {name}")
    return bad


def test_stage_packages_use_only_the_core_and_earlier_stages() -> None:
    assert {p.name for p in (ROOT / "scanner").iterdir() if (p / "__init__.py").exists()} \
        == STAGES
    bad = stage_violations()
    assert not bad, "a stage package of scanner/ reaches where it may not:\n  " + "\n  ".join(bad)
