"""examples/vae_data.py, the data adapter of examples/vae.py: for each data set the image tensors
(shapes, dtype, value ranges), the likelihood and its unit, the provenance in ``info``, seeds
and binarization options. On the real files in ../shared/data where the project has them (a
test is skipped where its folder is absent), and on small files written here in the published
formats (MNIST IDX and .amat, Omniglot chardata.mat). The loaders themselves are tested in
tests/test_datasets_*.py."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import vae_data
from pyro_ffjord.datasets import mnist, omniglot
from pyro_ffjord.datasets.amat import write_amat
from pyro_ffjord.datasets.idx import write_idx

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def needs(folder: str):
    return pytest.mark.skipif(not (DATA / folder).is_dir(), reason=f"{DATA / folder} absent")


def _check(v: vae_data.VAEData, sizes, image_shape, likelihood):
    """Sizes, image shape, float32 images, likelihood, and an ``info`` that JSON takes as is."""
    assert [len(v.train), len(v.valid), len(v.test)] == list(sizes) == v.info["sizes"]
    for x in (v.train, v.valid, v.test):
        assert x.dtype == torch.float32 and x.shape[1:] == image_shape
    assert v.image_shape == image_shape and v.likelihood == likelihood
    assert all(vae_data.is_json_plain(value) for value in v.info.values())
    json.dumps(v.info)


def _same(a: vae_data.VAEData, b: vae_data.VAEData) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("train", "valid", "test"))


def _binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())  # cheaper than unique() on 39M pixels


# -- MNIST: the real IDX files --------------------------------------------------------------------
@pytest.fixture(scope="module")
def mnist_static():
    return vae_data.load("mnist", str(DATA / "mnist"))


@needs("mnist")
def test_mnist_static(mnist_static):
    v = mnist_static
    _check(v, (50000, 10000, 10000), (1, 28, 28), "bernoulli")
    assert all(_binary(x) and x.min() == 0 and x.max() == 1 for x in (v.train, v.valid, v.test))
    assert abs(v.train.mean().item() - 0.1307) < 0.002  # the mean intensity of MNIST
    assert v.info["source"] == "IDX files" and v.info["binarization"] == "static (seed 0)"
    assert v.info["seed"] == 0 and v.info["split"].startswith("50k/10k/10k")
    assert vae_data.unit_of(v.likelihood, v.image_shape) == {
        "unit": "nats", "unit_note": "nats per image", "nats_per_unit": 1.0}


@needs("mnist")
def test_mnist_dynamic_is_grey(mnist_static):
    v = vae_data.load("mnist", str(DATA / "mnist"), binarization="dynamic")
    _check(v, (50000, 10000, 10000), (1, 28, 28), "bernoulli")
    assert float(v.train.min()) == 0.0 and float(v.train.max()) == 1.0
    assert len(v.train[:100].unique()) > 2  # intensities: vae.py re-binarizes every batch
    assert v.info["binarization"] == "dynamic (re-drawn every batch)" and v.info["seed"] is None
    # the static bits are a draw from these intensities: never 1 where the intensity is 0
    assert not (mnist_static.test.bool() & (v.test == 0)).any()


# -- MNIST: small IDX and .amat files -----------------------------------------------------------
def _unzipped_sha256(path: Path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


@pytest.fixture
def small_mnist(tmp_path, monkeypatch):
    """The four IDX files with 12 training images (train 8 / valid 4) and 5 test images; the
    loader is told their dimensions and checksums (vae_data reads with verify=True)."""
    shapes = {mnist.TRAIN_IMAGES: (12, 28, 28), mnist.TRAIN_LABELS: (12,),
              mnist.TEST_IMAGES: (5, 28, 28), mnist.TEST_LABELS: (5,)}
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        high = 10 if len(shape) == 1 else 256
        write_idx(tmp_path / f"{name}.gz", rng.integers(0, high, shape, dtype=np.uint8))
    monkeypatch.setattr(mnist, "IDX_SHAPES", shapes)
    monkeypatch.setattr(mnist, "IDX_SHA256", {n: _unzipped_sha256(tmp_path / f"{n}.gz") for n in shapes})
    monkeypatch.setattr(mnist, "NUM_TRAIN", 8)
    return tmp_path


@pytest.mark.parametrize("binarization", ["static", "dynamic", "none"])
def test_mnist_is_the_loaders_data_reshaped(small_mnist, binarization):
    v = vae_data.load("mnist", str(small_mnist), seed=3, binarization=binarization)
    _check(v, (8, 4, 5), (1, 28, 28), "bernoulli")
    splits = mnist.load(small_mnist, binarization=binarization, seed=3)
    for k in ("train", "valid", "test"):
        assert torch.equal(getattr(v, k), getattr(splits, k).reshape(-1, 1, 28, 28))
    assert _binary(v.train) == (binarization == "static")
    assert v.info["seed"] == (3 if binarization == "static" else None)


def test_mnist_seeds(small_mnist):
    a = vae_data.load("mnist", str(small_mnist), seed=3)
    assert _same(a, vae_data.load("mnist", str(small_mnist), seed=3))
    assert not _same(a, vae_data.load("mnist", str(small_mnist), seed=4))
    assert _same(vae_data.load("mnist", str(small_mnist)), vae_data.load("mnist", str(small_mnist), seed=0))
    # the intensities do not depend on the seed
    assert _same(vae_data.load("mnist", str(small_mnist), seed=3, binarization="dynamic"),
                 vae_data.load("mnist", str(small_mnist), seed=4, binarization="dynamic"))


@pytest.mark.parametrize("binarization", ["static", "dynamic"])
def test_mnist_prefers_the_published_amat_files(tmp_path, monkeypatch, binarization):
    # the paper's data: where the .amat files are, they are read whatever binarization asks
    monkeypatch.setattr(mnist, "AMAT_SIZES", {"train": 6, "valid": 2, "test": 3})
    rng = np.random.default_rng(2)
    images = {s: (rng.random((n, 784)) < 0.3).astype(np.uint8) for s, n in mnist.AMAT_SIZES.items()}
    for split, x in images.items():
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", x)
    v = vae_data.load("mnist", str(tmp_path), seed=5, binarization=binarization)
    _check(v, (6, 2, 3), (1, 28, 28), "bernoulli")
    assert torch.equal(v.valid, torch.from_numpy(images["valid"]).float().reshape(-1, 1, 28, 28))
    assert v.info["source"] == "binarized_mnist_{train,valid,test}.amat"
    assert v.info["binarization"] == "published static" and v.info["seed"] is None


# -- Frey faces ---------------------------------------------------------------------------------
@needs("freyfaces")
def test_freyfaces_categorical_pixel_values():
    v = vae_data.load("freyfaces", str(DATA / "freyfaces"))
    _check(v, (1565, 200, 200), (1, 28, 20), "categorical")
    every = torch.cat([v.train, v.valid, v.test])
    assert torch.equal(every, every.round()) and (float(every.min()), float(every.max())) == (8.0, 238.0)
    assert v.info["seed"] == 123 and v.info["source"] == "freyfaces.pkl"
    assert v.info["sha256"].startswith("3b69410c") and "RandomState" in v.info["split"]
    unit = vae_data.unit_of(v.likelihood, v.image_shape)
    assert unit["unit"] == "bits/dim" and unit["nats_per_unit"] == pytest.approx(560 * math.log(2))


@needs("freyfaces")
def test_freyfaces_seeds():
    a = vae_data.load("freyfaces", str(DATA / "freyfaces"), seed=321)
    assert _same(a, vae_data.load("freyfaces", str(DATA / "freyfaces"), seed=321))
    b = vae_data.load("freyfaces", str(DATA / "freyfaces"))
    assert not _same(a, b) and a.info["seed"] == 321
    # a reshuffle of the same 1965 faces
    key = lambda v: sorted(map(tuple, torch.cat([v.train, v.valid, v.test]).reshape(1965, -1).tolist()))  # noqa: E731
    assert key(a) == key(b)


# -- Caltech 101 silhouettes ----------------------------------------------------------------------
@needs("caltech101_silhouettes")
def test_caltech_binary_silhouettes_and_seeds():
    v = vae_data.load("caltech", str(DATA / "caltech101_silhouettes"))
    _check(v, (4100, 2264, 2307), (1, 28, 28), "bernoulli")
    assert all(_binary(x) and x.min() == 0 and x.max() == 1 for x in (v.train, v.valid, v.test))
    assert v.info["source"] == "caltech101_silhouettes_28.mat" and v.info["split_kind"] == "random"
    assert "not, the paper's split1" in v.info["split"] and v.info["inverted"] is True
    assert v.info["seed"] == v.info["split_seed"] == 0
    assert vae_data.unit_of(v.likelihood, v.image_shape)["unit"] == "nats"
    again = vae_data.load("caltech", str(DATA / "caltech101_silhouettes"), seed=0)
    other = vae_data.load("caltech", str(DATA / "caltech101_silhouettes"), seed=1)
    assert _same(v, again) and not _same(v, other) and other.info["seed"] == 1


# -- Omniglot: a small chardata.mat -------------------------------------------------------------
@pytest.fixture
def small_omniglot(tmp_path, monkeypatch):
    """A chardata.mat of 1400 training and 20 test grey images (the loader keeps its
    published 1345 validation images, so the file must hold more)."""
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(0)
    data = rng.random((784, 1420)).astype(np.float32)
    scipy_io.savemat(str(tmp_path / "chardata.mat"), {"data": data[:, :1400], "testdata": data[:, 1400:]})
    monkeypatch.setattr(omniglot, "NUM_TRAIN_FILE", 1400)
    monkeypatch.setattr(omniglot, "NUM_TEST", 20)
    return tmp_path


def test_omniglot_grey_train_binary_valid_test(small_omniglot):
    v = vae_data.load("omniglot", str(small_omniglot))
    _check(v, (55, 1345, 20), (1, 28, 28), "bernoulli")
    assert not _binary(v.train) and 0.0 <= float(v.train.min()) and float(v.train.max()) <= 1.0
    assert _binary(v.valid) and _binary(v.test)
    assert v.info["source"] == "chardata.mat" and v.info["seed"] == 0
    assert v.info["split"].startswith("55/1345/20") and "once (seeded)" in v.info["binarization"]
    a = vae_data.load("omniglot", str(small_omniglot), seed=4)
    assert _same(a, vae_data.load("omniglot", str(small_omniglot), seed=4))
    assert not torch.equal(a.train, v.train) and torch.equal(a.test, v.test)  # test bits: not the shuffle's


def test_unknown_dataset_and_plain_values():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        vae_data.load("cifar10", "nowhere")
    assert set(vae_data.DATASETS) == {"mnist", "omniglot", "freyfaces", "caltech"}
    for value in ("a", 1, 2.5, True, None, [1, "a"], (0.5, False)):
        assert vae_data.is_json_plain(value)
    for value in ({"a": 1}, [None], [[1]], torch.tensor(1), Path("x")):
        assert not vae_data.is_json_plain(value)
