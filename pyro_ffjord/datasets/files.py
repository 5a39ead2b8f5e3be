"""Helpers shared by the data loaders: finding a data file, reading it (gunzipped if it is
gzip-compressed), checking its sha256, and the errors raised when a file is missing or is not the
published one.

One hierarchy of errors: :class:`DatasetFileError` (a :class:`ValueError`) for a file that is
missing, corrupt or not the published one, and :class:`DatasetFileMissing` (also a
:class:`FileNotFoundError`) for a file that is not there. Every message names the file and where
it is published, so that a user can fetch it::

    >>> import tempfile
    >>> try:
    ...     require_file(tempfile.gettempdir(), "no-such-file.mat", "https://example.org/data")
    ... except DatasetFileMissing as exc:
    ...     print(str(exc).split(";")[1].strip())
    it is published at https://example.org/data
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

PathLike = Union[str, Path]


class DatasetFileError(ValueError):
    """A data file is missing, corrupt, or not the published one (wrong checksum, format,
    shape or values). The message names the file and where it is published."""


class DatasetFileMissing(DatasetFileError, FileNotFoundError):
    """A data file is not where it was looked for (also a :class:`FileNotFoundError`)."""


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of the file as stored (no decompression)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def corrupt(path: PathLike, problem: str, published: str) -> DatasetFileError:
    """The error for a file that exists but is not what it should be."""
    return DatasetFileError(
        f"{path}: {problem}. The file is corrupt or not the published one; download it again "
        f"(it is published at {published})."
    )


def require_file(
    data_dir: PathLike, name: str, published: str, alternatives: Sequence[str] = ()
) -> Path:
    """``data_dir / name`` if it is a file, else the first of ``data_dir / alternatives`` that
    is (e.g. the uncompressed name of a ``.gz`` file), else :class:`DatasetFileMissing` naming
    the file, the directory searched and where the file is published."""
    data_dir = Path(data_dir)
    for candidate in (name, *alternatives):
        if (data_dir / candidate).is_file():
            return data_dir / candidate
    also = "".join(f" (or {alt})" for alt in alternatives)
    raise DatasetFileMissing(
        f"data file {name}{also} not found in {data_dir}; it is published at {published}"
    )


def read_bytes(path: PathLike, published: str) -> bytes:
    """The content of ``path``, gunzipped if it starts with the gzip magic bytes (the IDX and
    ``.amat`` files are published gzip-compressed and read either way).

    :raises DatasetFileError: a gzip stream that cannot be decompressed.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise corrupt(path, f"cannot be decompressed as gzip ({exc})", published) from None
    return raw


def check_sha256(path: PathLike, expected: Optional[str], published: str) -> Optional[str]:
    """Check the sha256 of ``path`` (as stored) against ``expected``; ``None`` skips the check.

    :returns: the digest when checked, else ``None``.
    :raises DatasetFileError: on a mismatch.
    """
    if expected is None:
        return None
    digest = sha256_file(path)
    if digest != expected.lower():
        raise corrupt(path, f"sha256 is {digest}, expected {expected}", published)
    return digest
