"""The public API in three short parts (Fashion-MNIST subset, a few minutes on a laptop CPU).

1. Callbacks on a Lightning ``Trainer``: curvature and LLC measured while a model trains.
2. :class:`~lightning_curvature.optim.NGD` in a plain PyTorch loop.
3. The engine from a notebook: Hessian trace, extreme eigenvalues and the LLC of any model.

Run from the repository root (data: ``$LIGHTNING_CURVATURE_DATA``, the user cache, or a download)::

    python examples/public_api.py
    tensorboard --logdir runs/example_api
"""

from __future__ import annotations

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_curvature.callbacks import (
    CurvatureDashboard,
    HessianEigenvalues,
    HessianTrace,
    LocalLearningCoefficient,
    OptimizerMonitor,
)
from lightning_curvature.curvature import HessianOperator, extreme_eigenpairs, hutchpp_trace
from lightning_curvature.data import MNISTDataModule
from lightning_curvature.models import MLP, ImageClassifier
from lightning_curvature.optim import NGD
from lightning_curvature.sampling import estimate_llc


def callbacks_on_a_trainer(dm: MNISTDataModule) -> ImageClassifier:
    """Part 1: attach measuring callbacks; everything lands in TensorBoard (x-axis: epoch)."""
    torch.manual_seed(0)
    module = ImageClassifier(MLP(hidden_sizes=(64,)), optimizer="sgd", lr=0.05)
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=TensorBoardLogger("runs", name="example_api", default_hp_metric=False),
        callbacks=[
            HessianTrace(num_samples=512, num_matvecs=20, measure_on_train_start=True),
            HessianEigenvalues(num_samples=512, max_iters=20),
            LocalLearningCoefficient(num_samples=1024, num_chains=2, num_draws=30, num_burnin=10),
            OptimizerMonitor(),
            CurvatureDashboard(),
        ],
        enable_progress_bar=False,
    )
    trainer.fit(module, datamodule=dm)
    shown = ("val/loss", "curvature/trace", "curvature/lambda_max", "curvature/lambda_min",
             "llc/lambda_hat", "llc/lambda_hat_std", "optim/update_norm")  # fmt: skip
    metrics = trainer.callback_metrics
    print("after training:", {k: round(float(metrics[k]), 4) for k in shown if k in metrics})
    return module


def ngd_in_a_plain_loop(x: torch.Tensor, y: torch.Tensor, steps: int = 200) -> torch.nn.Module:
    """Part 2: NGD is a torch.optim.Optimizer that takes the module (it needs per-sample data)."""
    torch.manual_seed(0)
    model = MLP(hidden_sizes=(64,))
    loss_fn = torch.nn.CrossEntropyLoss()  # mean reduction: NGD recovers per-sample gradients
    optimizer = NGD(model, lr=0.05, alpha=0.1, eps=1e-10, fisher_type="empirical")
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)

        def closure(idx=idx):
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            return loss

        loss = optimizer.step(closure).detach()
        if step % 50 == 0:
            stats = optimizer.stats
            print(
                f"NGD step {step:3d} loss {float(loss):.4f} kappa {stats['kappa']:.3g} "
                f"tr F {stats['fisher_trace']:.3g} |update| {stats['update_norm']:.3g}"
            )
    return model


def engine_from_a_notebook(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Part 3: no Lightning needed; every result carries its uncertainty and cost."""
    loss_fn = torch.nn.CrossEntropyLoss()
    data = (x[:1024], y[:1024])
    op = HessianOperator(model, loss_fn, data)  # HVPs of the mean loss over these samples
    trace = hutchpp_trace(op, num_matvecs=60, generator=torch.Generator().manual_seed(0))
    print(f"tr H = {trace.value:.3f} ± {trace.stderr:.3f} ({trace.num_matvecs} HVPs)")
    eig = extreme_eigenpairs(op, max_iters=40, generator=torch.Generator().manual_seed(1))
    print(f"lambda_max = {eig.lambda_max:.4f}, lambda_min = {eig.lambda_min:.4f}, "
          f"converged: {eig.converged}")  # fmt: skip
    llc = estimate_llc(
        model, loss_fn, (x, y), num_chains=2, num_draws=100, num_burnin=50, batch_size=64, seed=0
    )
    print(f"LLC = {llc.llc_mean:.2f} ± {llc.llc_std:.2f} (n = {llc.n}, n*beta = {llc.nbeta:.1f})")


def main() -> None:
    dm = MNISTDataModule("fashion_mnist", train_subset=4000, val_subset=1000, batch_size=128)
    callbacks_on_a_trainer(dm)
    x, y = dm.train_tensors  # the data module exposes its tensors after setup
    model = ngd_in_a_plain_loop(x, y)
    engine_from_a_notebook(model, x, y)


if __name__ == "__main__":
    main()
