"""The architecture as a checked contract (pyproject.toml [tool.importlinter]):
faces -> engine -> rounds -> members -> kernels, the rounds free of torch,
the kernels free of the package, no import circles."""

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


def test_every_module_has_a_place_in_the_layers():
    """A new module must be placed in the architecture (or be one of the shared base modules)."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    placed = {m.strip() for layer in cfg["layers"] for m in layer.replace("|", ":").split(":")}
    base = {"specem_fast", "specem_fast.__main__", "specem_fast.config", "specem_fast.errors", "specem_fast.results",
            "specem_fast.registry", "specem_fast.fetch"}
    modules = {"specem_fast." + p.stem for p in (ROOT / "specem_fast").glob("*.py")} | \
              {"specem_fast." + p.name for p in (ROOT / "specem_fast").iterdir() if (p / "__init__.py").exists()}
    modules = {m.removesuffix(".__init__") for m in modules}
    assert modules - placed - base == set()


@pytest.mark.parametrize("module, inject, broken", [
    ("policy.py", "import torch\n", "the rounds import no torch"),
    ("runtime.py", "from . import scheduler\n", "faces -> engine -> rounds -> members -> kernels"),
])
def test_a_violation_is_caught(tmp_path, module, inject, broken):
    for name in ("specem_fast", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "specem_fast" / module
    src = target.read_text()
    tree = ast.parse(src)
    at = tree.body[1].lineno - 1 if isinstance(tree.body[0], ast.Expr) else 0  # after the docstring
    lines = src.splitlines(keepends=True)
    target.write_text("".join(lines[:at]) + inject + "".join(lines[at:]))
    out = lint(tmp_path)
    assert out.returncode != 0 and f"{broken} BROKEN" in out.stdout, out.stdout + out.stderr
