"""Loss-landscape benchmark: a 21x21 grid on 2,048 Fashion-MNIST samples.

For the MLP 784-128-10 and LeNet-5 this measures, in one process, medians of repeats:

* ``floor``: 441 bare forward passes over the same data (``model(x)`` under ``no_grad``), the
  least any grid evaluator must spend;
* ``ours``: :func:`lightning_curvature.landscape.loss_surface` on filter-normalized random
  directions (default settings: the Linear/conv first layer is evaluated once per direction,
  ``landscape.stem``), and its ratio to the floor (target <= 1.05x, and faster than the peer);
* ``ours, generic route``: the same call with ``linear_stem=False`` (the whole forward at every
  point), to show what the first-layer rewrite buys;
* ``loss-landscapes`` 3.0.6 ``random_plane`` with its default call (run in a subprocess with the
  peer virtualenv, which also measures its own floor), and how far that call moved the weights
  of the model it was given (ours must leave the module bitwise unchanged);
* the Hessian-direction snapshot (Lanczos directions + grid) vs the random one (target <= 1.5x).

Run (about 10 minutes on 2 shared CPU cores)::

    LIGHTNING_CURVATURE_DATA=<data root> PYTHONPATH=. \\
        python benchmarks/landscape.py [--models mlp lenet] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import PEER_PYTHON  # noqa: E402  (benchmarks/ is sys.path[0] when run as a script)
from torch import nn

from lightning_curvature.data import DATASETS, load_split, pixels_to_unit  # noqa: E402
from lightning_curvature.models import MLP, LeNet5  # noqa: E402


# The package's networks (importable without Lightning), so the peer virtualenv running this same
# file (``--peer-config``) builds the very same modules; flattened into one nn.Sequential whose
# parameters are created in the same order (bit-identical to the former local definitions).
def build_model(name: str) -> nn.Module:
    """MLP 784-128-10 or LeNet-5 (conv 6@5x5 pad 2, pool, conv 16@5x5, pool, 120, 84, 10)."""
    if name == "mlp":
        return MLP(hidden_sizes=[128]).net
    if name == "lenet":
        lenet = LeNet5()
        return nn.Sequential(*lenet.features, *lenet.classifier)
    raise ValueError(f"unknown model {name!r}")


def bare_forward_floor(model: nn.Module, x: torch.Tensor, num: int) -> float:
    """Seconds for ``num`` forward passes over ``x`` under ``no_grad`` in eval mode."""
    model.eval()
    with torch.no_grad():
        model(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(num):
            model(x)
    return time.perf_counter() - t0


def peer_main(config: Path) -> None:
    """Runs in the peer virtualenv: loss-landscapes' default ``random_plane`` call, timed."""
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    cfg = json.loads(config.read_text())
    torch.set_num_threads(cfg["threads"])
    blob = torch.load(cfg["blob"])
    x, y = blob["x"], blob["y"]
    out: dict = {"peer": [], "floor": [], "max_weight_change": []}
    for r in range(cfg["repeats"]):
        model = build_model(cfg["model"])
        model.load_state_dict(blob["state"])
        model.eval()
        out["floor"].append(bare_forward_floor(model, x, cfg["steps"] ** 2))
        before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(r)  # loss-landscapes draws its directions from the global RNG
        t0 = time.perf_counter()
        grid = loss_landscapes.random_plane(
            model, Loss(nn.CrossEntropyLoss(), x, y), distance=1, steps=cfg["steps"]
        )
        out["peer"].append(time.perf_counter() - t0)
        out["max_weight_change"].append(
            max(
                (p.detach() - b).abs().max().item()
                for p, b in zip(model.parameters(), before, strict=True)
            )
        )
        out["grid_shape"] = list(grid.shape)
    print(json.dumps(out))


