"""The small Fashion-MNIST sample shipped inside the package (offline quickstart).

``lightning_curvature/data/sample/fashion-mnist/`` holds the **first 4,000 training and first
1,000 test images** (and labels) of Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, Zalando Research,
MIT license; the notice is in that folder's ``LICENSE``), in file order, re-encoded as IDX
``.gz`` with the official file names. "First N" keeps the choice deterministic and auditable;
the class counts are close to balanced (373-440 per class in the training part, 87-115 in the
test part). The dataset name ``fashion_mnist_sample`` reads it (no download, no environment
variable); its checksums are pinned in :data:`~lightning_curvature.data.sources.DATASETS`.

Regenerate (byte-identical, gzip ``mtime=0``) from a full copy::

    python -m lightning_curvature.data.packaged /path/to/fashion-mnist
"""

from __future__ import annotations

import argparse
import gzip
import os
from pathlib import Path

from .idx import encode_idx, read_idx

__all__ = ["SAMPLE_DIR", "SAMPLE_SIZES", "sample_dir", "write_sample"]

#: Items per split of the packaged sample.
SAMPLE_SIZES: dict[str, int] = {"train": 4000, "test": 1000}
#: Folder of the sample, relative to this package.
SAMPLE_DIR = Path("sample") / "fashion-mnist"

_PREFIX = {"train": "train", "test": "t10k"}


def sample_dir() -> Path:
    """Absolute path of the packaged sample folder."""
    return Path(__file__).resolve().parent / SAMPLE_DIR


def write_sample(source: str | os.PathLike[str], target: str | os.PathLike[str] | None = None):
    """Write the first ``SAMPLE_SIZES[split]`` items of each split of ``source`` to ``target``.

    Returns the list of written paths.
    """
    source = Path(source)
    target = Path(target) if target is not None else sample_dir()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for split, n in SAMPLE_SIZES.items():
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            name = f"{_PREFIX[split]}-{kind}-ubyte"
            src = source / f"{name}.gz"
            if not src.is_file():
                src = source / name
            array = read_idx(src, ndim=ndim).array[:n]
            path = target / f"{name}.gz"
            path.write_bytes(gzip.compress(encode_idx(array), compresslevel=9, mtime=0))
            written.append(path)
    return written


if __name__ == "__main__":  # pragma: no cover - maintenance tool
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="folder with the four official Fashion-MNIST IDX files")
    parser.add_argument("--target", default=None, help="default: the packaged sample folder")
    for p in write_sample(**vars(parser.parse_args())):
        print(p, p.stat().st_size, "bytes")
