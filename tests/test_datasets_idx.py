"""pyro_ffjord.datasets.idx: the IDX reader and writer on small files (gzip and raw, uint8 and
int32), the errors for a missing file, and the streaming checks: a gzip file that inflates far
beyond its header, headers whose declared size is implausible (or overflows numpy), truncated
and trailing payloads. Corrupt headers are also tested through the MNIST loader
(test_datasets_mnist.py), which names the published file."""

from __future__ import annotations

import gzip
import hashlib
import math
import tracemalloc
import zlib

import numpy as np
import pytest

from pyro_ffjord.datasets.files import DatasetFileError, DatasetFileMissing
from pyro_ffjord.datasets.idx import MAX_BYTES, read_idx, write_idx

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


def _header(dims, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + np.asarray(dims, dtype=">u4").tobytes()


def test_gzip_inflating_far_beyond_its_header_is_not_inflated(tmp_path):
    # A valid header for 100 x 28 x 28 bytes, then 32 MiB of zeros: 32 KB on disk. Only the
    # declared payload (78 KB) and a byte more may be inflated, so the peak stays far below 32 MiB.
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    zeros = bytes(1 << 20)
    parts = [comp.compress(_header((100, 28, 28)))] + [comp.compress(zeros) for _ in range(32)]
    path = tmp_path / "bomb.idx.gz"
    path.write_bytes(b"".join(parts) + comp.flush())
    assert path.stat().st_size < 64 << 10
    tracemalloc.start()
    try:
        with pytest.raises(DatasetFileError, match="trailing bytes") as info:
            read_idx(path, PUBLISHED, shape=(100, 28, 28))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"peak {peak} bytes: the stream was inflated beyond its header"
    assert str(path) in str(info.value) and PUBLISHED in str(info.value)


def _header_then_broken_gzip(path, dims) -> None:
    """A gzip stream holding just ``dims``'s header and ending abruptly: reading any payload
    raises a gzip error, so a size error proves the header was refused before the payload."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    path.write_bytes(comp.compress(_header(dims)) + comp.flush(zlib.Z_SYNC_FLUSH))


@pytest.mark.parametrize("dims", [(65536,) * 4, (4, 65536, 65536, 65536)], ids=["wraps-to-0", "2^50"])
def test_implausible_header_is_refused_before_the_payload(tmp_path, dims):
    # 65536**4 = 2**64 wraps to 0 in numpy's int64 product; the size must be a Python int.
    for path in (tmp_path / "huge.idx", tmp_path / "huge.idx.gz"):
        if path.suffix == ".gz":
            _header_then_broken_gzip(path, dims)
        else:
            path.write_bytes(_header(dims))  # the header alone
        with pytest.raises(DatasetFileError, match=f"more than the {MAX_BYTES} accepted") as info:
            read_idx(path, PUBLISHED)
        assert f"declares {math.prod(dims)} payload bytes" in str(info.value)
        assert str(path) in str(info.value) and PUBLISHED in str(info.value)
    # an expected shape refuses other dimensions before the payload, too
    _header_then_broken_gzip(path, (60000, 28, 28))
    with pytest.raises(DatasetFileError, match=r"dimensions \(60000, 28, 28\), expected"):
        read_idx(path, PUBLISHED, shape=(10000, 28, 28))
    # max_bytes lowers the cap
    write_idx(tmp_path / "ten.idx", np.zeros(10, np.uint8))
    assert read_idx(tmp_path / "ten.idx", PUBLISHED, max_bytes=10).shape == (10,)
    with pytest.raises(DatasetFileError, match="declares 10 payload bytes, more than the 9"):
        read_idx(tmp_path / "ten.idx", PUBLISHED, max_bytes=9)


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
def test_truncated_and_trailing_payloads_say_what_was_declared_and_found(tmp_path, name):
    path = tmp_path / name
    good = _header((2, 3, 4)) + bytes(range(24))
    pack = gzip.compress if name.endswith(".gz") else bytes
    path.write_bytes(pack(good[:-4]))
    with pytest.raises(DatasetFileError, match="truncated") as info:
        read_idx(path, PUBLISHED)
    assert r"header (2, 3, 4) declares 24 payload bytes, the file holds 20" in str(info.value)
    assert str(path) in str(info.value) and PUBLISHED in str(info.value)
    path.write_bytes(pack(good + b"\x00\x00"))
    with pytest.raises(DatasetFileError, match=r"trailing bytes after the 24 payload bytes"):
        read_idx(path, PUBLISHED)
    # int32 elements: a partial last element is a truncation too
    path.write_bytes(pack(_header((3,), code=0x0C) + bytes(10)))
    with pytest.raises(DatasetFileError, match="declares 12 payload bytes, the file holds 10"):
        read_idx(path, PUBLISHED)
    path.write_bytes(pack(good))
    assert read_idx(path, PUBLISHED).tolist() == np.arange(24).reshape(2, 3, 4).tolist()
