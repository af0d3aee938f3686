"""Where MNIST-family files are found: local folders first, then a verified download.

Lookup order for every file a split needs (first hit wins; the ``.gz`` and the raw file are both
accepted, and each folder is also searched under the common sub-folder names):

1. ``data_dir`` (when given),
2. ``$LIGHTNING_CURVATURE_DATA``,
3. the user cache ``$XDG_CACHE_HOME/lightning-curvature`` (``~/.cache/lightning-curvature``),
4. system dataset folders (``/usr/share/datasets``: Debian's ``dataset-fashion-mnist`` package),
5. a download from the official mirrors into the user cache (when ``download=True``).

``fashion_mnist_sample`` (4,000 training / 1,000 test images shipped inside the package, see
:mod:`lightning_curvature.data.packaged`) is found after the same folders in the package itself,
so it needs neither files nor network.

Checksums are compared on the *decompressed* IDX bytes, so a recompressed copy (Debian ships one)
is accepted and a corrupt one is not. Downloads go through an injectable ``downloader`` so tests
never touch the network.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lightning_curvature.checks import check_choice

from .idx import IDXFile, IDXFormatError, decompress, parse_idx, read_idx

__all__ = [
    "DATASETS",
    "ENV_VAR",
    "SYSTEM_DATA_DIRS",
    "DatasetNotFoundError",
    "check_values",
    "DatasetSpec",
    "Downloader",
    "FileSpec",
    "cache_root",
    "download_url",
    "load_split",
    "locate_file",
    "resolve_split",
    "search_dirs",
]

ENV_VAR = "LIGHTNING_CURVATURE_DATA"
#: System-wide dataset roots (searched after the user cache). A module attribute so tests can
#: replace it.
SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets", "/usr/local/share/datasets")

Downloader = Callable[[str, float], bytes]
"""``downloader(url, timeout_seconds) -> bytes``; raises ``OSError`` on failure."""


class DatasetNotFoundError(FileNotFoundError):
    """No local copy of a required file and no successful download (the message says where)."""


@dataclass(frozen=True)
class FileSpec:
    """One IDX file: its name (without ``.gz``), expected shape and decompressed-bytes checksums.

    ``sha256``/``md5`` may be ``None`` when no reliable published value exists; at least the
    structure (magic number, dims, size) is always checked.
    """

    name: str
    shape: tuple[int, ...]
    sha256: str | None = None
    md5: str | None = None

    def check(self, idx: IDXFile, *, verify_checksum: bool = True) -> None:
        """Raise :class:`IDXFormatError` if ``idx`` is not this file."""
        shape = tuple(idx.array.shape)
        if len(shape) != len(self.shape) or shape[1:] != self.shape[1:]:
            raise IDXFormatError(
                f"{idx.path}: shape {shape} does not match {self.name} (expected {self.shape})"
            )
        if not verify_checksum:
            return
        if shape != self.shape:
            raise IDXFormatError(
                f"{idx.path}: {shape[0]} items, the official {self.name} has {self.shape[0]} "
                "(pass verify_checksums=False to use a modified copy)"
            )
        for algo, want, got in (("sha256", self.sha256, idx.sha256), ("md5", self.md5, idx.md5)):
            if want is not None and want != got:
                raise IDXFormatError(
                    f"{idx.path}: {algo} of the decompressed bytes is {got}, expected {want} for "
                    f"{self.name}: the file is corrupt or not the official one (pass "
                    "verify_checksums=False to use a modified copy)"
                )


@dataclass(frozen=True)
class DatasetSpec:
    """An MNIST-family dataset: files per split, folder names, mirrors and normalization."""

    name: str
    folder_names: tuple[str, ...]
    splits: dict[str, tuple[FileSpec, FileSpec]]
    mirrors: tuple[str, ...]
    mean: float
    std: float
    classes: tuple[str, ...] = field(default=tuple(str(i) for i in range(10)))
    #: Folder inside this package that holds the files (searched last; the packaged sample).
    packaged: str | None = None

    @property
    def train_size(self) -> int:
        """Items of the official training split (what ``val_size`` is taken from)."""
        return self.splits["train"][0].shape[0]


def _pair(prefix: str, n: int, sums: dict[str, tuple[str | None, str | None]]):
    images = f"{prefix}-images-idx3-ubyte"
    labels = f"{prefix}-labels-idx1-ubyte"
    return (
        FileSpec(images, (n, 28, 28), *sums[images]),
        FileSpec(labels, (n,), *sums[labels]),
    )


# Checksums of the decompressed IDX files. Fashion-MNIST (all four) and the MNIST test split and
# train labels: sha256 computed here from verified copies whose md5 matches the published md5 of
# the decompressed files. MNIST train images: no local copy, so only the widely published md5 of
# the decompressed file (6bbc9ace..., the value used by many independent loaders).
_MNIST_SUMS = {
    "train-images-idx3-ubyte": (None, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "a25bea736e30d166cdddb491f175f624",
    ),
    "t10k-images-idx3-ubyte": (
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "2646ac647ad5339dbf082846283269ea",
    ),
    "t10k-labels-idx1-ubyte": (
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "27ae3e4e09519cfbb04c329615203637",
    ),
}
_FASHION_SUMS = {
    "train-images-idx3-ubyte": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    ),
    "train-labels-idx1-ubyte": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "9018921c3c673c538a1fc5bad174d6f9",
    ),
    "t10k-images-idx3-ubyte": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "8181f5470baa50b63fa0f6fddb340f0a",
    ),
    "t10k-labels-idx1-ubyte": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "15d484375f8d13e6eb1aabb0c3f46965",
    ),
}

# The packaged sample (lightning_curvature/data/sample/fashion-mnist, written by
# lightning_curvature.data.packaged from verified official files): sha256 / md5 of its
# decompressed IDX bytes.
_SAMPLE_SUMS = {
    "train-images-idx3-ubyte": (
        "09dd72e74aa8a76feaada262d167edcd489b57bc01d49240b1da1e0f2d395932",
        "32119f0b0500dcf7602681f033e64233",
    ),
    "train-labels-idx1-ubyte": (
        "bd16d103c66bdc7c4826aef758caccae538e9465d8c4fd0939db7bcb1891a702",
        "b560ebc41477e8c613b5ac302015c400",
    ),
    "t10k-images-idx3-ubyte": (
        "7a6d8e07ea021ec5bc73135ebd0a5770799557ec6f8242d8749c4f32a3cf4643",
        "8a1b719f9f0735f54c6f9ef07f01fe5c",
    ),
    "t10k-labels-idx1-ubyte": (
        "b40abac7ec8228f434940f579deb7cf7b6e3103b5274cb91d1545771f5ef1c8b",
        "e27076c4666f2f7b7b7ba19675567282",
    ),
}
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

# Normalization: mean and std of the 60k training pixels scaled to [0, 1]. MNIST's are the
# customary 0.1307 / 0.3081; Fashion-MNIST's were computed here from the training images.
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        folder_names=("mnist", "MNIST/raw", "MNIST"),
        splits={
            "train": _pair("train", 60000, _MNIST_SUMS),
            "test": _pair("t10k", 10000, _MNIST_SUMS),
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        mean=0.1307,
        std=0.3081,
    ),
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        folder_names=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
        splits={
            "train": _pair("train", 60000, _FASHION_SUMS),
            "test": _pair("t10k", 10000, _FASHION_SUMS),
        },
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        mean=0.2860,
        std=0.3530,
        classes=_FASHION_CLASSES,
    ),
    # Normalized with the full training set's statistics, so a model trained on the sample sees
    # inputs on the same scale as one trained on the full set.
    "fashion_mnist_sample": DatasetSpec(
        name="fashion_mnist_sample",
        folder_names=("fashion-mnist-sample",),
        splits={
            "train": _pair("train", 4000, _SAMPLE_SUMS),
            "test": _pair("t10k", 1000, _SAMPLE_SUMS),
        },
        mirrors=(),
        mean=0.2860,
        std=0.3530,
        classes=_FASHION_CLASSES,
        packaged="sample/fashion-mnist",
    ),
}


def cache_root() -> Path:
    """The user cache folder: ``$XDG_CACHE_HOME/lightning-curvature`` or ``~/.cache/...``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning-curvature"


