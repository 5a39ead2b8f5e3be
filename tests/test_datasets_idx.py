"""pyro_ffjord.datasets.idx: the IDX reader and writer on small files (gzip and raw, uint8 and
int32), and the errors for a missing file. Corrupt headers and lengths are tested through the
MNIST loader (test_datasets_mnist.py), which names the published file."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing
from pyro_ffjord.datasets.idx import read_idx, write_idx

PUBLISHED = "https://example.org/a.idx.gz"


def test_read_idx_small_files(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a.idx", "a.idx.gz"):
        write_idx(tmp_path / name, x)
        y = read_idx(tmp_path / name, PUBLISHED, shape=(2, 3, 4))
        assert y.dtype == np.uint8 and np.array_equal(x, y)
    raw = (tmp_path / "a.idx").read_bytes()
    assert raw[:4] == b"\x00\x00\x08\x03"
    assert (tmp_path / "a.idx.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert read_idx(tmp_path / "a.idx", PUBLISHED, sha256=hashlib.sha256(raw).hexdigest()).shape == (2, 3, 4)
    # a big-endian int32 IDX file (type 0x0C) is read in native order
    ints = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "i.idx").write_bytes(b"\x00\x00\x0c\x01" + np.uint32(3).byteswap().tobytes() + ints.tobytes())
    assert read_idx(tmp_path / "i.idx", PUBLISHED).tolist() == [1, -2, 70000]


def test_write_idx_compress_flag_and_dtype(tmp_path):
    x = np.zeros((2, 2), dtype=np.uint8)
    write_idx(tmp_path / "raw.gz", x, compress=False)
    assert (tmp_path / "raw.gz").read_bytes()[:4] == b"\x00\x00\x08\x02"
    with pytest.raises(TypeError, match="uint8"):
        write_idx(tmp_path / "f.idx", x.astype(np.float32))


def test_read_idx_errors_name_the_file_and_where_it_is_published(tmp_path):
    with pytest.raises(DatasetFileMissing, match="nothing.idx not found") as info:
        read_idx(tmp_path / "nothing.idx", PUBLISHED)
    assert isinstance(info.value, FileNotFoundError) and PUBLISHED in str(info.value)
    write_idx(tmp_path / "a.idx", np.zeros(3, np.uint8))
    with pytest.raises(DatasetFileError, match="sha256 of the uncompressed file") as info:
        read_idx(tmp_path / "a.idx", PUBLISHED, sha256="0" * 64)
    assert str(tmp_path / "a.idx") in str(info.value) and PUBLISHED in str(info.value)
    (tmp_path / "b.idx").write_bytes(b"\x00\x00")
    with pytest.raises(DatasetFileError, match="too short"):
        read_idx(tmp_path / "b.idx", PUBLISHED)
