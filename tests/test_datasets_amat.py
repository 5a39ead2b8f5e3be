"""pyro_ffjord.datasets.amat: the .amat reader and writer (plain, gzip, CRLF) and malformed
lines. The MNIST loader's use of the files (published sizes, missing files): test_datasets_mnist.py."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from pyro_ffjord.datasets import mnist
from pyro_ffjord.datasets.amat import read_amat, write_amat
from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing

PUBLISHED = mnist.AMAT_URL + "binarized_mnist_test.amat"


def test_amat_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = {s: (rng.random((n, 784)) < 0.2).astype(np.uint8) for s, n in
              (("train", 5), ("valid", 3), ("test", 4))}
    for split, x in images.items():
        write_amat(tmp_path / f"binarized_mnist_{split}.amat", x)
    line = (tmp_path / "binarized_mnist_valid.amat").read_text().splitlines()[0]
    assert len(line.split(" ")) == 784 and set(line.split(" ")) <= {"0", "1"}
    for split, x in images.items():
        got = read_amat(tmp_path / f"binarized_mnist_{split}.amat", PUBLISHED)
        assert got.dtype == np.uint8 and np.array_equal(got, x)
    # gzip-compressed .amat, trailing blank line and CRLF line ends are accepted
    text = (tmp_path / "binarized_mnist_test.amat").read_text().replace("\n", "\r\n") + "\n"
    (tmp_path / "t.amat.gz").write_bytes(gzip.compress(text.encode()))
    assert np.array_equal(read_amat(tmp_path / "t.amat.gz", PUBLISHED, num_rows=4), images["test"])
    with pytest.raises(DatasetFileError, match="4 images, expected 5"):
        read_amat(tmp_path / "t.amat.gz", PUBLISHED, num_rows=5)
    # an empty file holds no images, of the requested width
    (tmp_path / "empty.amat").write_text("\n")
    assert read_amat(tmp_path / "empty.amat", PUBLISHED, num_cols=3).shape == (0, 3)


@pytest.mark.parametrize(
    "line, message",
    [("0 1 " * 391 + "0", "783 values"), ("0 1 " * 392, None), ("0 2 " * 392, "'2'"),
     ("0 1 " * 391 + "0 1.0", "'1.0'")],
    ids=["short", "ok", "value-2", "float"],
)
def test_amat_malformed(tmp_path, line, message):
    path = tmp_path / "binarized_mnist_test.amat"
    path.write_text(("0 " * 784).strip() + "\n" + line.strip() + "\n")
    if message is None:
        assert read_amat(path, PUBLISHED).shape == (2, 784)
        return
    with pytest.raises(DatasetFileError, match=message) as info:
        read_amat(path, PUBLISHED)
    assert "line 2" in str(info.value) and str(path) in str(info.value)
    assert "larocheh" in str(info.value)


def test_amat_missing(tmp_path):
    with pytest.raises(DatasetFileMissing, match="nothing.amat not found") as info:
        read_amat(tmp_path / "nothing.amat", PUBLISHED)
    assert isinstance(info.value, FileNotFoundError) and PUBLISHED in str(info.value)
