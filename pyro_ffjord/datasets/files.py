"""Small helpers shared by the data loaders: finding a data file, checking its sha256, and the
errors raised when a file is missing or is not the published one.

Every message names the file and where it is published, so that a user can fetch it::

    >>> import tempfile
    >>> try:
    ...     require_file(tempfile.gettempdir(), "no-such-file.mat", "https://example.org/data")
    ... except DatasetFileMissing as exc:
    ...     print(str(exc).split(";")[1].strip())
    it is published at https://example.org/data
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

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


def require_file(data_dir: PathLike, name: str, published: str) -> Path:
    """``data_dir / name`` if it is a file, else :class:`DatasetFileMissing` naming the file,
    the directory searched and where the file is published."""
    path = Path(data_dir) / name
    if not path.is_file():
        raise DatasetFileMissing(
            f"data file {name} not found in {Path(data_dir)}; it is published at {published}"
        )
    return path


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
