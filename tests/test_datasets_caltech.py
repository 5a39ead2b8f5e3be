"""pyro_ffjord.datasets.caltech: the real unsplit file where the project has it (seeded split),
split1-format files written here, corrupt, missing and malformed files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_ffjord.datasets import caltech
from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing, sha256_file

scipy_io = pytest.importorskip("scipy.io")

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101_silhouettes"
needs_caltech = pytest.mark.skipif(not (CALTECH / caltech.UNSPLIT_FILE).is_file(), reason=f"{CALTECH} absent")


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
