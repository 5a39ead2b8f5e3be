"""Loaders of the VAE data sets other than MNIST: Frey faces (restricted unpickler), Caltech 101
silhouettes (split1 or seeded split) and Omniglot (chardata.mat) — on the real files where the
project has them, and on small files written here in each published format."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_ffjord.datasets import caltech, freyfaces, omniglot
from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing, sha256_file

scipy_io = pytest.importorskip("scipy.io")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FREY = DATA / "freyfaces"
CALTECH = DATA / "caltech101_silhouettes"
needs_frey = pytest.mark.skipif(not (FREY / freyfaces.FILENAME).is_file(), reason=f"{FREY} absent")
needs_caltech = pytest.mark.skipif(not (CALTECH / caltech.UNSPLIT_FILE).is_file(), reason=f"{CALTECH} absent")


# -- Frey faces: the real file ------------------------------------------------------------------
@pytest.fixture(scope="module")
def frey():
    return freyfaces.load(FREY)


@needs_frey
def test_frey_checksum_is_of_the_file_as_stored():
    assert sha256_file(FREY / freyfaces.FILENAME) == freyfaces.SHA256


@needs_frey
def test_frey_real_shapes_values_and_split(frey):
    assert (frey.train.shape, frey.valid.shape, frey.test.shape) == ((1565, 560), (200, 560), (200, 560))
    assert frey.train.dtype == torch.uint8 and frey.seed == 123 and frey.sha256 == freyfaces.SHA256
    every = torch.cat([frey.train, frey.valid, frey.test])
    assert (int(every.min()), int(every.max())) == (8, 238)  # the published value range
    index = torch.cat([frey.train_index, frey.valid_index, frey.test_index])
    assert sorted(index.tolist()) == list(range(1965))  # a partition of the file's rows
    raw = freyfaces.read_freyfaces(FREY / freyfaces.FILENAME)
    assert torch.equal(frey.test, torch.from_numpy(raw[frey.test_index.numpy()]))
    # the reference's shuffle: np.random.seed(seed); np.random.shuffle(data)
    shuffled = raw.copy()
    np.random.RandomState(123).shuffle(shuffled)
    assert np.array_equal(frey.train.numpy(), shuffled[:1565])
    assert np.array_equal(frey.test.numpy(), shuffled[1765:])


@needs_frey
def test_frey_seeded_determinism_and_float_dtype(frey):
    again = freyfaces.load(FREY, verify=False)
    assert torch.equal(again.test, frey.test) and again.sha256 is None
    other = freyfaces.load(FREY, seed=321, dtype=torch.float32)
    assert not torch.equal(other.test_index, frey.test_index)
    assert other.train.dtype == torch.float32 and float(other.train.max()) <= 1.0
    assert torch.equal(torch.round(other.train * 255).to(torch.uint8), freyfaces.load(FREY, seed=321).train)


# -- Frey faces: synthetic pickles --------------------------------------------------------------
def test_frey_format_pickle_round_trip(tmp_path):
    faces = np.random.default_rng(0).integers(0, 256, (7, 560), dtype=np.uint8)
    for protocol in (0, 2, 4):
        path = tmp_path / f"frey{protocol}.pkl"
        path.write_bytes(pickle.dumps([faces], protocol=protocol))
        got = freyfaces.read_freyfaces(path, sha256=None, num_images=None)
        assert got.dtype == np.uint8 and np.array_equal(got, faces)
    with pytest.raises(DatasetFileError, match="7 images, expected 1965"):
        freyfaces.read_freyfaces(tmp_path / "frey0.pkl", sha256=None)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("attack", [_System, _Eval])
def test_malicious_pickle_is_refused_without_running(tmp_path, attack):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps([attack(marker)], protocol=0))
    with pytest.raises(DatasetFileError, match="forbidden global") as info:
        freyfaces.read_freyfaces(path, sha256=None, num_images=None)
    assert ("system" if attack is _System else "eval") in str(info.value)
    assert str(path) in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload, match",
    [
        (b"cnumpy\nndarray\n(I10\ntR.", "cannot be unpickled"),  # ndarray(...) called directly
        (pickle.dumps([np.array([1, "a"], dtype=object)], protocol=2), "only numeric dtypes"),
        (b"cbuiltins\ngetattr\n.", "forbidden global builtins.getattr"),
        (pickle.dumps({"faces": 1}, protocol=0), "expected a list of one numpy array"),
        (pickle.dumps([np.zeros((3, 560), np.float32)], protocol=0), "expected uint8"),
        (b"not a pickle at all", "cannot be unpickled"),
    ],
)
def test_restricted_unpickler_refuses_everything_else(tmp_path, payload, match):
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(DatasetFileError, match=match):
        freyfaces.read_freyfaces(path, sha256=None, num_images=None)


def test_frey_missing_and_wrong_checksum(tmp_path):
    with pytest.raises(DatasetFileMissing, match="freyfaces.pkl not found") as info:
        freyfaces.load(tmp_path)
    assert isinstance(info.value, FileNotFoundError) and "sylvester-flows" in str(info.value)
    # a malicious file under the published name is stopped by the checksum, before unpickling
    marker = tmp_path / "executed"
    (tmp_path / freyfaces.FILENAME).write_bytes(pickle.dumps([_System(marker)], protocol=0))
    with pytest.raises(DatasetFileError, match="sha256 is .* expected 3b69410c") as info:
        freyfaces.load(tmp_path)
    assert "freyfaces.pkl" in str(info.value) and "roweis" in str(info.value)
    assert not marker.exists()


# -- Caltech 101 silhouettes --------------------------------------------------------------------
@pytest.fixture(scope="module")
def silhouettes():
    return caltech.load(CALTECH)


@needs_caltech
def test_caltech_real_unsplit_seeded_split(silhouettes):
    s = silhouettes
    assert sha256_file(CALTECH / caltech.UNSPLIT_FILE) == caltech.SHA256[caltech.UNSPLIT_FILE]
    assert (s.train.shape, s.valid.shape, s.test.shape) == ((4100, 784), (2264, 784), (2307, 784))
    assert s.split == "random" and s.seed == 0 and "not, the paper's split1" in s.info["split"]
    every = torch.cat([s.train, s.valid, s.test])
    assert set(every.unique().tolist()) == {0.0, 1.0}
    labels = torch.cat([s.train_labels, s.valid_labels, s.test_labels])
    assert set(labels.tolist()) == set(range(1, 102)) and len(s.classnames) == 101
    # inverted and upright: the silhouette (1) sits in the middle, the border is background (0)
    images = every.reshape(-1, 28, 28)
    assert images[:, 10:18, 10:18].mean() > 0.8 and images[:, 0, :].mean() < 0.1
    # class 1 is "Airplanes Side 2": the wings are wider than the plane is tall
    planes = images[labels == 1].mean(0) > 0.5
    assert planes.any(0).sum() > planes.any(1).sum()


@needs_caltech
def test_caltech_seeded_determinism(silhouettes):
    again = caltech.load(CALTECH, verify=False)
    assert torch.equal(again.test, silhouettes.test) and torch.equal(again.test_labels, silhouettes.test_labels)
    other = caltech.load(CALTECH, seed=1, invert=False)
    assert not torch.equal(other.test_labels, silhouettes.test_labels)
    x, y, _ = caltech.read_unsplit(CALTECH / caltech.UNSPLIT_FILE)
    _, _, test = caltech.random_split_indices(1)
    assert torch.equal(other.test, torch.from_numpy(x[test]).float())


@needs_caltech
def test_caltech_corrupt_copy(tmp_path):
    bad = tmp_path / caltech.UNSPLIT_FILE
    shutil.copyfile(CALTECH / caltech.UNSPLIT_FILE, bad)
    with open(bad, "r+b") as handle:
        handle.seek(5000)
        byte = handle.read(1)
        handle.seek(5000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(DatasetFileError, match="sha256 is .* expected 862d0a4b") as info:
        caltech.load(tmp_path)
    assert "marlin" in str(info.value)


def _split1_file(path, sizes, seed=0):
    """A split1-format file: *_data column-major rows (MATLAB double 0/1), *_labels (N, 1)."""
    rng = np.random.default_rng(seed)
    mat, images = {}, {}
    for (split, key), n in zip(caltech._SPLIT_KEYS.items(), sizes):
        img = np.ones((n, 28, 28))  # background 1
        img[:, 3:10, :] = rng.integers(0, 2, (n, 7, 28))  # a band near the top
        images[split] = img
        mat[f"{key}_data"] = img.reshape(n, 784, order="F")
        mat[f"{key}_labels"] = rng.integers(1, 102, (n, 1)).astype(np.uint8)
    mat["classnames"] = np.array([[f"class {i}" for i in range(1, 102)]], dtype=object)
    scipy_io.savemat(str(path), mat)
    return images, mat


def test_caltech_split1_format(tmp_path):
    images, mat = _split1_file(tmp_path / caltech.SPLIT_FILE, (5, 3, 4))
    parts = caltech.read_split1(tmp_path / caltech.SPLIT_FILE, strict_sizes=False)
    for split, key in caltech._SPLIT_KEYS.items():
        x, y = parts[split]
        assert np.array_equal(x.reshape(-1, 28, 28), images[split])  # upright after the F reshape
        assert np.array_equal(y, mat[f"{key}_labels"].ravel())
    assert parts["classnames"][0] == "class 1"
    with pytest.raises(DatasetFileError, match=r"train_data has shape \(5, 784\), expected \(4100, 784\)"):
        caltech.load(tmp_path)  # split1 preferred, and the published sizes are required


def test_caltech_split1_preferred_at_full_size(tmp_path):
    images, mat = _split1_file(tmp_path / caltech.SPLIT_FILE, tuple(caltech.SIZES.values()))
    s = caltech.load(tmp_path)
    assert s.split == "split1" and s.seed is None and "as the paper" in s.info["split"]
    assert (s.train.shape, s.valid.shape, s.test.shape) == ((4100, 784), (2264, 784), (2307, 784))
    assert torch.equal(s.test.reshape(-1, 28, 28), torch.from_numpy(1 - images["test"]).float())
    assert torch.equal(s.valid_labels, torch.from_numpy(mat["val_labels"].ravel().astype(np.int64)))
    with pytest.raises(DatasetFileMissing, match=caltech.UNSPLIT_FILE):
        caltech.load(tmp_path, source="random")


def test_caltech_missing_and_bad_values(tmp_path):
    with pytest.raises(DatasetFileMissing) as info:
        caltech.load(tmp_path)
    message = str(info.value)
    assert caltech.SPLIT_FILE in message and caltech.UNSPLIT_FILE in message and caltech.PUBLISHED in message
    mat = {"X": np.full((3, 784), 2, np.uint8), "Y": np.ones((1, 3), np.uint8)}
    scipy_io.savemat(str(tmp_path / "x.mat"), mat)
    with pytest.raises(DatasetFileError, match="shape"):
        caltech.read_unsplit(tmp_path / "x.mat", sha256=None)
    (tmp_path / "junk.mat").write_bytes(b"MATLAB? no")
    with pytest.raises(DatasetFileError, match="cannot be read as a MATLAB file"):
        caltech.read_unsplit(tmp_path / "junk.mat", sha256=None)


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
    b1 = omniglot.dynamic_binarize(o.train, torch.Generator().manual_seed(0))
    b2 = omniglot.dynamic_binarize(o.train, torch.Generator().manual_seed(0))
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
