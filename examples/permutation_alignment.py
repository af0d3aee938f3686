"""Two MLPs trained from different seeds: the same basin once their hidden units are aligned?

Trains two ``MLP(784, (256, 256), 10)`` networks on the same Fashion-MNIST subset from different
initial weights and data orders (plain SGD with momentum, a few epochs, one CPU thread), then
compares them with :mod:`lightning_curvature.permutation`:

* Φ(W, W′) = Σ(W − W′)²/Σ(W + W′)² per layer (seed 003, Eq. 35) as stored, after seed 003's
  lexicographic and maximin canonical reordering of both networks, and after weight matching
  (B's hidden units aligned to A's by linear assignment, Ainsworth et al. 2023);
* the loss along the linear path from A to B, before and after alignment, and its barrier
  max_t [L(θ(t)) − ((1 − t) L_A + t L_B)], on the training subset and on held-out images.

Writes ``permutation_alignment.png`` (path losses left, Φ per layer right) and
``permutation_alignment.json`` (every number) to ``--out``. About a minute on one thread.

Run::

    PYTHONPATH=. LIGHTNING_CURVATURE_DATA=<data dir> python examples/permutation_alignment.py \\
        [--train-size 10000] [--epochs 2] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_curvature.data import DATASETS, load_split  # noqa: E402
from lightning_curvature.models.networks import MLP  # noqa: E402
from lightning_curvature.permutation import (  # noqa: E402
    canonicalize,
    compare_networks,
    parameter_dict,
    phi_distance,
    spec_for_module,
)

LOSS = nn.CrossEntropyLoss()


def load_images(split: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_split(DATASETS["fashion_mnist"], split, download=False)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(labels), generator=g)[:size]
    x = torch.as_tensor(images[idx.numpy()], dtype=torch.float32) / 255.0
    x = (x - 0.2860) / 0.3530  # Fashion-MNIST training mean and std
    return x.unsqueeze(1), torch.as_tensor(labels[idx.numpy()], dtype=torch.int64)


def train(x, y, seed: int, epochs: int, hidden: tuple[int, ...], lr: float) -> MLP:
    torch.manual_seed(seed)  # nn.Module init draws from the global RNG
    model = MLP(784, hidden, 10, activation="relu")
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1000)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad(set_to_none=True)
            LOSS(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def plot(result: dict, path: Path) -> None:
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, color, label in (("naive", "tab:red", "as trained"), ("aligned", "tab:blue",
                                                                        "B aligned to A")):
        for split, style in (("train", "-"), ("test", "--")):
            p = result["paths"][split][key]
            ax.plot(p["t"], p["losses"], style, color=color, marker="o", ms=3,
                    label=f"{label}, {split} (barrier {p['barrier']:.3f})")
    ax.set_xlabel("t   (θ = θ_A + t (θ_B − θ_A))")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Loss on the linear path between two MLPs")
    ax.legend(fontsize=8)
    layers = [name for name, _ in result["phi"]["naive"]["per_layer"]]
    width = 0.2
    bars = (
        ("naive", "as trained", "tab:red"),
        ("lexicographic", "lexicographic sort", "tab:orange"),
        ("maximin", "maximin sort", "tab:green"),
        ("aligned", "weight matching", "tab:blue"),
    )
    for k, (key, label, color) in enumerate(bars):
        vals = [v for _, v in result["phi"][key]["per_layer"]]
        pos = [i + (k - 1.5) * width for i in range(len(layers))]
        overall = result["phi"][key]["overall"]
        bx.bar(pos, vals, width, color=color, label=f"{label} (overall {overall:.3f})")
    bx.set_xticks(range(len(layers)), layers)
    bx.axhline(1.0, color="gray", lw=0.8, ls=":")
    bx.set_ylabel("Φ = Σ(W − W′)² / Σ(W + W′)²")
    bx.set_title("Φ per layer (weight and bias)")
    bx.set_ylim(0, 1.35)
    bx.legend(fontsize=8, loc="upper center", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def path_dict(p) -> dict:
    return {"t": list(p.t), "losses": list(p.losses), "barrier": p.barrier,
            "barrier_t": p.barrier_t}


def phi_dict(r) -> dict:
    return {"overall": r.overall, "per_layer": [list(x) for x in r.per_layer]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--test-size", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--points", type=int, default=21)
    parser.add_argument("--seeds", type=int, nargs=2, default=[0, 1])
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    x, y = load_images("train", args.train_size, seed=0)
    xt, yt = load_images("test", args.test_size, seed=1)
    hidden = tuple(args.hidden)
    a, b = (train(x, y, s, args.epochs, hidden, args.lr) for s in args.seeds)
    trained = time.perf_counter() - start
    spec = spec_for_module(a)
    models = {"A": a, "B": b}
    on_train = compare_networks(models, LOSS, (x, y), num_points=args.points)
    on_test = compare_networks(models, LOSS, (xt, yt), num_points=args.points)
    pair, pair_test = on_train.pair("A", "B"), on_test.pair("A", "B")
    pa, pb = parameter_dict(a), parameter_dict(b)
    canonical = {
        m: phi_distance(canonicalize(pa, spec, m).params, canonicalize(pb, spec, m).params, spec)
        for m in ("lexicographic", "maximin")
    }
    result = {
        "config": {**vars(args), "out": str(args.out)},
        "accuracy": {"A": {"train": accuracy(a, x, y), "test": accuracy(a, xt, yt)},
                     "B": {"train": accuracy(b, x, y), "test": accuracy(b, xt, yt)}},
        "phi": {"naive": phi_dict(pair.phi_naive), "aligned": phi_dict(pair.phi_aligned),
                **{m: phi_dict(r) for m, r in canonical.items()}},
        "paths": {
            "train": {"naive": path_dict(pair.path_naive),
                      "aligned": path_dict(pair.path_aligned)},
            "test": {"naive": path_dict(pair_test.path_naive),
                     "aligned": path_dict(pair_test.path_aligned)},
        },
        "matching": {"sweeps": pair.alignment.sweeps, "converged": pair.alignment.converged,
                     "seconds": pair.alignment.seconds},
        "seconds": {"training": trained, "total": time.perf_counter() - start},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    plot(result, args.out / "permutation_alignment.png")
    (args.out / "permutation_alignment.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("accuracy", "matching", "seconds")}, indent=1))
    for key in ("naive", "lexicographic", "maximin", "aligned"):
        print(f"phi {key:>13}: {result['phi'][key]['overall']:.4f}  per layer "
              + " ".join(f"{v:.3f}" for _, v in result["phi"][key]["per_layer"]))
    for split in ("train", "test"):
        for key in ("naive", "aligned"):
            p = result["paths"][split][key]
            print(f"barrier {split:>5} {key:>7}: {p['barrier']:.4f} at t={p['barrier_t']:.2f}")


if __name__ == "__main__":
    main()