def load_fashion_mnist(num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``num`` training images (scaled to [0, 1], not standardized) and labels."""
    images, labels = load_split(DATASETS["fashion_mnist"], "train", download=False)
    x = pixels_to_unit(images[:num]).unsqueeze(1)
    return x, torch.from_numpy(labels[:num].astype("int64"))


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    """A few SGD epochs so the grid is centred on a trained point, not at initialization."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    for p in model.parameters():
        p.grad = None


def run_peer(name: str, state: dict, x, y, steps: int, repeats: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save({"state": state, "x": x, "y": y}, tmp / "blob.pt")
        cfg = {
            "model": name,
            "steps": steps,
            "repeats": repeats,
            "threads": threads,
            "blob": str(tmp / "blob.pt"),
        }
        (tmp / "cfg.json").write_text(json.dumps(cfg))
        proc = subprocess.run(
            [PEER_PYTHON, __file__, "--peer-config", str(tmp / "cfg.json")],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"loss-landscapes subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def state_equal(model: nn.Module, saved: dict) -> bool:
    return all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def bench_model(name: str, args: argparse.Namespace, x, y) -> dict:
    from lightning_curvature import curvature
    from lightning_curvature.landscape import (
        hessian_directions,
        loss_surface,
        random_directions,
    )

    torch.manual_seed(0)
    model = build_model(name)
    train_briefly(model, x, y, args.train_epochs)
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    num = args.steps**2
    floors, ours, generic, surfaces, max_dev = [], [], [], [], 0.0
    for r in range(args.repeats):
        floors.append(bare_forward_floor(model, x, num))
        dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(r))
        t0 = time.perf_counter()
        surface = loss_surface(model, loss_fn, (x, y), dirs, steps=args.steps)
        ours.append(time.perf_counter() - t0)
        surfaces.append(surface)
        t0 = time.perf_counter()
        plain = loss_surface(model, loss_fn, (x, y), dirs, steps=args.steps, linear_stem=False)
        generic.append(time.perf_counter() - t0)
        # Same function, other evaluation order: agreement to float32 rounding.
        max_dev = max(max_dev, float(np.max(np.abs(surface.losses / plain.losses - 1.0))))
    unchanged = state_equal(model, saved)
    result = {
        "model": name,
        "num_params": sum(p.numel() for p in model.parameters()),
        "floor_s": statistics.median(floors),
        "ours_s": statistics.median(ours),
        "ours_over_floor": statistics.median(o / f for o, f in zip(ours, floors, strict=True)),
        "generic_s": statistics.median(generic),
        "generic_over_floor": statistics.median(
            o / f for o, f in zip(generic, floors, strict=True)
        ),
        "stem_vs_generic_max_rel_dev": max_dev,
        "vectorized": surfaces[-1].vectorized,
        "chunk_size": surfaces[-1].chunk_size,
        "ours_module_unchanged": unchanged,
        "center_loss": surfaces[-1].center_loss,
    }
    if not args.skip_peer:
        peer = run_peer(name, saved, x, y, args.steps, args.peer_repeats, args.threads)
        result["peer_s"] = statistics.median(peer["peer"])
        result["peer_floor_s"] = statistics.median(peer["floor"])
        result["peer_over_its_floor"] = statistics.median(
            p / f for p, f in zip(peer["peer"], peer["floor"], strict=True)
        )
        result["peer_max_weight_change"] = max(peer["max_weight_change"])
    if hasattr(curvature, "extreme_eigenpairs"):
        hess_times, rand_times = [], []
        for r in range(args.snapshot_repeats):
            t0 = time.perf_counter()
            dirs = random_directions(model, 2, generator=torch.Generator().manual_seed(r))
            loss_surface(model, loss_fn, (x, y), dirs, steps=args.steps)
            rand_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            op = curvature.HessianOperator(model, loss_fn, (x, y))
            hd = hessian_directions(
                op, max_iters=args.lanczos_iters, generator=torch.Generator().manual_seed(r)
            )
            hs = loss_surface(model, loss_fn, (x, y), hd, steps=args.steps)
            hess_times.append(time.perf_counter() - t0)
        result.update(
            hessian_snapshot_s=statistics.median(hess_times),
            random_snapshot_s=statistics.median(rand_times),
            hessian_over_random=statistics.median(
                h / r for h, r in zip(hess_times, rand_times, strict=True)
            ),
            lambda_max=hd.lambda_max,
            lambda_min=hd.lambda_min,
            lanczos_matvecs=hd.num_matvecs,
            lanczos_converged=hd.converged,
            lanczos_residuals=(
                float(hd.eigenpairs.residual_max),
                float(hd.eigenpairs.residual_min),
            ),
            hessian_grid_min=hs.grid_minimum(),
        )
        result["ours_module_unchanged"] = result["ours_module_unchanged"] and state_equal(
            model, saved
        )
    return result


def report(r: dict) -> None:
    print(f"\n== {r['model']} ({r['num_params']:,} parameters), centre loss {r['center_loss']:.4f}")
    print(f"  441 bare forwards (floor)       {r['floor_s']:7.2f} s")
    print(
        f"  ours (loss_surface)             {r['ours_s']:7.2f} s   = {r['ours_over_floor']:.2f}x "
        f"floor   [target <= 1.05x]  (vmap={r['vectorized']}, chunk={r['chunk_size']})"
    )
    print(
        f"  ours, generic route             {r['generic_s']:7.2f} s   = "
        f"{r['generic_over_floor']:.2f}x floor   (linear_stem=False; max relative deviation "
        f"from the default route {r['stem_vs_generic_max_rel_dev']:.1e})"
    )
    print(f"  ours: module bitwise unchanged  {r['ours_module_unchanged']}   [target True]")
    if "peer_s" in r:
        faster = r["peer_s"] / r["ours_s"]
        print(
            f"  loss-landscapes random_plane    {r['peer_s']:7.2f} s   = "
            f"{r['peer_over_its_floor']:.2f}x its floor ({r['peer_floor_s']:.2f} s); "
            f"ours is {faster:.2f}x faster   [target > 1x: {'met' if faster > 1 else 'NOT met'}]"
        )
        print(
            f"  loss-landscapes moved weights by up to {r['peer_max_weight_change']:.3g} "
            "(default call, deepcopy_model=False)"
        )
    if "hessian_snapshot_s" in r:
        print(
            f"  snapshot: Hessian {r['hessian_snapshot_s']:.2f} s vs random "
            f"{r['random_snapshot_s']:.2f} s = {r['hessian_over_random']:.2f}x   "
            "[target <= 1.5x]"
        )
        print(
            f"    lambda_max={r['lambda_max']:.4g} lambda_min={r['lambda_min']:.4g} "
            f"({r['lanczos_matvecs']} HVPs, converged={r['lanczos_converged']}, residuals="
            f"{r['lanczos_residuals'][0]:.2g}/{r['lanczos_residuals'][1]:.2g})"
        )
    else:
        print("  snapshot: engine's extreme_eigenpairs not available, skipped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet"])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-repeats", type=int, default=3)
    parser.add_argument("--snapshot-repeats", type=int, default=3)
    parser.add_argument("--lanczos-iters", type=int, default=40)
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--peer-config", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_config is not None:
        peer_main(args.peer_config)
        return
    torch.set_num_threads(args.threads)
    x, y = load_fashion_mnist(args.samples)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.samples} samples, "
        f"{args.steps}x{args.steps} grid, medians of {args.repeats} repeats"
    )
    results = []
    for name in args.models:
        r = bench_model(name, args, x, y)
        report(r)
        results.append(r)
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
