"""pyro_ffjord.datasets.omniglot: chardata.mat files written here in the IWAE layout (the
project has no copy of the published file): layout, splits, binarization, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_ffjord.datasets import binarize, omniglot
from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing

scipy_io = pytest.importorskip("scipy.io")


# -- Omniglot (chardata.mat) --------------------------------------------------------------------
def _chardata(path, n_train=40, n_test=20, seed=0):
    """A chardata.mat in the IWAE layout: data (784, N) column-major images, one-hot targets."""
    rng = np.random.default_rng(seed)
    imgs = rng.random((n_train + n_test, 28, 28))
    imgs[:, :5, :] = 0.0  # blank top rows: tells the orientation
    cols = imgs.reshape(len(imgs), 784, order="F").T
    target = np.eye(50)[:, rng.integers(0, 50, len(imgs))]
    scipy_io.savemat(str(path), {"data": cols[:, :n_train], "testdata": cols[:, n_train:],
                                 "target": target[:, :n_train], "testtarget": target[:, n_train:]})
    return imgs, target.argmax(0)


def test_omniglot_reader_layout(tmp_path):
    imgs, alphabets = _chardata(tmp_path / "chardata.mat")
    train, test, train_a, test_a = omniglot.read_chardata(tmp_path / "chardata.mat", strict_sizes=False)
    # the IWAE convention: data.T.reshape((-1, 28, 28), order="F")
    assert np.allclose(train.reshape(-1, 28, 28), imgs[:40]) and np.allclose(test.reshape(-1, 28, 28), imgs[40:])
    assert np.array_equal(train_a, alphabets[:40]) and np.array_equal(test_a, alphabets[40:])
    with pytest.raises(DatasetFileError, match=r"data has shape \(784, 40\), expected \(784, 24345\)"):
        omniglot.read_chardata(tmp_path / "chardata.mat")


def test_omniglot_splits_and_binarization(tmp_path):
    imgs, alphabets = _chardata(tmp_path / "chardata.mat")
    o = omniglot.load(tmp_path, num_valid=10, strict_sizes=False)
    assert (o.train.shape, o.valid.shape, o.test.shape) == ((30, 784), (10, 784), (20, 784))
    assert not set(o.train.unique().tolist()) <= {0.0, 1.0}  # grey: binarized per batch
    for x in (o.valid, o.test):
        assert set(x.unique().tolist()) <= {0.0, 1.0} and x.reshape(-1, 28, 28)[:, :5].sum() == 0
    # validation = the last 10 of the shuffled training file; alphabets follow the images
    order = np.random.RandomState(0).permutation(40)
    assert np.allclose(o.train.reshape(-1, 28, 28).numpy(), imgs[order[:30]])
    assert torch.equal(o.valid_alphabets, torch.from_numpy(alphabets[order[30:]]))
    # seeded: same arguments, same bits; the test bits do not depend on the shuffle seed
    again = omniglot.load(tmp_path, num_valid=10, strict_sizes=False)
    assert torch.equal(again.valid, o.valid) and torch.equal(again.test, o.test)
    other = omniglot.load(tmp_path, seed=5, num_valid=10, strict_sizes=False)
    assert torch.equal(other.test, o.test) and not torch.equal(other.train, o.train)
    assert not torch.equal(omniglot.load(tmp_path, binarize_seed=1, num_valid=10, strict_sizes=False).test, o.test)
    plain = omniglot.load(tmp_path, shuffle=False, num_valid=10, strict_sizes=False)
    assert np.allclose(plain.train.reshape(-1, 28, 28).numpy(), imgs[:30]) and plain.seed is None
    # dynamic binarization: Bernoulli(grey), seeded by a generator
    b1 = binarize.dynamic(o.train, torch.Generator().manual_seed(0))
    b2 = binarize.dynamic(o.train, torch.Generator().manual_seed(0))
    assert torch.equal(b1, b2) and set(b1.unique().tolist()) == {0.0, 1.0}
    assert abs(float(b1.mean() - o.train.mean())) < 0.02


def test_omniglot_missing_and_bad_files(tmp_path):
    with pytest.raises(DatasetFileMissing, match="chardata.mat not found") as info:
        omniglot.load(tmp_path)
    assert "github.com/yburda/iwae" in str(info.value)
    scipy_io.savemat(str(tmp_path / "chardata.mat"), {"data": np.full((784, 3), 1.5), "testdata": np.zeros((784, 2))})
    with pytest.raises(DatasetFileError, match=r"data holds values outside \[0, 1\]"):
        omniglot.load(tmp_path, strict_sizes=False)
    scipy_io.savemat(str(tmp_path / "chardata.mat"), {"data": np.zeros((784, 3))})
    with pytest.raises(DatasetFileError, match="no variable 'testdata'"):
        omniglot.load(tmp_path, strict_sizes=False)
    _chardata(tmp_path / "chardata.mat")
    with pytest.raises(DatasetFileError, match="sha256 is"):
        omniglot.load(tmp_path, strict_sizes=False, sha256="0" * 64)
