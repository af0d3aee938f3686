#!/usr/bin/env bash
# Build the peer virtualenv the side-by-side benchmarks run their peers in (PyHessian,
# curvlinops, devinterp, loss-landscapes). The peers are never dependencies of the package.
#
#   benchmarks/make_peer_venv.sh [TARGET]       # default TARGET: <repository>/.peervenv
#   export LIGHTNING_CURVATURE_PEER_PYTHON=TARGET/bin/python   # only if TARGET is not the default
#
# CPU torch is installed first (`pip install torch==2.13.0` takes the CPU wheel where one is
# provided, as in the README), so the peers' `torch` requirement is already met and pip does not
# pull a CUDA build. backpack-for-pytorch (a curvlinops dependency) declares torchvision, which
# curvlinops never imports and whose wheels break against this torch: it is installed without
# its dependencies and its other requirements are listed explicitly. Versions are the ones docs/benchmarks.md
# reports; PYTHON selects the interpreter (default python3, 3.10 or newer).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-$repo/.peervenv}"
python="${PYTHON:-python3}"

TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PEERS=(
  "PyHessian==0.1"
  "curvlinops-for-pytorch==3.0.1"
  "devinterp==1.3.2"
  "loss-landscapes==3.0.6"
  "numpy==2.4.6"
  "scipy==1.17.1"
  "matplotlib==3.11.2"
  "pandas==3.1.1"
  "einops==0.8.2"
  "unfoldNd"
)

"$python" -m venv "$target"
pip="$target/bin/python -m pip"
$pip install --upgrade pip
$pip install "torch==${TORCH_VERSION}"
# Keep the CPU torch: the peers' requirements are resolved against it, never replace it.
$pip install --no-deps "backpack-for-pytorch==1.7.1"
$pip install "${PEERS[@]}" "torch==${TORCH_VERSION}"
"$target/bin/python" - <<'PY'
import curvlinops, devinterp, loss_landscapes, pyhessian, torch
print(f"peer virtualenv ready: torch {torch.__version__}")
PY
echo "LIGHTNING_CURVATURE_PEER_PYTHON=$target/bin/python"
