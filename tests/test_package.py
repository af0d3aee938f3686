import importlib

import pytest


@pytest.mark.parametrize(
    "name",
    [
        "checks",
        "curvature",
        "sampling",
        "landscape",
        "optim",
        "permutation",
        "callbacks",
        "data",
        "models",
        "cli",
    ],
)
def test_layers_import(name):
    importlib.import_module(f"lightning_curvature.{name}")


def test_engine_layers_do_not_import_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lightning_curvature.curvature, lightning_curvature.sampling, "
        "lightning_curvature.landscape, lightning_curvature.optim, "
        "lightning_curvature.permutation, lightning_curvature.checks; "
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.') "
        "or m.startswith('pytorch_lightning')]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_data_models_and_cli_package_import_without_loading_lightning():
    import subprocess
    import sys

    code = (
        "import sys, lightning_curvature.data, lightning_curvature.models; "
        "import lightning_curvature.cli; "
        "bad = [m for m in sys.modules if m == 'lightning' or m.startswith('lightning.') "
        "or m.startswith('pytorch_lightning')]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_data_covers_the_packaged_sample():
    import ast
    import fnmatch
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # the [tool.setuptools.package-data] line (tomllib is not in Python 3.10)
    line = re.search(r'^"lightning_curvature\.data" = (\[.*\])$',
                     (root / "pyproject.toml").read_text(), re.M)  # fmt: skip
    patterns = ast.literal_eval(line.group(1))
    package = root / "lightning_curvature" / "data"
    files = [p.relative_to(package).as_posix() for p in (package / "sample").rglob("*")
             if p.is_file()]  # fmt: skip
    assert len(files) == 5  # four IDX .gz files and the license notice
    for name in files:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), name
