"""Synthetic IDX datasets for tests (written without the package's IDX encoder)."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

from lightning_curvature.data import sources


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding written independently of the package (header + big-endian payload)."""
    codes = {
        np.dtype(np.uint8): 0x08,
        np.dtype(np.int8): 0x09,
        np.dtype(np.int32): 0x0C,
        np.dtype(np.float32): 0x0D,
    }
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def make_split(n: int, seed: int, label_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = ((np.arange(n) + label_offset) % 10).astype(np.uint8)
    return images, labels


def write_dataset(
    folder: Path,
    n_train: int = 120,
    n_test: int = 40,
    seed: int = 0,
    gz: bool = True,
    label_offset: int = 0,
) -> dict[str, bytes]:
    """Write the four files; return ``{name: decompressed bytes}``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = make_split(n, seed + (prefix == "t10k"), label_offset)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            data = idx_bytes(arr)
            out[name] = data
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (folder / name).write_bytes(data)
    return out  # fmt: skip


def spec_for(
    files: dict[str, bytes], n_train: int, n_test: int, mirrors=("https://a/", "https://b/")
):
    """A DatasetSpec whose checksums are those of the given synthetic files."""

    def fs(name, shape):
        data = files[name]
        return sources.FileSpec(
            name, shape, hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()
        )

    return sources.DatasetSpec(
        name="synthetic",
        folder_names=("synthetic", "Synthetic/raw"),
        splits={
            "train": (fs("train-images-idx3-ubyte", (n_train, 28, 28)),
                      fs("train-labels-idx1-ubyte", (n_train,))),
            "test": (fs("t10k-images-idx3-ubyte", (n_test, 28, 28)),
                     fs("t10k-labels-idx1-ubyte", (n_test,))),
        },
        mirrors=tuple(mirrors),
        mean=0.5,
        std=0.25,
    )  # fmt: skip
