"""pyro_ffjord.datasets.mnist: the real IDX files, synthetic IDX (gzip and raw) and .amat files,
bad and missing files. The IDX and .amat readers alone: test_datasets_idx.py, test_datasets_amat.py."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_ffjord.datasets import binarize, mnist
from pyro_ffjord.datasets.amat import write_amat
from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing
from pyro_ffjord.datasets.idx import read_idx, write_idx

REAL = Path(__file__).parents[2] / "shared/data/mnist"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} absent")


# -- the real files -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real():
    return mnist.load(REAL)


@needs_real
def test_real_shapes_dtypes_and_splits(real):
    assert real.train.shape == (50000, 784)
    assert real.valid.shape == (10000, 784)
    assert real.test.shape == (10000, 784)
    for x in (real.train, real.valid, real.test):
        assert x.dtype == torch.float32
        assert set(x.unique().tolist()) == {0.0, 1.0}
    for y, n in ((real.train_labels, 50000), (real.valid_labels, 10000), (real.test_labels, 10000)):
        assert y.dtype == torch.int64 and y.shape == (n,)
        assert set(y.unique().tolist()) == set(range(10))
    # Published label order: the training file starts 5 0 4 1 9, t10k starts 7 2 1 0 4.
    assert real.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert real.test_labels[:5].tolist() == [7, 2, 1, 0, 4]
    # valid is the last 10k of the training file
    labels = mnist.read_mnist_idx(REAL, mnist.TRAIN_LABELS)
    assert real.valid_labels.tolist() == labels[50000:].tolist()
    # binarized mean ~ mean intensity of MNIST (0.1307)
    assert abs(real.train.mean().item() - 0.1307) < 0.002
    assert real.binarization == "static" and real.seed == 0


@needs_real
def test_real_checksums_match_the_documented_sums():
    for name in (mnist.TRAIN_IMAGES, mnist.TEST_IMAGES):
        data = gzip.decompress((REAL / f"{name}.gz").read_bytes())
        assert hashlib.sha256(data).hexdigest() == mnist.IDX_SHA256[name]
    sums = (REAL.parent / "README.md").read_text()
    assert mnist.IDX_SHA256[mnist.TRAIN_IMAGES] in sums
    assert mnist.IDX_SHA256[mnist.TEST_IMAGES] in sums


@needs_real
def test_real_static_binarization_is_seeded(real):
    images = mnist.read_mnist_idx(REAL, mnist.TEST_IMAGES)[:500].reshape(500, -1)
    a = binarize.static(images, seed=0, scale=255.0)
    assert np.array_equal(a, binarize.static(images, seed=0, scale=255.0, chunk=7))
    assert not np.array_equal(a, binarize.static(images, seed=1, scale=255.0))
    # the loader's test split is the same draw (seed + 1 for the test file), whatever the chunk
    full = mnist.read_mnist_idx(REAL, mnist.TEST_IMAGES).reshape(10000, -1)
    assert torch.equal(real.test, torch.from_numpy(binarize.static(full, 1, scale=255.0)).float())
    # pixels of intensity 0 stay 0, 255 become 1
    assert (a[images == 0] == 0).all() and (a[images == 255] == 1).all()


@needs_real
def test_real_grey_and_dynamic():
    grey = mnist.load(REAL, binarization="dynamic", verify=False)
    assert grey.binarization == "dynamic" and grey.seed is None
    assert grey.train.min() == 0.0 and grey.train.max() == 1.0
    batch = grey.train[:100]
    g = torch.Generator().manual_seed(0)
    b1, b2 = binarize.dynamic(batch, g), binarize.dynamic(batch, g)
    assert set(b1.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(b1, b2)  # a fresh draw per batch
    assert abs(b1.mean().item() - batch.mean().item()) < 0.01


# -- synthetic IDX files ------------------------------------------------------------------------
# Small stand-ins with the published layout: 12 training images (train 8 / valid 4), 5 test.
SMALL = {
    mnist.TRAIN_IMAGES: (12, 28, 28),
    mnist.TRAIN_LABELS: (12,),
    mnist.TEST_IMAGES: (5, 28, 28),
    mnist.TEST_LABELS: (5,),
}


@pytest.fixture
def small_layout(monkeypatch):
    """Make the loader expect the small synthetic files' dimensions and a 8/4 split."""
    monkeypatch.setattr(mnist, "IDX_SHAPES", dict(SMALL))
    monkeypatch.setattr(mnist, "NUM_TRAIN", 8)


