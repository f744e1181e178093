"""Every way the sweep bends Ray lives in sweeps/ray_adapter.py, checked on one Ray version: the
installed Ray is that version (another one is the reminder to check the adapter again), and no
other module reaches into Ray's private parts or sets Ray's and Tune's switches."""

from __future__ import annotations

import ast
from importlib.metadata import version
from pathlib import Path

from sweeps.ray_adapter import RAY_CHECKED, TUNE_ENV

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "sweeps" / "ray_adapter.py"
SWITCHES = (*TUNE_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def test_ray_is_the_version_the_adapter_was_checked_on() -> None:
    assert version("ray") == RAY_CHECKED, (
        f"Ray {version('ray')} is installed; sweeps/ray_adapter.py was checked on {RAY_CHECKED}: check each of "
        "its workarounds on this version, then update RAY_CHECKED (and constraints.txt)")


def private_ray_uses(tree: ast.AST) -> list[str]:
    """Imports of Ray's private modules or private names, and Ray's switches, in a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ray":
            parts = node.module.split(".")
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                      or any(p.startswith("_") for p in parts)]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "ray"
                      and any(p.startswith("_") for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                and isinstance(node.value, ast.Name) and node.value.id == "ray":
            found.append(f"ray.{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in SWITCHES:
            found.append(node.value)
    return found


def test_the_finder_sees_what_the_adapter_does() -> None:
    found = private_ray_uses(ast.parse(ADAPTER.read_text()))
    assert {"ray._raylet.Config", "ray.tune.progress_reporter._get_trial_location", "ray._private",
            "RAY_AIR_NEW_OUTPUT", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"} <= set(found)


def test_no_other_module_reaches_into_ray() -> None:
    for package in ("icl", "sweeps", "analysis", "benchmarks", "slurm"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != ADAPTER:
                assert private_ray_uses(ast.parse(path.read_text())) == [], path.relative_to(ROOT)
