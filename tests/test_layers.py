"""The architecture as a checked contract (pyproject.toml [tool.importlinter]):
one package per layer (faces -> api -> engine -> rounds -> members -> hub -> model),
the engine and rounds packages free of torch, the kernels free of the package, no
import circles. `ls specem_fast` and the contract name the same layers."""

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is in the dev extra")


def lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layers_hold():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_every_package_is_a_layer():
    """`ls specem_fast` shows the architecture: every subpackage is a layer of the
    contract, and the only loose modules are the shared base types."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    placed = {m.strip() for layer in cfg["layers"] for m in layer.replace("|", ":").split(":")}
    pkg = ROOT / "specem_fast"
    packages = {"specem_fast." + p.name for p in pkg.iterdir() if (p / "__init__.py").exists()}
    assert packages == placed
    loose = {p.name for p in pkg.glob("*.py")}
    assert loose == {"__init__.py", "__main__.py", "config.py", "errors.py", "results.py"}


@pytest.mark.parametrize("module, inject, broken", [
    ("rounds/policy.py", "import torch\n", "the engine and the rounds import no torch"),
    # a module added later is covered without listing it
    ("engine/new_module.py", "import transformers\n", "the engine and the rounds import no torch"),
    ("model/runner.py", "from specem_fast.rounds import executor\n", "the layers"),
    ("members/crew.py", "from specem_fast.api import ensemble\n", "the layers"),
])
def test_a_violation_is_caught(tmp_path, module, inject, broken):
    for name in ("specem_fast", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "specem_fast" / module
    src = target.read_text() if target.exists() else '"""new"""\n'
    tree = ast.parse(src)
    at = tree.body[1].lineno - 1 if len(tree.body) > 1 and isinstance(tree.body[0], ast.Expr) else 1
    lines = src.splitlines(keepends=True)
    target.write_text("".join(lines[:at]) + inject + "".join(lines[at:]))
    out = lint(tmp_path)
    assert out.returncode != 0, out.stdout + out.stderr
    assert any(line.startswith(broken) and line.endswith("BROKEN") for line in out.stdout.splitlines()), out.stdout
