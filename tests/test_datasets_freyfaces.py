"""pyro_ffjord.datasets.freyfaces: the real pickle where the project has it, the restricted
unpickler on small pickles written here (including malicious ones), missing and wrong files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_ffjord.datasets import freyfaces
from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing, sha256_file

FREY = Path(__file__).resolve().parents[2] / "shared" / "data" / "freyfaces"
needs_frey = pytest.mark.skipif(not (FREY / freyfaces.FILENAME).is_file(), reason=f"{FREY} absent")


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