def search_dirs(spec: DatasetSpec, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Every folder searched for ``spec``'s files, in lookup order (existing or not)."""
    roots: list[tuple[Path, bool]] = []  # (root, also accept files directly in it)
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), True))
    env = os.environ.get(ENV_VAR)
    if env:
        roots.append((Path(env).expanduser(), False))
    roots.append((cache_root(), False))
    roots.extend((Path(d), False) for d in SYSTEM_DATA_DIRS)
    dirs: list[Path] = []
    for root, direct in roots:
        if direct:
            dirs.append(root)
        dirs.extend(root / folder for folder in spec.folder_names)
    if spec.packaged is not None:
        dirs.append(Path(__file__).resolve().parent / spec.packaged)
    seen: set[Path] = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]


def locate_file(name: str, dirs: Sequence[Path]) -> Path | None:
    """First ``<dir>/<name>.gz`` or ``<dir>/<name>`` that exists, in order; else ``None``."""
    for d in dirs:
        for candidate in (d / f"{name}.gz", d / name):
            if candidate.is_file():
                return candidate
    return None


def download_url(url: str, timeout: float = 60.0) -> bytes:
    """Fetch ``url`` with :mod:`urllib` (the default downloader)."""
    request = urllib.request.Request(url, headers={"User-Agent": "lightning-curvature"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _download(
    spec: DatasetSpec, file: FileSpec, downloader: Downloader, timeout: float
) -> tuple[Path | None, list[str]]:
    """Download ``file`` from the first mirror that serves verified bytes, into the user cache."""
    errors: list[str] = []
    target_dir = cache_root() / spec.folder_names[0]
    for mirror in spec.mirrors:
        url = f"{mirror}{file.name}.gz"
        try:
            raw = downloader(url, timeout)
            data = decompress(raw, url)
            idx = IDXFile(
                parse_idx(data, url, ndim=len(file.shape)),
                hashlib.sha256(data).hexdigest(),
                hashlib.md5(data).hexdigest(),
                url,
            )
            file.check(idx, verify_checksum=True)
        except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as err:
            errors.append(f"{url}: {err}")
            continue
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / f"{file.name}.gz"
        # Write to a temporary name and rename, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=f".{file.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
        os.replace(tmp, target)
        return target, errors
    return None, errors


def _not_found_message(
    spec: DatasetSpec, missing: list[str], dirs: Sequence[Path], download: bool, errors: list[str]
) -> str:
    lines = [
        f"{spec.name}: cannot find {', '.join(missing)} (as .gz or raw IDX). Looked in, in order:",
        *(f"  - {d}" for d in dirs),
    ]
    if download and not spec.mirrors:
        lines.append(f"{spec.name} has no download mirrors (it ships with the package).")
    elif download:
        lines.append("Download from the official mirrors failed:")
        lines.extend(f"  - {e}" for e in errors) if errors else lines.append("  - (no attempt)")
    else:
        lines.append("Downloading is disabled (download=False).")
    lines += [
        "To provide the files offline, put the four IDX files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in",
        f"  <root>/{spec.folder_names[0]}/ and set {ENV_VAR}=<root>, or pass data_dir=<folder>,",
        f"  or copy them to {cache_root() / spec.folder_names[0]}/"
        + (
            " (Debian/Ubuntu: `apt install dataset-fashion-mnist` provides them)."
            if spec.name == "fashion_mnist"
            else "."
        ),
    ]
    return "\n".join(lines)


def resolve_split(
    spec: DatasetSpec,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    downloader: Downloader | None = None,
    timeout: float = 60.0,
) -> tuple[Path, Path]:
    """Paths of one split's ``(images, labels)`` files, downloading (verified) what is missing.

    Raises
    ------
    DatasetNotFoundError
        A required file is neither found locally nor downloadable; lists where it looked.
    """
    check_choice("split", split, sorted(spec.splits))
    dirs = search_dirs(spec, data_dir)
    files = spec.splits[split]
    paths: dict[str, Path] = {}
    errors: list[str] = []
    for f in files:
        path = locate_file(f.name, dirs)
        if path is None and download:
            path, errs = _download(spec, f, downloader or download_url, timeout)
            errors.extend(errs)
        if path is not None:
            paths[f.name] = path
    missing = [f.name for f in files if f.name not in paths]
    if missing:
        raise DatasetNotFoundError(_not_found_message(spec, missing, dirs, download, errors))
    return paths[files[0].name], paths[files[1].name]


def load_split(
    spec: DatasetSpec,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    verify_checksums: bool = True,
    downloader: Downloader | None = None,
    timeout: float = 60.0,
) -> tuple:
    """Load one split's ``(images uint8 [N,28,28], labels uint8 [N])`` arrays.

    Parameters
    ----------
    spec : DatasetSpec
        The dataset (``DATASETS["mnist"]`` or ``DATASETS["fashion_mnist"]``).
    split : {"train", "test"}
    data_dir : path, optional
        Searched first (the folder itself and its common sub-folders).
    download : bool
        Download missing files into the user cache (checksum verified) if not found locally.
    verify_checksums : bool
        Compare decompressed-bytes checksums and item counts of local files with the official ones.
        Downloads are always verified.
    downloader : callable, optional
        ``downloader(url, timeout) -> bytes``; defaults to :func:`download_url` (urllib).

    Raises
    ------
    DatasetNotFoundError
        A required file is neither found locally nor downloadable; lists where it looked.
    IDXFormatError
        A file is truncated, corrupt, of the wrong shape or fails its checksum (names the file).
    """
    paths = resolve_split(
        spec, split, data_dir=data_dir, download=download, downloader=downloader, timeout=timeout
    )
    arrays = []
    for f, path in zip(spec.splits[split], paths, strict=True):
        idx = read_idx(path, ndim=len(f.shape))
        f.check(idx, verify_checksum=verify_checksums)
        arrays.append(idx.array)
    images, labels = arrays
    check_values(images, labels, paths, len(spec.classes))
    return images, labels


def check_values(images, labels, paths: Sequence[os.PathLike[str] | str], num_classes: int):
    """Raise :class:`IDXFormatError` unless images and labels are usable together.

    Images: ``uint8`` (pixels 0-255), another integer type with values in [0, 255], or floats
    already scaled to [0, 1] (kept as they are by
    :func:`~lightning_curvature.data.tensors.pixels_to_unit`). Labels: an integer type with
    values in ``[0, num_classes - 1]``; as many as images. Matters for copies read with
    ``verify_checksums=False``, whose contents nothing else vouches for.
    """
    image_path, label_path = (str(p) for p in paths)
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{image_path} has {images.shape[0]} images but {label_path} has {labels.shape[0]} "
            "labels"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise IDXFormatError(
            f"{label_path}: labels must be integers, the file stores {labels.dtype}"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise IDXFormatError(f"{label_path}: label {bad} outside [0, {num_classes - 1}]")
    if not images.size:
        return
    lo, hi = float(images.min()), float(images.max())
    if np.issubdtype(images.dtype, np.floating):
        if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 <= lo and hi <= 1.0):
            raise IDXFormatError(
                f"{image_path}: float pixels must lie in [0, 1] (already scaled), found values "
                f"in [{lo:g}, {hi:g}]"
            )
    elif lo < 0 or hi > 255:
        raise IDXFormatError(
            f"{image_path}: integer pixels must lie in [0, 255], found values in [{lo:g}, {hi:g}]"
        )
