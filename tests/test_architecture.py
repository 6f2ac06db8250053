"""The layering ARCHITECTURE.md describes, held by import-linter's contracts in setup.cfg (imports inside
functions count), and shown to fail on an upward import and on a cycle."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter", reason="the architecture check needs import-linter (the 'dev' extra)")


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` with the contracts of this repository's setup.cfg."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='setup.cfg', no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env={"PYTHONPATH": str(root), "PATH": ""},
                          capture_output=True, text=True, timeout=120)


def copy_of_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "cvkit", tmp_path / "cvkit", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    return tmp_path


def test_the_package_keeps_its_layers_and_has_no_cycle():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_an_upward_import_inside_a_function_breaks_the_layers(tmp_path):
    root = copy_of_package(tmp_path)
    errors = root / "cvkit" / "tasks" / "base.py"
    errors.write_text(errors.read_text() + "\n\ndef _sneaky():\n    from cvkit.runners import StagedRunner\n\n    return StagedRunner\n")
    done = lint(root)
    assert done.returncode == 1
    assert "cvkit.tasks.base -> cvkit.runners" in done.stdout


def test_a_cycle_between_siblings_breaks_the_acyclic_contract(tmp_path):
    root = copy_of_package(tmp_path)
    (root / "cvkit" / "data" / "cycle_a.py").write_text("from cvkit.data import cycle_b  # noqa: F401\n")
    (root / "cvkit" / "data" / "cycle_b.py").write_text("def f():\n    from cvkit.data import cycle_a  # noqa: F401\n")
    done = lint(root)
    assert done.returncode == 1
    assert "cycle_a" in done.stdout and "cycle_b" in done.stdout
