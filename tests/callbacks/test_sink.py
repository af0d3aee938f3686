"""MetricSink's images: PNG-encoded once and read back by TensorBoard's own event reader."""

from __future__ import annotations

import io

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_curvature.callbacks.sink import MetricSink


class _Trainer:
    is_global_zero = True
    world_size = 1

    def __init__(self, loggers):
        self.loggers = loggers


def _images(log_dir):
    acc = EventAccumulator(log_dir, size_guidance={"images": 0})
    acc.Reload()
    return acc


def test_images_and_figures_round_trip_through_the_event_file(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="sink")
    sink = MetricSink(_Trainer([logger]), None, step=3)
    rgb = np.random.default_rng(0).integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    sink.image("a/rgb", rgb)
    sink.image("a/float", rgb.astype(np.float32) / 255.0)  # not uint8: add_image's own path
    fig = Figure(figsize=(2, 1), dpi=40)
    fig.add_subplot().plot([0, 1], [1, 0])
    sink.figure("a/fig", fig)
    logger.experiment.flush()
    acc = _images(logger.log_dir)
    assert sorted(acc.Tags()["images"]) == ["a/fig", "a/float", "a/rgb"]
    event = acc.Images("a/rgb")[0]
    back = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    assert event.step == 3 and (event.width, event.height) == (50, 30)
    assert np.array_equal(back, rgb)  # lossless
    fl = acc.Images("a/float")[0]
    back_f = np.asarray(Image.open(io.BytesIO(fl.encoded_image_string)).convert("RGB"))
    assert np.abs(back_f.astype(int) - rgb.astype(int)).max() <= 1
    fg = acc.Images("a/fig")[0]
    assert (fg.width, fg.height) == (80, 40) and fg.step == 3
