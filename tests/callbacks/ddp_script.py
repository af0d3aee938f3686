"""Run the callback suite on a frozen tiny model with 1 or 2 CPU processes (DDP, gloo).

Used by ``test_ddp.py``: ``python ddp_script.py DEVICES OUT_DIR``. With ``lr=0`` the weights stay
at their initial values, so every measured value must agree between 1 and 2 processes up to
float reduction order.
"""

from __future__ import annotations

import sys

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_curvature.callbacks as cb


class Frozen(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def suite() -> list:
    shared = {"num_samples": 63, "batch_size": 16, "seed": 1, "measure_on_train_start": True}
    shared["every_n_epochs"] = 1
    return [
        cb.HessianTrace(num_probes=6, **shared),
        cb.HessianEigenvalues(max_iters=15, **shared),
        cb.HessianSpectrum(num_iters=10, num_points=32, **shared),
        cb.LocalLearningCoefficient(num_chains=2, num_draws=15, num_burnin=5, **shared),
        cb.LossProjection(steps=5, num_random_projections=3, num_trace_directions=3, **shared),
    ]


def main(devices: int, out: str) -> None:
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=1,
        logger=TensorBoardLogger(out, name="tb", version=0),
        callbacks=suite(),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Frozen(), DataLoader(dataset(), batch_size=32, shuffle=False))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
