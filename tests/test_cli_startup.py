"""The `cvkit` command starts at once: --help and the data commands import neither torch nor Catalyst."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

SCRIPT = """
import sys
from cvkit.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "catalyst", "timm", "segmentation_models_pytorch", "albumentations", "matplotlib")
               if m in sys.modules)
print("HEAVY", heavy)
sys.exit(code)
"""


def _heavy(args, cwd) -> str:
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    line = [l for l in done.stdout.splitlines() if l.startswith("HEAVY")]
    assert line, done.stderr[-2000:]
    return line[0]


@pytest.mark.parametrize("args", [["split", "t.csv", "--out-dir", "out"], ["split", "t.csv", "--folds", "2"]])
def test_data_commands_do_not_import_torch(tmp_path, args):
    pd.DataFrame({"path": [f"{i}.jpg" for i in range(20)], "label": ["a", "b"] * 10}).to_csv(tmp_path / "t.csv",
                                                                                         index=False)
    assert _heavy(args, tmp_path) == "HEAVY []"


def test_help_does_not_import_torch(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import sys; from cvkit.cli import main\ntry:\n main(['--help'])\n"
                           "except SystemExit: pass\nprint('torch' in sys.modules)"], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().endswith("False") and "train" in done.stdout
