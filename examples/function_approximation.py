"""Random vs Hessian loss projections for a 1-D function-approximation task.

Reproduces, at a reduced CPU budget, the study of Appendix D of L. Böttcher and G. Wheeler,
"Visualizing high-dimensional loss landscapes with Hessian directions" (J. Stat. Mech. 2024):
fit f(x) = log(sin 10x + 2) + sin x on [-1, 1) from 50 training points with fully connected ReLU
networks of width 100 and 2 or 10 hidden layers (MSE loss), then look at the loss around the
trained weights in two random directions and in the Hessian directions (v_max, v_min).

Reduced budget: full-batch Adam (learning rate 1e-3, cosine decay) for ``--epochs`` (default
3,000) steps on the CPU instead of the paper's much longer training, so the trained points are
less converged than the paper's; the script reports what it finds rather than assuming the
paper's numbers (about 3 CPU-minutes on 2 cores).

Everything is float64 (cheap at this size) so that Lanczos resolves a λ_min that is 1e-5 of
λ_max. Both projections use unit-length directions (random ones are filter-normalized, then
scaled to unit norm) on the same per-axis extents, so the two pictures share axes and color
scale: the first axis spans where v_max raises the loss about tenfold, the second where v_min
changes it by about the loss itself.
A random unit direction sees the curvature tr(H)/d on average, far below λ_max, and hides
negative curvature; the Hessian directions show both ends of the spectrum.

Run::

    PYTHONPATH=. python examples/function_approximation.py [--epochs 3000] [--out docs/figures]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from lightning_curvature.curvature import HessianOperator, ParameterLayout
from lightning_curvature.landscape import (
    hessian_directions,
    loss_surface,
    plot_slices,
    plot_surfaces,
    projection_curvatures,
    random_directions,
)


def target(x: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.sin(10 * x) + 2) + torch.sin(x)


def make_data(num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num, 1, generator=g, dtype=torch.float64) * 2 - 1
    return x, target(x)


def relu_net(depth: int, width: int = 100) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(1, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def train(model: nn.Module, data, epochs: int, lr: float) -> None:
    x, y = data
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    # cosine decay to zero: ends closer to a critical point than a constant step would
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.MSELoss()
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        schedule.step()
    for p in model.parameters():
        p.grad = None


def loss_at(model: nn.Module, layout: ParameterLayout, theta: torch.Tensor, data) -> float:
    x, y = data
    with torch.no_grad():
        return nn.functional.mse_loss(
            functional_call(model, layout.unflatten(theta), (x,)), y
        ).item()


def study(depth: int, args: argparse.Namespace, train_data, test_data) -> dict:
    torch.manual_seed(args.seed)
    model = relu_net(depth).double()
    t0 = time.perf_counter()
    train(model, train_data, args.epochs, args.lr)
    train_seconds = time.perf_counter() - t0
    model.eval()
    loss_fn = nn.MSELoss()
    layout = ParameterLayout.from_module(model)
    theta = layout.flat_values(model)

    op = HessianOperator(model, loss_fn, train_data)
    # tol relative to lambda_max: tight enough to resolve a lambda_min ~1e-5 lambda_max
    hd = hessian_directions(
        op,
        max_iters=args.lanczos_iters,
        tol=1e-7,
        generator=torch.Generator().manual_seed(args.seed),
    )
    proj = projection_curvatures(
        op, args.projections, generator=torch.Generator().manual_seed(args.seed + 1)
    )
    rand = random_directions(model, 2, generator=torch.Generator().manual_seed(args.seed + 2))
    rand = [d / d.norm() for d in rand]  # filter-normalized shape, unit length (module doc)

    # Extents per axis: along v_max the quadratic model rises by 10x the training loss at the
    # rim; along v_min it changes by about the training loss itself (½|λ_min| r² = L), capped at
    # 100x the first extent. The random plane uses the same two extents, so a random direction
    # (curvature about tr H / d) is compared with v_min on the same footing.
    train_loss = max(loss_at(model, layout, theta, train_data), 1e-12)
    r_max = args.radius or math.sqrt(2 * 10 * train_loss / hd.lambda_max)
    r_min = min(math.sqrt(2 * train_loss / max(abs(hd.lambda_min), 1e-300)), 100 * r_max)
    hs = loss_surface(model, loss_fn, train_data, hd, extent=(r_max, r_min), steps=args.steps)
    rs = loss_surface(
        model,
        loss_fn,
        train_data,
        rand,
        extent=(r_max, r_min),
        steps=args.steps,
        labels=("random 1", "random 2"),
    )
    rows = {}
    for name, surface, dirs in (("hessian", hs, hd.directions), ("random", rs, rand)):
        (a, b), grid_loss = surface.grid_minimum()
        point = theta + a * dirs[0] + b * dirs[1]
        rows[name] = {
            "grid_min": (a, b),
            "train_loss": loss_at(model, layout, point, train_data),
            "test_loss": loss_at(model, layout, point, test_data),
        }
    fig = plot_surfaces(
        hs,
        rs,
        titles=[
            f"Hessian directions\n$\\lambda_{{max}}$={hd.lambda_max:.3g}, "
            f"$\\lambda_{{min}}$={hd.lambda_min:.3g}",
            f"Random directions (unit norm)\nsaddle seen in {proj.saddle_fraction:.0%} of "
            f"{proj.num_projections} random planes",
        ],
        suptitle=f"{depth} hidden layers x 100 ReLU, {args.epochs} Adam steps",
        log_scale=True,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"function_approximation_depth{depth}.png", dpi=110)
    plot_slices(hs).savefig(out / f"function_approximation_depth{depth}_slices.png", dpi=110)
    return {
        "depth": depth,
        "params": layout.dim,
        "train_seconds": train_seconds,
        "train_loss": loss_at(model, layout, theta, train_data),
        "test_loss": loss_at(model, layout, theta, test_data),
        "lambda_max": hd.lambda_max,
        "lambda_min": hd.lambda_min,
        "lanczos_converged": hd.converged,
        "hvps": hd.num_matvecs,
        "trace": proj.trace_estimate,
        "trace_stderr": proj.trace_stderr,
        "saddle_fraction": proj.saddle_fraction,
        "extents": (r_max, r_min),
        **rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 10])
    parser.add_argument("--steps", type=int, default=41)
    parser.add_argument(
        "--radius",
        type=float,
        default=None,
        help="grid half-width along the first axis (default: from lambda_max)",
    )
    parser.add_argument("--lanczos-iters", type=int, default=400)
    parser.add_argument("--projections", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/figures")
    args = parser.parse_args()
    train_data = make_data(50, seed=args.seed)
    test_data = make_data(1000, seed=args.seed + 1000)
    for depth in args.depths:
        r = study(depth, args, train_data, test_data)
        print(
            f"\n== {depth} hidden layers ({r['params']:,} params, trained {r['train_seconds']:.0f}"
            f" s): train loss {r['train_loss']:.3g}, test loss {r['test_loss']:.3g}"
        )
        print(
            f"   lambda_max {r['lambda_max']:.4g}, lambda_min {r['lambda_min']:.4g} "
            f"({r['hvps']} HVPs, converged={r['lanczos_converged']}); tr H ~ {r['trace']:.4g}"
            f" +- {r['trace_stderr']:.2g}; random planes showing a saddle: "
            f"{r['saddle_fraction']:.1%}"
        )
        for name in ("hessian", "random"):
            row = r[name]
            print(
                f"   {name:8s} grid minimum at (a, b) = ({row['grid_min'][0]:+.3g}, "
                f"{row['grid_min'][1]:+.3g}) of extents ({r['extents'][0]:.3g}, "
                f"{r['extents'][1]:.3g}): train loss "
                f"{row['train_loss']:.3g}, test loss {row['test_loss']:.3g}"
            )


if __name__ == "__main__":
    main()