def _write_small_mnist(directory: Path, compress: bool) -> dict:
    """Four IDX files with the small layout (random content), gz or raw."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, shape in SMALL.items():
        high = 10 if len(shape) == 1 else 256
        arrays[name] = rng.integers(0, high, size=shape, dtype=np.uint8)
        write_idx(directory / (name + (".gz" if compress else "")), arrays[name])
    return arrays


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_synthetic_idx_round_trip(tmp_path, compress, small_layout):
    arrays = _write_small_mnist(tmp_path, compress)
    data = mnist.load(tmp_path, binarization="none", verify=False)
    images = arrays[mnist.TRAIN_IMAGES].reshape(12, -1)
    assert torch.equal(data.train, torch.from_numpy(images[:8]).float() / 255)
    assert torch.equal(data.valid, torch.from_numpy(images[8:]).float() / 255)
    assert torch.equal(data.test_labels, torch.from_numpy(arrays[mnist.TEST_LABELS]).long())
    assert data.train.shape == (8, 784) and data.test.shape == (5, 784)
    # static binarization of the synthetic files: seeded, 0/1, and the same for the same seed
    b1 = mnist.load(tmp_path, seed=3, verify=False)
    b2 = mnist.load(tmp_path, seed=3, verify=False)
    b3 = mnist.load(tmp_path, seed=4, verify=False)
    assert torch.equal(b1.train, b2.train) and torch.equal(b1.test, b2.test)
    assert not torch.equal(b1.train, b3.train)
    assert set(b1.train.unique().tolist()) == {0.0, 1.0}
    # the real checksums do not match random content
    with pytest.raises(DatasetFileError, match="sha256"):
        mnist.load(tmp_path)


# -- corrupt and missing files ------------------------------------------------------------------
def _corrupt_copy(tmp_path: Path, name: str, mutate) -> Path:
    arrays = _write_small_mnist(tmp_path, compress=True)
    header = bytes([0, 0, 8, arrays[name].ndim]) + np.asarray(arrays[name].shape, ">u4").tobytes()
    payload = mutate(header + arrays[name].tobytes())
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(payload))
    return tmp_path / f"{name}.gz"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x08\x03\x00\x00" + b[4:], "magic number"),
        (lambda b: b"\x00\x00\x07\x03" + b[4:], "magic number"),
        (lambda b: b[:-100], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:10], "truncated IDX header"),
        (lambda b: b[:4] + np.uint32(11).byteswap().tobytes() + b[8:], "dimensions"),
    ],
    ids=["bad-magic", "unknown-type", "truncated", "trailing", "short-header", "dims"],
)
def test_corrupt_idx_is_named(tmp_path, mutate, message, small_layout):
    path = _corrupt_copy(tmp_path, mnist.TRAIN_IMAGES, mutate)
    with pytest.raises(DatasetFileError, match=message) as info:
        mnist.load(tmp_path, verify=False)
    text = str(info.value)
    assert str(path) in text and "yann.lecun.com/exdb/mnist" in text


def test_wrong_checksum_is_named(tmp_path):
    # the real training labels with one label changed: header and dims fine, checksum wrong
    if not REAL.is_dir():
        pytest.skip(f"{REAL} absent")
    data = bytearray(gzip.decompress((REAL / f"{mnist.TRAIN_LABELS}.gz").read_bytes()))
    data[100] = (data[100] + 1) % 10
    (tmp_path / mnist.TRAIN_LABELS).write_bytes(bytes(data))
    with pytest.raises(DatasetFileError, match="sha256") as info:
        mnist.read_mnist_idx(tmp_path, mnist.TRAIN_LABELS)
    assert mnist.TRAIN_LABELS in str(info.value) and "yann.lecun.com" in str(info.value)
    assert mnist.read_mnist_idx(tmp_path, mnist.TRAIN_LABELS, verify=False)[100] == data[100]


def test_bad_gzip_and_bad_labels(tmp_path, small_layout):
    _write_small_mnist(tmp_path, compress=True)
    good = (tmp_path / f"{mnist.TEST_IMAGES}.gz").read_bytes()
    (tmp_path / f"{mnist.TEST_IMAGES}.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetFileError, match="gzip") as info:
        mnist.load(tmp_path, verify=False)
    assert f"{mnist.TEST_IMAGES}.gz" in str(info.value)
    labels = np.full(5, 12, dtype=np.uint8)
    write_idx(tmp_path / f"{mnist.TEST_LABELS}.gz", labels)
    with pytest.raises(DatasetFileError, match="outside 0..9"):
        mnist.read_mnist_idx(tmp_path, mnist.TEST_LABELS, verify=False)


def test_missing_file_is_named(tmp_path, small_layout):
    _write_small_mnist(tmp_path, compress=False)
    (tmp_path / mnist.TEST_LABELS).unlink()
    with pytest.raises(DatasetFileMissing) as info:
        mnist.load(tmp_path, verify=False)
    assert isinstance(info.value, FileNotFoundError)
    text = str(info.value)
    assert f"{mnist.TEST_LABELS}.gz" in text and str(tmp_path) in text
    assert "http://yann.lecun.com/exdb/mnist/" in text
    with pytest.raises(FileNotFoundError, match="yann.lecun.com"):
        read_idx(tmp_path / "nothing.gz", mnist.idx_published("nothing.gz"))
    with pytest.raises(ValueError, match="binarization"):
        mnist.load(tmp_path, binarization="otsu")
    with pytest.raises(ValueError, match="unknown MNIST file"):
        mnist.read_mnist_idx(tmp_path, "nothing")


# -- .amat files (the format itself: test_datasets_amat.py) ----------------------------------------
def test_amat_loader_insists_on_published_sizes(tmp_path):
    for split, n in (("train", 5), ("valid", 3), ("test", 4)):
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", np.eye(n, 784, dtype=np.uint8))
    assert mnist.amat_available(tmp_path)
    with pytest.raises(DatasetFileError, match="5 images, expected 50000") as info:
        mnist.load(tmp_path, binarization="amat")
    assert "binarized_mnist_train.amat" in str(info.value) and "larocheh" in str(info.value)


def test_amat_loader_full_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "AMAT_SIZES", {"train": 6, "valid": 2, "test": 2})
    for split, n in mnist.AMAT_SIZES.items():
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", np.eye(n, 784, dtype=np.uint8))
    data = mnist.load(tmp_path, binarization="amat", seed=5)
    assert data.train.shape == (6, 784) and data.valid.shape == (2, 784) and data.test.shape == (2, 784)
    assert data.train.dtype == torch.float32 and data.train_labels is None
    assert data.binarization == "amat" and data.seed is None
    assert torch.equal(data.valid, torch.eye(2, 784))
    # a gzip-compressed file is found under its .gz name
    plain = tmp_path / "binarized_mnist_test.amat"
    (tmp_path / "binarized_mnist_test.amat.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    assert mnist.amat_available(tmp_path)
    assert torch.equal(mnist.load(tmp_path, binarization="amat").test, data.test)


def test_amat_missing(tmp_path):
    assert not mnist.amat_available(tmp_path)
    with pytest.raises(DatasetFileMissing, match="binarized_mnist_train.amat") as info:
        mnist.load(tmp_path, binarization="amat")
    assert isinstance(info.value, FileNotFoundError)
    assert "larocheh/public/datasets/binarized_mnist" in str(info.value)
