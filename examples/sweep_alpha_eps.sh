#!/usr/bin/env bash
# NGD damping sweep: alpha in {1e-1, 1e-2, 1e-3} x eps in {1e-10, 1e-6, 1e-3}, one TensorBoard
# version per pair under runs/sweep_ngd_alpha_eps, then one report comparing them all.
#   bash examples/sweep_alpha_eps.sh [LightningCLI overrides, e.g. --trainer.max_epochs=5]
# (PYTHON=/path/to/python to choose the interpreter; run from the repository root.)
set -euo pipefail
config=configs/sweep_ngd_alpha_eps.yaml
for alpha in 1e-1 1e-2 1e-3; do
  for eps in 1e-10 1e-6 1e-3; do
    "${PYTHON:-python}" -m lightning_curvature fit --config "$config" \
      --model.alpha="$alpha" --model.eps="$eps" \
      --trainer.logger.init_args.version="alpha=${alpha}_eps=${eps}" "$@"
  done
done
"${PYTHON:-python}" -m lightning_curvature report runs/sweep_ngd_alpha_eps
