"""Tiny synthetic setups shared by the callback tests (CPU, seconds per fit)."""

from __future__ import annotations

import glob
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("MPLBACKEND", "Agg")


def make_dataset(n: int = 192, features: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


class TinyClassifier(L.LightningModule):
    """MLP 6-8-3 (optionally with dropout) trained with SGD + momentum."""

    def __init__(
        self,
        features: int = 6,
        hidden: int = 8,
        classes: int = 3,
        dropout: float = 0.0,
        lr: float = 0.1,
        momentum: float = 0.9,
        with_loss_fn: bool = True,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, classes),
        )
        if with_loss_fn:
            self.loss_fn = nn.CrossEntropyLoss()
        self._criterion = nn.CrossEntropyLoss()
        self.lr, self.momentum = lr, momentum

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self._criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self._criterion(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def read_events(log_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event files under {log_dir}"
    accs = []
    for f in files:
        sizes = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
        acc = EventAccumulator(f, size_guidance=sizes)
        acc.Reload()
        accs.append(acc)
    return accs


def scalars(log_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} merged over every event file under log_dir."""
    out: dict[str, dict[int, float]] = {}
    for acc in read_events(log_dir):
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def images(log_dir: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for acc in read_events(log_dir):
        for tag in acc.Tags()["images"]:
            out.setdefault(tag, []).extend(acc.Images(tag))
    return out


def trainer(tmp_path, callbacks, *, max_epochs: int = 2, logger=True, **kwargs) -> L.Trainer:
    if logger is True:
        logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def loader(dataset, batch_size: int = 32, shuffle: bool = True, seed: int | None = None):
    g = None if seed is None else torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g)


@pytest.fixture
def tiny():
    """Namespace of the helpers above."""

    class _NS:
        pass

    ns = _NS()
    ns.make_dataset = make_dataset
    ns.Module = TinyClassifier
    ns.read_events = read_events
    ns.scalars = scalars
    ns.images = images
    ns.trainer = trainer
    ns.loader = loader
    return ns
