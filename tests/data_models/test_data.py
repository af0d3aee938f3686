"""IDX parsing, lookup order, offline errors, verified downloads and the data module."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_curvature.data import (
    DATASETS,
    DatasetNotFoundError,
    EpochShuffleSampler,
    IDXFormatError,
    MNISTDataModule,
    encode_idx,
    load_split,
    parse_idx,
    read_idx,
    search_dirs,
    sources,
)
from tests.data_models.idx_helpers import idx_bytes, make_split, spec_for, write_dataset

REAL_DATA = os.environ.get("LIGHTNING_CURVATURE_DATA")  # read before the autouse fixture clears it


# --------------------------------------------------------------------------------- IDX format
def test_parse_matches_independent_encoding_and_roundtrips():
    images, labels = make_split(7, seed=3)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images)), images)
    np.testing.assert_array_equal(parse_idx(idx_bytes(labels)), labels)
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5.5
    assert encode_idx(x) == idx_bytes(x)
    np.testing.assert_array_equal(parse_idx(encode_idx(x)), x)


def test_gz_and_raw_give_same_array_and_decompressed_digest(tmp_path):
    images, _ = make_split(5, seed=1)
    data = idx_bytes(images)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "a.gz").write_bytes(gzip.compress(data, compresslevel=1, mtime=0))
    (tmp_path / "b.gz").write_bytes(gzip.compress(data, compresslevel=9, mtime=123))
    files = [read_idx(tmp_path / n) for n in ("a", "a.gz", "b.gz")]
    for f in files:
        np.testing.assert_array_equal(f.array, images)
        assert f.sha256 == hashlib.sha256(data).hexdigest()
        assert f.md5 == hashlib.md5(data).hexdigest()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-10], "truncated"),
        (lambda d: d[:6], "truncated header"),
        (lambda d: d + b"\x00\x01", "trailing bytes"),
        (lambda d: b"\x12\x34" + d[2:], "bad magic"),
        (lambda d: d[:2] + b"\x07" + d[3:], "bad magic"),
        (lambda d: d[:3], "too short"),
    ],
)
@pytest.mark.parametrize("gz", [False, True])
def test_corrupt_files_raise_naming_file_and_problem(tmp_path, mutate, message, gz):
    images, _ = make_split(4, seed=0)
    data = mutate(idx_bytes(images))
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(IDXFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_truncated_gzip_stream_is_reported(tmp_path):
    images, _ = make_split(50, seed=0)
    blob = gzip.compress(idx_bytes(images))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IDXFormatError, match="gzip") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------- lookup order
def _labels_source(spec, **kwargs) -> int:
    """Which copy was loaded: the copies differ in their label offset."""
    _, labels = load_split(spec, "test", verify_checksums=False, download=False, **kwargs)
    return int(labels[0])


def test_lookup_order_data_dir_env_cache_system(isolated_lookup, monkeypatch):
    tmp = isolated_lookup
    spec = sources.DATASETS["fashion_mnist"]
    write_dataset(tmp / "mine", label_offset=1)  # data_dir itself
    write_dataset(tmp / "envroot" / "fashion_mnist", label_offset=2, gz=False)
    write_dataset(tmp / "xdg-cache" / "lightning-curvature" / "fashion-mnist", label_offset=3)
    write_dataset(tmp / "system" / "fashion-mnist", label_offset=4)
    monkeypatch.setenv(sources.ENV_VAR, str(tmp / "envroot"))

    assert _labels_source(spec, data_dir=tmp / "mine") == 1
    assert _labels_source(spec) == 2  # env var (raw files, folder name fashion_mnist)
    monkeypatch.delenv(sources.ENV_VAR)
    assert _labels_source(spec) == 3  # user cache honors XDG_CACHE_HOME
    for f in (tmp / "xdg-cache" / "lightning-curvature" / "fashion-mnist").iterdir():
        f.unlink()
    assert _labels_source(spec) == 4  # system folder (Debian's /usr/share/datasets/fashion-mnist)
    # data_dir may also be a root holding a dataset folder
    assert _labels_source(spec, data_dir=tmp / "system") == 4


@pytest.mark.parametrize(
    ("dataset", "folder"),
    [("fashion_mnist", "FashionMNIST/raw"), ("fashion_mnist", "fashion-mnist"),
     ("mnist", "MNIST/raw"), ("mnist", "mnist")],
)  # fmt: skip
def test_common_folder_names_are_accepted(isolated_lookup, monkeypatch, dataset, folder):
    write_dataset(isolated_lookup / "root" / folder, label_offset=5)
    monkeypatch.setenv(sources.ENV_VAR, str(isolated_lookup / "root"))
    assert _labels_source(sources.DATASETS[dataset]) == 5


def test_search_dirs_order(isolated_lookup, monkeypatch):
    monkeypatch.setenv(sources.ENV_VAR, "/env")
    dirs = [str(d) for d in search_dirs(DATASETS["mnist"], "/given")]
    assert dirs[0] == "/given"
    first = {key: next(i for i, d in enumerate(dirs) if d.startswith(key))
             for key in ("/given", "/env", str(isolated_lookup / "xdg-cache"),
                         str(isolated_lookup / "system"))}  # fmt: skip
    assert list(first.values()) == sorted(first.values())


def test_offline_without_files_gives_one_clear_error(isolated_lookup):
    with pytest.raises(DatasetNotFoundError) as info:
        load_split(DATASETS["fashion_mnist"], "train", download=False, data_dir="/nowhere")
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert "/nowhere" in msg
    assert str(isolated_lookup / "xdg-cache" / "lightning-curvature") in msg
    assert str(isolated_lookup / "system" / "fashion-mnist") in msg
    assert sources.ENV_VAR in msg and "download=False" in msg


def test_offline_with_download_lists_failed_mirrors(isolated_lookup):
    tried = []

    def offline(url, timeout):
        tried.append((url, timeout))
        raise OSError("network unreachable")

    with pytest.raises(DatasetNotFoundError) as info:
        load_split(DATASETS["mnist"], "test", downloader=offline, timeout=5)
    assert len(tried) == 2 * len(DATASETS["mnist"].mirrors)  # both files, every mirror
    assert all(t == 5 for _, t in tried)
    for url, _ in tried:
        assert url in str(info.value)
    assert "network unreachable" in str(info.value)


def test_partial_local_copy_does_not_hide_missing_file(isolated_lookup):
    folder = isolated_lookup / "d"
    write_dataset(folder)
    (folder / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte"):
        load_split(DATASETS["mnist"], "train", data_dir=folder, download=False)
    # the test split is complete and loads
    images, labels = load_split(
        DATASETS["mnist"], "test", data_dir=folder, download=False, verify_checksums=False
    )
    assert images.shape == (40, 28, 28) and labels.shape == (40,)


# ---------------------------------------------------------------------------------- checksums
def test_checksums_are_checked_on_decompressed_bytes(isolated_lookup):
    folder = isolated_lookup / "d"
    files = write_dataset(folder, n_train=30, n_test=20)
    spec = spec_for(files, 30, 20)
    # recompress one file differently: the .gz bytes change, the IDX bytes do not
    name = "t10k-images-idx3-ubyte"
    (folder / f"{name}.gz").write_bytes(gzip.compress(files[name], compresslevel=1, mtime=999))
    images, _ = load_split(spec, "test", data_dir=folder, download=False)
    np.testing.assert_array_equal(images, parse_idx(files[name]))
    # one flipped pixel: structurally valid, checksum fails, file named
    bad = bytearray(files[name])
    bad[-1] ^= 0xFF
    (folder / f"{name}.gz").write_bytes(gzip.compress(bytes(bad)))
    with pytest.raises(IDXFormatError, match="sha256") as info:
        load_split(spec, "test", data_dir=folder, download=False)
    assert str(folder / f"{name}.gz") in str(info.value)
    # ... unless the user opts out
    load_split(spec, "test", data_dir=folder, download=False, verify_checksums=False)


def test_wrong_item_count_and_label_mismatch(isolated_lookup):
    folder = isolated_lookup / "d"
    write_dataset(folder, n_train=30, n_test=20)
    with pytest.raises(IDXFormatError, match="items"):
        load_split(DATASETS["mnist"], "test", data_dir=folder, download=False)
    _, labels = make_split(19, seed=0)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(IDXFormatError, match="20 images but .* 19 labels"):
        load_split(
            DATASETS["mnist"], "test", data_dir=folder, download=False, verify_checksums=False
        )


def test_official_checksum_table_matches_published_md5():
    # md5 of the decompressed files as published by the dataset authors / torchvision.
    mnist = {f.name: f.md5 for pair in DATASETS["mnist"].splits.values() for f in pair}
    assert mnist["train-images-idx3-ubyte"] == "6bbc9ace898e44ae57da46a324031adb"
    assert mnist["t10k-labels-idx1-ubyte"] == "27ae3e4e09519cfbb04c329615203637"
    fashion = {f.name: f.md5 for pair in DATASETS["fashion_mnist"].splits.values() for f in pair}
    assert fashion["train-images-idx3-ubyte"] == "f4a8712d7a061bf5bd6d2ca38dc4d50a"


# ---------------------------------------------------------------------------------- downloads
def test_download_verifies_falls_back_and_caches(isolated_lookup):
    files = {}
    write_dataset(isolated_lookup / "origin", n_train=30, n_test=20)
    for p in (isolated_lookup / "origin").iterdir():
        files[p.name.removesuffix(".gz")] = gzip.decompress(p.read_bytes())
    spec = spec_for(files, 30, 20, mirrors=("https://bad/", "https://good/"))
    calls = []

    def fake(url, timeout):
        calls.append(url)
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        if url.startswith("https://bad/"):
            return gzip.compress(files[name][:-1] + b"\x00")  # corrupt copy: checksum fails
        return gzip.compress(files[name], mtime=0)

    images, labels = load_split(spec, "test", downloader=fake)
    np.testing.assert_array_equal(images, parse_idx(files["t10k-images-idx3-ubyte"]))
    assert calls == [
        "https://bad/t10k-images-idx3-ubyte.gz", "https://good/t10k-images-idx3-ubyte.gz",
        "https://bad/t10k-labels-idx1-ubyte.gz", "https://good/t10k-labels-idx1-ubyte.gz",
    ]  # fmt: skip
    cached = isolated_lookup / "xdg-cache" / "lightning-curvature" / "synthetic"
    assert sorted(p.name for p in cached.iterdir()) == [
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
    ]  # fmt: skip
    calls.clear()
    load_split(spec, "test", downloader=fake)  # second time: from the cache
    assert calls == []


def test_download_with_only_bad_mirrors_fails_without_caching(isolated_lookup):
    files = write_dataset(isolated_lookup / "origin", n_train=30, n_test=20)
    spec = spec_for(files, 30, 20)

    def corrupt(url, timeout):
        return gzip.compress(b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + b"ab")

    with pytest.raises(DatasetNotFoundError, match="truncated"):
        load_split(spec, "test", downloader=corrupt)
    assert not (isolated_lookup / "xdg-cache" / "lightning-curvature" / "synthetic").exists()


# ------------------------------------------------------------------------------- data module
def test_datamodule_split_normalization_and_loaders(isolated_lookup):
    folder = isolated_lookup / "d"
    write_dataset(folder, n_train=120, n_test=40)
    kwargs = dict(data_dir=str(folder), val_size=20, batch_size=16, download=False,
                  verify_checksums=False, seed=7)  # fmt: skip
    dm = MNISTDataModule("fashion_mnist", train_subset=50, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    x, y = dm.train_tensors
    xv, yv = dm.val_tensors
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert xv.shape == (20, 1, 28, 28)
    # normalization is (p/255 - mean)/std with the stated Fashion-MNIST constants
    raw_images, raw_labels = make_split(120, seed=0)
    pixels = torch.round((x * 0.3530 + 0.2860) * 255).to(torch.uint8).squeeze(1).numpy()
    rows = {raw_images[i].tobytes(): i for i in range(120)}
    train_ids = [rows[p.tobytes()] for p in pixels]
    val_ids = [rows[p.tobytes()] for p in torch.round((xv * 0.3530 + 0.2860) * 255)
               .to(torch.uint8).squeeze(1).numpy()]  # fmt: skip
    assert len(set(train_ids) | set(val_ids)) == 70  # disjoint
    assert [int(v) for v in y] == [int(raw_labels[i]) for i in train_ids]
    # same seed, same split; other seed, other split
    dm2 = MNISTDataModule("fashion_mnist", train_subset=50, **kwargs)
    dm2.setup("fit")
    assert torch.equal(dm2.train_tensors[0], x)
    dm3 = MNISTDataModule("fashion_mnist", train_subset=50, **{**kwargs, "seed": 8})
    dm3.setup("fit")
    assert not torch.equal(dm3.val_tensors[0], xv)
    # full training part when train_subset is None
    dm4 = MNISTDataModule("fashion_mnist", **kwargs)
    dm4.setup("fit")
    assert dm4.train_tensors[0].shape[0] == 100
    # loaders: whole batches by tensor indexing, every sample once per epoch
    loader = dm.train_dataloader()
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 2]
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == sorted(y.tolist())
    assert len(list(dm.val_dataloader())) == 2


def test_datamodule_test_stage_needs_only_test_files(isolated_lookup):
    folder = isolated_lookup / "d"
    write_dataset(folder)
    for p in folder.glob("train-*"):
        p.unlink()
    dm = MNISTDataModule("mnist", data_dir=str(folder), download=False, verify_checksums=False,
                         test_subset=30)  # fmt: skip
    dm.setup("test")
    assert dm.test_tensors[0].shape == (30, 1, 28, 28)
    with pytest.raises(DatasetNotFoundError, match="train-images"):
        dm.setup("fit")


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = EpochShuffleSampler(50, seed=1), EpochShuffleSampler(50, seed=1)
    a.set_epoch(3)
    list(b)  # consuming other epochs first changes nothing
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert sorted(a) == list(range(50))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"dataset": "cifar"}, "dataset"), ({"batch_size": 0}, "batch_size"),
     ({"val_size": 60000}, "val_size"), ({"train_subset": 0}, "train_subset"),
     ({"val_size": 10000, "train_subset": 50001}, "train_subset"),
     ({"num_workers": -1}, "num_workers"), ({"test_subset": 0}, "test_subset")],
)  # fmt: skip
def test_datamodule_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MNISTDataModule(**kwargs)


# ------------------------------------------------------------------------------ real datasets
@pytest.mark.skipif(REAL_DATA is None, reason="LIGHTNING_CURVATURE_DATA not set")
@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_official_test_split_verifies_offline(dataset):
    if not (Path(REAL_DATA) / ("mnist" if dataset == "mnist" else "fashion-mnist")).is_dir():
        pytest.skip("dataset folder missing")
    dm = MNISTDataModule(dataset, data_dir=REAL_DATA, download=False)
    dm.setup("test")
    x, y = dm.test_tensors
    assert x.shape == (10000, 1, 28, 28)
    assert torch.bincount(y).tolist() == (
        [1000] * 10 if dataset == "fashion_mnist"
        else [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )  # fmt: skip


def test_interrupted_transfer_falls_back_to_next_mirror(isolated_lookup):
    import http.client

    files = write_dataset(isolated_lookup / "origin", n_train=30, n_test=20)
    spec = spec_for(files, 30, 20, mirrors=("https://flaky/", "https://good/"))

    def flaky(url, timeout):
        if url.startswith("https://flaky/"):
            raise http.client.IncompleteRead(b"partial")
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        return gzip.compress(files[name])

    images, _ = load_split(spec, "test", downloader=flaky)
    assert images.shape == (20, 28, 28)


# ------------------------------------------------------------------ edge cases of modified copies
def _write(folder: Path, name: str, array: np.ndarray) -> Path:
    path = folder / f"{name}.gz"
    path.write_bytes(gzip.compress(idx_bytes(array), mtime=0))
    return path


def test_float_images_in_unit_interval_are_not_rescaled(isolated_lookup):
    folder = isolated_lookup / "d"
    write_dataset(folder, n_train=30, n_test=20)
    raw, _ = make_split(20, seed=1)  # the test split's images as written by write_dataset
    unit = (raw.astype(np.float32) / 255.0).astype(np.float32)
    _write(folder, "t10k-images-idx3-ubyte", unit)
    dm = MNISTDataModule("fashion_mnist", data_dir=str(folder), val_size=10, download=False,
                         verify_checksums=False)  # fmt: skip
    dm.setup("test")
    x, _ = dm.test_tensors
    # reference: the documented formula on the uint8 pixels, computed here
    expected = (torch.from_numpy(raw).double() / 255.0 - 0.2860) / 0.3530
    torch.testing.assert_close(x.squeeze(1).double(), expected, rtol=0, atol=1e-5)


def test_float_images_outside_unit_interval_are_refused(isolated_lookup):
    folder = isolated_lookup / "d"
    write_dataset(folder, n_train=30, n_test=20)
    raw, _ = make_split(20, seed=1)
    path = _write(folder, "t10k-images-idx3-ubyte", raw.astype(np.float32))  # 0..255 floats
    with pytest.raises(IDXFormatError, match=r"\[0, 1\]") as info:
        load_split(DATASETS["fashion_mnist"], "test", data_dir=folder, download=False,
                   verify_checksums=False)  # fmt: skip
    assert str(path) in str(info.value)


def test_negative_labels_are_refused(isolated_lookup):
    folder = isolated_lookup / "d"
    write_dataset(folder, n_train=30, n_test=20)
    labels = (np.arange(20) % 10).astype(np.int32)
    labels[3] = -1
    path = _write(folder, "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(IDXFormatError, match=r"label -1 outside \[0, 9\]") as info:
        load_split(DATASETS["fashion_mnist"], "test", data_dir=folder, download=False,
                   verify_checksums=False)  # fmt: skip
    assert str(path) in str(info.value)


def test_wrong_magic_number_names_expected_dimensions(isolated_lookup):
    folder = isolated_lookup / "d"
    write_dataset(folder, n_train=30, n_test=20)
    labels = (np.arange(20) % 10).astype(np.uint8)
    data = bytearray(idx_bytes(labels))
    data[3] = 7  # magic 0x00000807: "7 dimensions"; the bytes after it are labels, not sizes
    path = folder / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(bytes(data), mtime=0))
    with pytest.raises(IDXFormatError, match="expected 1 dimension, header says 7") as info:
        load_split(DATASETS["fashion_mnist"], "test", data_dir=folder, download=False,
                   verify_checksums=False)  # fmt: skip
    assert str(path) in str(info.value)
    assert "truncated" not in str(info.value)
    # images read as labels: 3 dimensions where 1 is expected
    with pytest.raises(IDXFormatError, match="expected 1 dimension, header says 3"):
        read_idx(folder / "t10k-images-idx3-ubyte.gz", ndim=1)


# ------------------------------------------------------------------------ the packaged sample
def test_packaged_sample_is_real_fashion_mnist_and_loads_offline(isolated_lookup):
    from lightning_curvature.data import load_tensors, sample_dir

    folder = sample_dir()
    assert (folder / "LICENSE").read_text().count("Zalando SE") == 1
    assert sum(p.stat().st_size for p in folder.glob("*.gz")) < 3_000_000
    spec = DATASETS["fashion_mnist_sample"]
    images, labels = load_split(spec, "train", download=False)  # nothing else on the path
    assert images.shape == (4000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).min() > 300  # all ten classes, roughly balanced
    x, y = load_tensors("fashion_mnist_sample", "test", 100)
    assert x.shape == (100, 1, 28, 28) and y.dtype == torch.int64
    if REAL_DATA and (Path(REAL_DATA) / "fashion-mnist").is_dir():
        # the first items of the official files, bit for bit
        full = read_idx(Path(REAL_DATA) / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").array
        np.testing.assert_array_equal(
            load_split(spec, "test", download=False)[0], full[:1000]
        )
    dm = MNISTDataModule("fashion_mnist_sample", val_size=1000, batch_size=500)
    dm.setup("fit")
    assert dm.train_tensors[0].shape[0] == 3000 and dm.val_tensors[0].shape[0] == 1000
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule("fashion_mnist_sample", val_size=4000)


# ---------------------------------------------------------------- importable without Lightning
_BLOCK_LIGHTNING = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric"):
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, Block())
from lightning_curvature.data import load_tensors, read_idx, DATASETS
from lightning_curvature.models import MLP, LeNet5
x, y = load_tensors("fashion_mnist_sample", "test", 8)
assert MLP(hidden_sizes=[4])(x).shape == (8, 10)
assert LeNet5()(x).shape == (8, 10)
try:
    from lightning_curvature.models import ImageClassifier
except ImportError as err:
    assert "blocked" in str(err), err
else:
    raise AssertionError("the blocker did not block Lightning")
print("ok")
"""


def test_data_and_networks_import_without_lightning():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("LIGHTNING_CURVATURE_DATA", None)
    result = subprocess.run([sys.executable, "-c", _BLOCK_LIGHTNING], capture_output=True,
                            text=True, cwd=root, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
