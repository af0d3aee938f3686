#!/usr/bin/env bash
# The CPU-scale study of docs/results.md on Fashion-MNIST (seed 0 everywhere). Run from the
# repository root; TensorBoard logs go to runs/study/<experiment>/<run>, report figures and
# tables to docs/figures/report_<experiment>.{png,md}.
#   bash examples/study_fashion.sh [1|2|3|4 ...]      (default: all four experiments)
set -euo pipefail
py="${PYTHON:-python}"
lc() { "$py" -m lightning_curvature "$@"; }
base=configs/study/fashion_base.yaml
experiments=("${@:-1 2 3 4}")
for exp in ${experiments[*]}; do
  start=$(date +%s)
  case "$exp" in
    1)  # SGD vs NGD, MLPs with 1 and 2 hidden layers of widths 64 and 256
      for hidden in "[64]" "[256]" "[64,64]" "[256,256]"; do
        tag=$(echo "$hidden" | tr -d '[]' | tr ',' 'x')
        lc fit --config "$base" --trainer.logger.init_args.name=sgd_vs_ngd \
          --model.model.init_args.hidden_sizes="$hidden" --model.optimizer=sgd --model.lr=0.05 \
          --trainer.logger.init_args.version="mlp${tag}_sgd"
        lc fit --config "$base" --trainer.logger.init_args.name=sgd_vs_ngd \
          --model.model.init_args.hidden_sizes="$hidden" --model.optimizer=ngd --model.lr=0.01 \
          --trainer.logger.init_args.version="mlp${tag}_ngd"
      done
      report=sgd_vs_ngd ;;
    2)  # NGD damping: alpha at eps=1e-10, then eps at alpha=1e-2 (and alpha=1e-3, eps=1e-3)
      for pair in "1e-1 1e-10" "1e-2 1e-10" "1e-3 1e-10" "1e-2 1e-6" "1e-2 1e-3" "1e-3 1e-3"; do
        set -- $pair
        lc fit --config "$base" --trainer.logger.init_args.name=alpha_eps \
          --model.optimizer=ngd --model.lr=0.01 --model.alpha="$1" --model.eps="$2" \
          --trainer.logger.init_args.version="alpha=$1_eps=$2"
      done
      report=alpha_eps ;;
    3)  # split run
      lc split --config configs/study/fashion_split.yaml
      report=split ;;
    4)  # over-fitting
      lc fit --config configs/study/fashion_overfit.yaml
      report=overfit ;;
    *) echo "unknown experiment $exp" >&2; exit 2 ;;
  esac
  lc report "runs/study/$report" --output "docs/figures/report_$report.png" \
    --table "docs/figures/report_$report.md" --title "study: $report (Fashion-MNIST)"
  echo "experiment $exp ($report): $(( $(date +%s) - start )) s wall"
done
