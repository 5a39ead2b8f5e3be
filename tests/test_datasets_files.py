"""pyro_ffjord.datasets.files: finding a file (and its alternative names), reading it gunzipped,
checking its sha256, and the errors, which name the file and where it is published."""

from __future__ import annotations

import gzip
import hashlib

import pytest

from pyro_ffjord.datasets.files import (
    DatasetFileError, DatasetFileMissing, check_sha256, corrupt, read_bytes, require_file, sha256_file,
)

PUBLISHED = "https://example.org/data"


def test_error_hierarchy():
    assert issubclass(DatasetFileError, ValueError)
    assert issubclass(DatasetFileMissing, DatasetFileError) and issubclass(DatasetFileMissing, FileNotFoundError)
    error = corrupt("/x/a.bin", "too short", PUBLISHED)
    assert isinstance(error, DatasetFileError) and not isinstance(error, DatasetFileMissing)
    assert str(error) == ("/x/a.bin: too short. The file is corrupt or not the published one; download it "
                          f"again (it is published at {PUBLISHED}).")


def test_require_file_and_alternatives(tmp_path):
    with pytest.raises(DatasetFileMissing) as info:
        require_file(tmp_path, "a.gz", PUBLISHED, alternatives=("a",))
    assert str(info.value) == f"data file a.gz (or a) not found in {tmp_path}; it is published at {PUBLISHED}"
    (tmp_path / "a").write_bytes(b"raw")
    assert require_file(tmp_path, "a.gz", PUBLISHED, alternatives=("a",)) == tmp_path / "a"
    (tmp_path / "a.gz").write_bytes(b"gz")
    assert require_file(tmp_path, "a.gz", PUBLISHED, alternatives=("a",)) == tmp_path / "a.gz"  # name first
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetFileMissing):
        require_file(tmp_path, "d", PUBLISHED)  # a directory is not a file


def test_read_bytes_gunzips_and_names_bad_gzip(tmp_path):
    (tmp_path / "a").write_bytes(b"payload")
    (tmp_path / "a.gz").write_bytes(gzip.compress(b"payload"))
    assert read_bytes(tmp_path / "a", PUBLISHED) == read_bytes(tmp_path / "a.gz", PUBLISHED) == b"payload"
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"payload" * 100)[:20])
    with pytest.raises(DatasetFileError, match="cannot be decompressed as gzip") as info:
        read_bytes(tmp_path / "bad.gz", PUBLISHED)
    assert str(tmp_path / "bad.gz") in str(info.value) and PUBLISHED in str(info.value)


def test_sha256_of_the_file_as_stored(tmp_path):
    path = tmp_path / "a.gz"
    path.write_bytes(gzip.compress(b"payload", mtime=0))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert sha256_file(path) == sha256_file(path, chunk=3) == digest
    assert check_sha256(path, None, PUBLISHED) is None
    assert check_sha256(path, digest.upper(), PUBLISHED) == digest
    with pytest.raises(DatasetFileError, match=f"sha256 is {digest}, expected 00") as info:
        check_sha256(path, "00" * 32, PUBLISHED)
    assert PUBLISHED in str(info.value)
