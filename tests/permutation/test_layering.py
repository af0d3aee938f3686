"""The permutation engine imports no Lightning (it sits beside curvature, below callbacks)."""

from __future__ import annotations

import subprocess
import sys


def test_permutation_package_does_not_import_lightning():
    code = (
        "import sys, lightning_curvature.permutation; "
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.') "
        "or m.startswith('pytorch_lightning')]; print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
