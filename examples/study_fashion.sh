#!/usr/bin/env bash
# The CPU-scale study of docs/results.md on Fashion-MNIST (seed 0 everywhere). Run from the
# repository root; TensorBoard logs go to runs/study/<experiment>/<run>, report figures and
# tables to docs/figures/report_<experiment>.{png,md}.
#   bash examples/study_fashion.sh [1|2|3|3b|4 ...]      (default: all)
set -euo pipefail
py="${PYTHON:-python}"
lc() { "$py" -m lightning_curvature "$@"; }
base=configs/study/fashion_base.yaml
experiments=("${@:-1 2 3 3b 4}")
for exp in ${experiments[*]}; do
  start=$(date +%s)
  case "$exp" in
    1)  # SGD vs NGD, MLPs 784-64-10, 784-256-10, 784-64-64-10 and 784-256-256-10
      for hidden in "[64]" "[256]" "[64,64]" "[256,256]"; do
        tag=$(echo "$hidden" | tr -d '[]' | tr ',' 'x')
        lc fit --config "$base" --trainer.logger.init_args.name=sgd_vs_ngd \
          --model.model.init_args.hidden_sizes="$hidden" --model.optimizer=sgd --model.lr=0.05 \
          --trainer.logger.init_args.version="mlp${tag}_sgd"
        lc fit --config "$base" --trainer.logger.init_args.name=sgd_vs_ngd \
          --model.model.init_args.hidden_sizes="$hidden" --model.optimizer=ngd --model.lr=0.003 \
          --trainer.logger.init_args.version="mlp${tag}_ngd"
      done
      report=sgd_vs_ngd ;;
    2)  # NGD damping on 784-256-256-10: alpha in {1e-1, 1e-3} at eps=1e-10; alpha=1e-2 is
        # experiment 1's mlp256x256_ngd run (same settings), not repeated. eps only floors tr F
        # (kappa = alpha * max(tr F, eps) / d) and every logged tr F is > 1 here, so one eps=1e-3
        # run checks that it gives the same run.
      for pair in "1e-1 1e-10" "1e-3 1e-10" "1e-2 1e-3"; do
        set -- $pair
        lc fit --config "$base" --trainer.logger.init_args.name=alpha_eps \
          --model.optimizer=ngd --model.lr=0.003 --model.alpha="$1" --model.eps="$2" \
          --trainer.logger.init_args.version="alpha=$1_eps=$2"
      done
      if [ -d runs/study/sgd_vs_ngd/mlp256x256_ngd ] && [ ! -e "runs/study/alpha_eps/alpha=1e-2_eps=1e-10" ]; then
        ln -s ../sgd_vs_ngd/mlp256x256_ngd "runs/study/alpha_eps/alpha=1e-2_eps=1e-10"
      fi
      report=alpha_eps ;;
    3)  # split run (branches sgd, sgd_lr4x, ngd with lr 0.01)
      lc split --config configs/study/fashion_split.yaml --branches sgd,sgd_lr4x,ngd
      report=split ;;
    3b)  # the same split, one more NGD branch with a 10x smaller learning rate
      lc split --config configs/study/fashion_split.yaml --reuse_base --branches ngd_lr1e-3
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
