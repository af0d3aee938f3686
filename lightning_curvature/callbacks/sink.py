"""Where measurements go: TensorBoard (x-axis = epoch), other loggers, and Lightning's metrics.

- Scalars go to every logger: a TensorBoard logger's ``SummaryWriter`` directly (so the x-axis is
  the epoch, not the global step), any other logger through ``log_metrics(step=epoch)``. They are
  also passed to ``pl_module.log(..., logger=False)`` so they reach ``trainer.callback_metrics``
  (``EarlyStopping``/``ModelCheckpoint`` can monitor them) even without a logger.
- Figures, images and histograms go to TensorBoard only.
- Only rank zero writes to loggers; every rank calls ``pl_module.log`` with the same value so
  ``callback_metrics`` agree across ranks.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_curvature.landscape.figures import render_rgb

__all__ = ["MetricSink"]

_warned_no_logger: set[int] = set()


class MetricSink:
    """Log scalars/figures/images/histograms for one trainer at one epoch.

    Parameters
    ----------
    trainer : lightning.pytorch.Trainer
    pl_module : lightning.pytorch.LightningModule
    step : int
        The x-axis value: number of completed training epochs (0 = before training).
    """

    def __init__(self, trainer: Any, pl_module: Any, step: int) -> None:
        self.trainer = trainer
        self.pl_module = pl_module
        self.step = int(step)
        self.is_global_zero = bool(getattr(trainer, "is_global_zero", True))
        loggers = list(getattr(trainer, "loggers", []) or [])
        self.tensorboard = [lg for lg in loggers if isinstance(lg, TensorBoardLogger)]
        self.others = [lg for lg in loggers if not isinstance(lg, TensorBoardLogger)]
        if not loggers and id(trainer) not in _warned_no_logger:
            _warned_no_logger.add(id(trainer))
            rank_zero_warn(
                "lightning_curvature callbacks: the Trainer has no logger, so figures, images and "
                "histograms are dropped; scalars still reach trainer.callback_metrics through "
                "pl_module.log. Pass logger=TensorBoardLogger(...) (the default when tensorboard "
                "is installed) to see them."
            )

    # -- scalars ---------------------------------------------------------------------------
    def scalars(self, values: dict[str, float]) -> None:
        """Log finite scalars (the caller has already dropped non-finite ones)."""
        if not values:
            return
        if self.is_global_zero:
            for lg in self.tensorboard:
                for tag, v in values.items():
                    lg.experiment.add_scalar(tag, v, global_step=self.step)
            for lg in self.others:
                lg.log_metrics(dict(values), step=self.step)
        log = getattr(self.pl_module, "log", None)
        if log is not None and getattr(self.pl_module, "_current_fx_name", None) is not None:
            distributed = int(getattr(self.trainer, "world_size", 1) or 1) > 1
            for tag, v in values.items():
                log(
                    tag, float(v), logger=False, on_step=False, on_epoch=True, sync_dist=distributed
                )

    # -- rich content (TensorBoard only, rank zero only) -----------------------------------
    def figure(self, tag: str, fig: Any) -> None:
        if self.is_global_zero and self.tensorboard:
            self.image(tag, render_rgb(fig))
        _close(fig)

    def image(self, tag: str, image_hwc: np.ndarray) -> None:
        """An ``(H, W, 3)`` ``uint8`` image, PNG-encoded once for every TensorBoard logger."""
        if not self.is_global_zero or not self.tensorboard:
            return
        summary = _image_summary(tag, image_hwc)
        for lg in self.tensorboard:
            writer = lg.experiment
            # The proto is TensorBoard's own: only torch's SummaryWriter takes it (tensorboardX,
            # which Lightning falls back to without tensorboard, has its own proto classes).
            native = type(writer).__module__.startswith("torch.utils.tensorboard")
            file_writer = getattr(writer, "file_writer", None) if native else None
            if summary is None or file_writer is None:
                writer.add_image(tag, image_hwc, global_step=self.step, dataformats="HWC")
            else:
                file_writer.add_summary(summary, self.step)

    def histogram(self, tag: str, bucket_limits: np.ndarray, bucket_counts: np.ndarray) -> None:
        """A histogram from bin right edges and counts (e.g. a density times the bin width)."""
        if not self.is_global_zero or not self.tensorboard:
            return
        limits = np.asarray(bucket_limits, dtype=np.float64)
        counts = np.asarray(bucket_counts, dtype=np.float64)
        total = float(counts.sum())
        if total <= 0 or not np.all(np.isfinite(counts)):
            return
        mean = float((counts * limits).sum() / total)
        for lg in self.tensorboard:
            lg.experiment.add_histogram_raw(
                tag,
                min=float(limits[0]),
                max=float(limits[-1]),
                num=total,
                sum=mean * total,
                sum_squares=float((counts * limits**2).sum()),
                bucket_limits=limits.tolist(),
                bucket_counts=counts.tolist(),
                global_step=self.step,
            )

    def artifact_dir(self, subdir: str) -> str | None:
        """A folder beside the event files (``logger.log_dir/subdir``), created on rank zero."""
        if not self.is_global_zero:
            return None
        root = None
        if self.tensorboard:
            root = self.tensorboard[0].log_dir
        if root is None:
            root = getattr(self.trainer, "log_dir", None) or getattr(
                self.trainer, "default_root_dir", None
            )
        if root is None:
            return None
        path = os.path.join(root, subdir)
        os.makedirs(path, exist_ok=True)
        return path


#: zlib level of the PNG images: level 1 encodes about 2.5x faster than PIL's default (6) for
#: these figures, at ~17% larger files; the encoding was a sixth of a LossProjection measurement.
_PNG_LEVEL = 1


def _image_summary(tag: str, image_hwc: np.ndarray) -> Any:
    """The TensorBoard image ``Summary`` (as ``SummaryWriter.add_image`` writes it), or None.

    The same proto as ``add_image``; only the PNG encoder's compression level differs
    (``_PNG_LEVEL``). None when the image is not ``uint8`` RGB or PIL/the proto is unavailable
    (the caller then uses ``add_image``).
    """
    image = np.asarray(image_hwc)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        return None
    try:
        from PIL import Image
        from tensorboard.compat.proto.summary_pb2 import Summary
    except ImportError:  # pragma: no cover - both ship with tensorboard/matplotlib
        return None
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(
        buffer, format="PNG", compress_level=_PNG_LEVEL
    )
    height, width, channels = image.shape
    encoded = Summary.Image(
        height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue()
    )
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])


def _close(fig: Any) -> None:
    # Figures are built with matplotlib.figure.Figure (no pyplot state); pyplot-made ones are
    # released from pyplot's registry too.
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # noqa: BLE001 - closing is best effort, never worth crashing training
        pass
