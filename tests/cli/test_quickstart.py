"""README command 1: the quickstart config trains on the packaged sample, offline, no data dir."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lightning_curvature.cli import load_scalars, main
from lightning_curvature.data import sources

ROOT = Path(__file__).resolve().parents[2]


def test_quickstart_runs_on_the_packaged_sample_offline(tmp_path, monkeypatch):
    # the autouse fixture has removed LIGHTNING_CURVATURE_DATA and made any download an error
    assert sources.ENV_VAR not in os.environ
    monkeypatch.chdir(tmp_path)  # the config's relative save_dir lands here
    config = ROOT / "configs" / "quickstart.yaml"
    assert yaml.safe_load(config.read_text())["data"]["dataset"] == "fashion_mnist_sample"
    # tiny: one epoch (24 steps on the 3,000 training images); the callbacks have their own tests
    assert main(["fit", "--config", str(config), "--trainer.max_epochs=1",
                 "--data.val_subset=200",
                 "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false"]) == 0  # fmt: skip
    run = tmp_path / "runs" / "quickstart" / "version_0"
    scalars = load_scalars(run)
    assert scalars["val/loss"][0] == [1.0]
    assert scalars["val/acc"][1][0] > 0.3  # real Fashion-MNIST images: well above chance
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["dataset"] == "fashion_mnist_sample" and saved["data"]["data_dir"] is None
