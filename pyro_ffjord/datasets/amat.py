"""The ``.amat`` text format of binary images (Larochelle & Murray's statically binarized MNIST,
``binarized_mnist_{train,valid,test}.amat``): one image per line, its values 0 or 1 separated by
whitespace. Read (plain or gzip-compressed) with every line checked, and written. Which data
set a file belongs to, and so where it is published, is the caller's to say (``published``,
named in every error).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np

from .files import DatasetFileMissing, PathLike, corrupt, read_bytes


def read_amat(
    path: PathLike, published: str, num_rows: Optional[int] = None, num_cols: int = 784
) -> np.ndarray:
    """Read an ``.amat`` file of 0/1 images: one image per line, ``num_cols`` values 0 or 1
    separated by whitespace (a gzip-compressed file is decompressed). Blank lines are skipped.

    :param published: where the file is published (named in every error).
    :param num_rows: expected number of images, or ``None`` to accept any.
    :returns: a uint8 array ``(N, num_cols)`` of 0/1.
    :raises DatasetFileMissing: if the file does not exist.
    :raises DatasetFileError: on a line of the wrong length, a value other than 0/1, or a wrong
        number of lines.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFileMissing(f"binarized image file {path} not found; it is published at {published}")
    text = read_bytes(path, published)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != num_cols:
            raise corrupt(
                path, f"line {lineno} has {len(tokens)} values (expected {num_cols} values 0/1)",
                published,
            )
        joined = b"".join(tokens)
        row = np.frombuffer(joined, dtype=np.uint8) - ord("0")
        # one byte per value, each 0 or 1 (uint8 arithmetic wraps bytes below '0' to >1 too)
        if len(joined) != num_cols or row.max() > 1:
            bad = next(t for t in tokens if t not in (b"0", b"1"))
            raise corrupt(
                path, f"line {lineno} holds {bad.decode(errors='replace')!r}, not 0 or 1", published
            )
        rows.append(row)
    if num_rows is not None and len(rows) != num_rows:
        raise corrupt(path, f"{len(rows)} images, expected {num_rows}", published)
    if not rows:
        return np.zeros((0, num_cols), dtype=np.uint8)
    return np.stack(rows)


def write_amat(path: PathLike, images: np.ndarray) -> None:
    """Write 0/1 images ``(N, D)`` in the ``.amat`` text format (one image per line)."""
    images = np.asarray(images)
    buffer = io.StringIO()
    for row in images.reshape(len(images), -1):
        buffer.write(" ".join("1" if v else "0" for v in row))
        buffer.write("\n")
    Path(path).write_text(buffer.getvalue())
