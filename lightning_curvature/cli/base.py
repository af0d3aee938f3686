"""The project's LightningCLI: ``ImageClassifier`` x ``MNISTDataModule`` and a typed ``split:``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_curvature.data.datamodule import MNISTDataModule
from lightning_curvature.models.classifier import ImageClassifier

__all__ = ["DEFAULT_LOGGER", "CurvatureCLI", "SplitSettings"]

#: The logger of every run unless the config or the command line says otherwise.
DEFAULT_LOGGER: dict[str, Any] = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "default"},
}


def _default_branches() -> dict[str, dict[str, Any]]:
    return {"sgd": {"optimizer": "sgd"}, "ngd": {"optimizer": "ngd"}}


@dataclass
class SplitSettings:
    """The ``split:`` section of a config (used by ``lightning-curvature split``; fit ignores it).

    Attributes
    ----------
    split_epoch : int, optional
        Epochs of SGD (run ``base``) before branching; ``trainer.max_epochs`` is the total.
    base : dict
        :class:`~lightning_curvature.models.ImageClassifier` arguments for the base phase
        (``optimizer`` must stay ``sgd``); branches inherit them.
    branches : dict
        Branch name -> ImageClassifier arguments of that branch (e.g.
        ``{ngd: {optimizer: ngd, lr: 0.01}}``). Validated by the same parser as ``model:``.
    """

    split_epoch: int | None = None
    base: dict[str, Any] = field(default_factory=dict)
    branches: dict[str, dict[str, Any]] = field(default_factory=_default_branches)


class CurvatureCLI(LightningCLI):
    """LightningCLI over ImageClassifier x MNISTDataModule with a typed ``split:`` section.

    Defaults: ``seed_everything: 0`` and a TensorBoardLogger under ``runs/default`` (both
    overridable). The resolved config is saved as ``<log_dir>/config.yaml``; LightningCLI refuses
    to overwrite an existing one (a fixed ``version`` of an earlier run).
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", {"logger": DEFAULT_LOGGER})
        super().__init__(ImageClassifier, MNISTDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(SplitSettings, "split", fail_untyped=True)
