"""NGD step cost relative to SGD (time and peak memory), CPU, float32, batch 128.

Targets (issue 14): NGD/SGD step-time ratio <= 2 (empirical Fisher) and <= 10 (true Fisher) for an
MLP 784-256-256-10; for LeNet-5 report, aiming at <= 6 (empirical). The NGD arms use the
documented working damping (``damping="per_sample"``, ``docs/ngd.md``): with the per-parameter
formula the float32 Cholesky factorization can break down (κ ≈ 0) and is redone in float64, which
times the fallback rather than the method. ``--flops`` prints the analytic FLOP count of each part
of the MLP step next to SGD's (the bound on the ratio). A "step" is the whole training iteration
(zero_grad, forward, mean cross-entropy, backward, update) so the ratio is what a training loop
pays. Times are medians over interleaved repeats within one process, in CPU seconds of the
process (one intra-op thread by default; robust to other load on the machine) and in wall
seconds; peak memory is the resident-set high-water mark of a separate subprocess per
configuration (``VmHWM``, reset just before the first step through ``/proc/self/clear_refs``),
reported as the increase over the same process's RSS at that point.

Data: Fashion-MNIST training batches when ``LIGHTNING_CURVATURE_DATA`` is set (``fashion-mnist/``
IDX .gz files), random inputs and labels otherwise (the script says which).

Run::

    PYTHONPATH=. python benchmarks/ngd.py            # full table
    PYTHONPATH=. python benchmarks/ngd.py --quick    # fewer repeats
    PYTHONPATH=. python benchmarks/ngd.py --online   # online NGD (OnlineNGD) / SGD only

Online NGD (issue 10, target <= 2 on both models): ``OnlineNGD`` (Kaldi's NG-SGD, the paper's
lr 0.01 and alpha 0.01, Kaldi's rank/update period) against the same SGD, timed the same way (CPU
and wall medians of interleaved repeats; the factors' update schedule, every 4th step after the
first ten, is averaged over by timing >= 4 consecutive steps per repeat after a 12-step warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from lightning_curvature.data import load_tensors
from lightning_curvature.models import MLP, LeNet5
from lightning_curvature.optim import NGD, OnlineNGD

BATCH = 128


def mlp() -> nn.Module:
    # The package's network; MLP(...).net is nn.Sequential(Flatten, Linear, ReLU, ...) created in
    # the same order as the former local definition (same weights under the same seed).
    return MLP(hidden_sizes=[256, 256]).net


MODELS = {"mlp": mlp, "lenet5": LeNet5}
CONFIGS = {
    "sgd": {},
    "ngd-empirical": {"fisher_type": "empirical", "damping": "per_sample"},
    "ngd-true": {"fisher_type": "true", "damping": "per_sample"},
}


def mlp_flops(widths: tuple[int, ...] = (784, 256, 256, 10), batch: int = BATCH) -> dict:
    """Analytic FLOPs (2 per multiply-add) of one SGD step and of NGD's extra work, MLP only.

    SGD: forward ``2B Σ in·out``; backward ``2B Σ in·out`` (weight gradients) plus
    ``2B Σ_{l>1} in·out`` (input gradients). NGD with ``R`` pseudo-samples per input
    (R = 1 empirical, C − 1 true), ``N = R·B``:

    * pseudo-sample backward (true only): ``R · 2B Σ_{l>1} in·out`` (output-gradients of every
      layer for each of the R cotangents),
    * Gram, lower block triangle: ``R(R+1)/2 · B² · Σ_l (2·out + 2)`` plus the input Grams
      ``2B² Σ_l in``,
    * Cholesky ``N³/3`` and two triangular solves ``2N²``,
    * ``Gᵀc``: ``Σ_l (2N·out + 2B·in·out)``.
    """
    layers = list(zip(widths[:-1], widths[1:], strict=True))
    b = batch
    fwd = sum(2 * b * i * o for i, o in layers)
    bwd = fwd + sum(2 * b * i * o for i, o in layers[1:])
    out: dict[str, dict[str, float]] = {"sgd": {"forward": fwd, "backward": bwd}}
    for kind, r in (("empirical", 1), ("true", widths[-1] - 1)):
        n = r * b
        blocks = r * (r + 1) // 2
        out[kind] = {
            "pseudo-sample backward": r * sum(2 * b * i * o for i, o in layers[1:]) if r > 1 else 0,
            "gram": sum(blocks * b * b * (2 * o + 2) + 2 * b * b * i for i, o in layers),
            "cholesky": n**3 / 3 + 2 * n * n,
            "G^T c": sum(2 * n * o + 2 * b * i * o for i, o in layers),
        }
    return out


def print_flops() -> None:
    counts = mlp_flops()
    sgd = sum(counts["sgd"].values())
    print(f"MLP 784-256-256-10, batch {BATCH}: SGD step {sgd / 1e6:.0f} MFLOP")
    for kind in ("empirical", "true"):
        extra = sum(counts[kind].values())
        parts = ", ".join(f"{k} {v / 1e6:.0f}" for k, v in counts[kind].items())
        print(
            f"  NGD {kind:9s}: + {extra / 1e6:.0f} MFLOP ({parts}); "
            f"FLOP ratio {(sgd + extra) / sgd:.2f}x SGD (the floor at SGD's GEMM rate; "
            f"target {'<= 2' if kind == 'empirical' else '<= 10'})"
        )
    print()


def load_batches(num_batches: int, seed: int = 0) -> tuple[list[tuple[torch.Tensor, ...]], str]:
    """``num_batches`` batches of (B, 1, 28, 28) float32 inputs and labels."""
    root = os.environ.get("LIGHTNING_CURVATURE_DATA")
    n = num_batches * BATCH
    if root:
        folder = Path(root) / "fashion-mnist"
        x, y = load_tensors("fashion_mnist", "train", n, data_dir=folder)
        source = f"Fashion-MNIST training images ({folder})"
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        source = "random inputs and labels (LIGHTNING_CURVATURE_DATA not set)"
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, n, BATCH)], source


def make(model_name: str, config: str, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    if config == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        # A small lr keeps every timed step finite (a skipped step would be cheaper).
        opt = NGD(model, lr=1e-3, alpha=1.0, momentum=0.9, **CONFIGS[config])
    return model, opt


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch) -> float:
    x, y = batch
    loss_fn = nn.CrossEntropyLoss()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    return float(opt.step(closure).detach())


def time_steps(model_name: str, repeats: int, steps: int, batches) -> dict[str, dict]:
    """Median CPU and wall seconds per step of every config, interleaved so drifts hit all alike.

    CPU time (``time.process_time``) is the primary figure: with one intra-op thread it is the
    work the step does, and it is robust to other processes sharing the cores; wall time is
    reported next to it.
    """
    setups = {c: make(model_name, c) for c in CONFIGS}
    for model, opt in setups.values():  # warm-up
        for b in batches[:3]:
            train_step(model, opt, b)
    cpu: dict[str, list[float]] = {c: [] for c in CONFIGS}
    wall: dict[str, list[float]] = {c: [] for c in CONFIGS}
    skipped = dict.fromkeys(CONFIGS, 0)
    for r in range(repeats):
        for c, (model, opt) in setups.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for s in range(steps):
                train_step(model, opt, batches[(r * steps + s) % len(batches)])
                skipped[c] += int(getattr(opt, "stats", {}).get("skipped", False))
            cpu[c].append((time.process_time() - c0) / steps)
            wall[c].append((time.perf_counter() - w0) / steps)
    return {
        c: {
            "cpu": statistics.median(cpu[c]),
            "wall": statistics.median(wall[c]),
            "skipped": skipped[c],
            "solve": getattr(setups[c][1], "stats", {}).get("solve_precision", "-"),
        }
        for c in CONFIGS
    }


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ``clear_refs``), if allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(model_name: str, config: str, steps: int) -> None:
    # Random batches of the same shape: reading the dataset would set the peak before training.
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
        for _ in range(4)
    ]
    model, opt = make(model_name, config)
    # Importing torch leaves a transient peak far above a small model's training footprint, so
    # the high-water mark is reset and the growth over the current RSS is what is reported.
    reset = _reset_peak_rss()
    base = _rss_kb("VmRSS")
    for s in range(steps):
        train_step(model, opt, batches[s % len(batches)])
    peak = _rss_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kb": base, "peak_kb": peak, "reset": reset}))


def peak_memory(model_name: str, config: str, steps: int, threads: int) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1])] + sys.path)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-child",
            model_name,
            config,
            "--steps",
            str(steps),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return {"peak_mb": rec["peak_kb"] / 1024, "delta_mb": (rec["peak_kb"] - rec["base_kb"]) / 1024}


ONLINE_TARGET = 2.0


def time_online_ngd(model_name: str, repeats: int, steps: int, batches) -> dict[str, dict]:
    """Median CPU/wall seconds per step of SGD and OnlineNGD, interleaved (see ``time_steps``)."""
    steps = max(steps, 4)  # a whole update period per repeat
    setups = {}
    for c in ("sgd", "online-ngd"):
        torch.manual_seed(0)
        model = MODELS[model_name]()
        if c == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        else:
            opt = OnlineNGD(model.parameters(), lr=0.01, alpha=0.01, momentum=0.9)
        setups[c] = (model, opt)
    for model, opt in setups.values():  # warm-up past the every-step initial updates
        for s in range(12):
            train_step(model, opt, batches[s % len(batches)])
    cpu: dict[str, list[float]] = {c: [] for c in setups}
    wall: dict[str, list[float]] = {c: [] for c in setups}
    for r in range(repeats):
        for c, (model, opt) in setups.items():
            c0, w0 = time.process_time(), time.perf_counter()
            for s in range(steps):
                train_step(model, opt, batches[(r * steps + s) % len(batches)])
            cpu[c].append((time.process_time() - c0) / steps)
            wall[c].append((time.perf_counter() - w0) / steps)
    return {
        c: {"cpu": statistics.median(cpu[c]), "wall": statistics.median(wall[c])} for c in setups
    }


def report_online_ngd(models: list[str], repeats: int, steps: int, batches) -> None:
    print(f"{'model':7s} {'optimizer':11s} {'cpu ms':>7s} {'xSGD':>6s} {'target':>7s} "
          f"{'wall ms':>8s} {'xSGD':>6s}")  # fmt: skip
    for name in models:
        times = time_online_ngd(name, repeats, steps, batches)
        base = times["sgd"]
        for c, t in times.items():
            ratio = t["cpu"] / base["cpu"]
            tgt = "-" if c == "sgd" else f"<= {ONLINE_TARGET:g}"
            flag = "" if c == "sgd" else ("  ok" if ratio <= ONLINE_TARGET else "  MISS")
            print(
                f"{name:7s} {c:11s} {t['cpu'] * 1e3:7.2f} {ratio:6.2f} {tgt:>7s} "
                f"{t['wall'] * 1e3:8.2f} {t['wall'] / base['wall']:6.2f}{flag}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "CONFIG"))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--online", action="store_true", help="only the online NGD / SGD table")
    parser.add_argument("--flops", action="store_true", help="only print the FLOP counts")
    args = parser.parse_args()
    if args.flops:
        print_flops()
        return
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, steps=args.steps)
        return
    repeats = 5 if args.quick else 15
    batches, source = load_batches(16)
    print(f"data: {source}")
    print(
        f"torch {torch.__version__}, threads={args.threads}, float32, batch {BATCH}, "
        f"{repeats} repeats x {args.steps} steps (medians)\n"
    )
    if args.online:
        report_online_ngd(args.models, repeats, args.steps, batches)
        return
    print_flops()
    targets = {
        ("mlp", "ngd-empirical"): 2.0,
        ("mlp", "ngd-true"): 10.0,
        ("lenet5", "ngd-empirical"): 6.0,
    }
    print(
        f"{'model':7s} {'optimizer':14s} {'cpu ms':>7s} {'xSGD':>6s} {'target':>7s} "
        f"{'wall ms':>8s} {'xSGD':>6s} {'peak RSS MB':>11s} {'+MB':>7s} {'xSGD':>6s} "
        f"{'skips':>5s} solve"
    )
    for name in args.models:
        times = time_steps(name, repeats, args.steps, batches)
        mems = {c: peak_memory(name, c, args.steps, args.threads) for c in CONFIGS}
        for c in CONFIGS:
            t, base = times[c], times["sgd"]
            ratio = t["cpu"] / base["cpu"]
            target = targets.get((name, c))
            tgt = f"<= {target:g}" if target else "-"
            mem_ratio = mems[c]["delta_mb"] / max(mems["sgd"]["delta_mb"], 1e-9)
            flag = "" if target is None else ("  ok" if ratio <= target else "  MISS")
            print(
                f"{name:7s} {c:14s} {t['cpu'] * 1e3:7.2f} {ratio:6.2f} {tgt:>7s} "
                f"{t['wall'] * 1e3:8.2f} {t['wall'] / base['wall']:6.2f} "
                f"{mems[c]['peak_mb']:11.0f} {mems[c]['delta_mb']:7.1f} {mem_ratio:6.2f} "
                f"{t['skipped']:5d} {t['solve']}{flag}"
            )


if __name__ == "__main__":
    main()
