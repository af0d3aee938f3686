"""A tiny synthetic IDX dataset, an isolated data lookup path and no network for CLI tests."""

from __future__ import annotations

import pytest
import yaml

from lightning_curvature.data import sources
from tests.data_models.idx_helpers import write_dataset


@pytest.fixture(autouse=True)
def isolated_lookup(tmp_path, monkeypatch):
    monkeypatch.delenv(sources.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", (str(tmp_path / "system"),))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    def no_network(url, timeout=60.0):
        raise AssertionError(f"a test tried to download {url}")

    monkeypatch.setattr(sources, "download_url", no_network)
    return tmp_path


@pytest.fixture
def make_config(tmp_path):
    """Write a small fit config (synthetic Fashion-MNIST-shaped data); return its path."""
    data_dir = tmp_path / "data"
    write_dataset(data_dir, n_train=300, n_test=60)

    def make(name: str = "tiny", callbacks: list | None = None, **sections) -> str:
        config = {
            "seed_everything": 0,
            "trainer": {
                "max_epochs": 2,
                "accelerator": "cpu",
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "log_every_n_steps": 1,
                "logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {
                        "save_dir": str(tmp_path / "runs"),
                        "name": name,
                        "default_hp_metric": False,
                    },
                },
            },
            "model": {
                "model": {
                    "class_path": "lightning_curvature.models.MLP",
                    "init_args": {"hidden_sizes": [16]},
                },
                "optimizer": "sgd",
                "lr": 0.1,
            },
            "data": {
                "dataset": "fashion_mnist",
                "data_dir": str(data_dir),
                "download": False,
                "verify_checksums": False,
                "val_size": 60,
                "batch_size": 32,
            },
        }
        if callbacks:
            config["trainer"]["callbacks"] = callbacks
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key].update(value)
            else:
                config[key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        return str(path)

    return make
