import importlib

import pytest


@pytest.mark.parametrize(
    "name",
    ["curvature", "sampling", "landscape", "optim", "callbacks", "data", "models", "cli"],
)
def test_layers_import(name):
    importlib.import_module(f"lightning_curvature.{name}")


def test_engine_layers_do_not_import_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lightning_curvature.curvature, lightning_curvature.sampling, "
        "lightning_curvature.landscape, lightning_curvature.optim; "
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.') "
        "or m.startswith('pytorch_lightning')]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
