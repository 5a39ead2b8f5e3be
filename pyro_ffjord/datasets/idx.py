"""The IDX file format of LeCun & Cortes (MNIST), read with its header checked, and written.

An IDX file is two zero bytes, an element-type code, the number of dimensions ``d``, ``d``
big-endian uint32 dimensions, then the elements in row-major order, big-endian. The format is
described at http://yann.lecun.com/exdb/mnist/; the files are published gzip-compressed and are
read either way. Which data set a file belongs to, and so where it is published, is the
caller's to say (``published``, named in every error).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .files import DatasetFileMissing, PathLike, corrupt, read_bytes

# IDX element type codes (third byte of the magic number) -> big-endian numpy dtype.
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(
    path: PathLike,
    published: str,
    sha256: Optional[str] = None,
    shape: Optional[Tuple[int, ...]] = None,
) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a numpy array.

    The header is checked: two zero bytes, a known element-type code, the number of dimensions,
    the dimensions themselves (against ``shape`` if given) and the payload length; if
    ``sha256`` is given, the sha256 of the uncompressed file must match.

    :param path: the file.
    :param published: where the file is published (named in every error).
    :param sha256: expected hex digest of the uncompressed file, or ``None`` to skip.
    :param shape: expected dimensions, or ``None`` to accept any.
    :returns: an array of the file's dimensions in native byte order.
    :raises DatasetFileMissing: if the file does not exist.
    :raises DatasetFileError: on a bad header, a wrong length or a checksum mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFileMissing(f"IDX file {path} not found; it is published at {published}")
    data = read_bytes(path, published)
    if len(data) < 4:
        raise corrupt(path, f"only {len(data)} bytes, too short for an IDX header", published)
    if data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise corrupt(
            path, f"bad IDX magic number 0x{data[:4].hex()} (expected 0x000008 followed by the "
            "number of dimensions, e.g. 0x00000803 for images)", published,
        )
    dtype, ndim = IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise corrupt(path, f"truncated IDX header ({ndim} dimensions, {len(data)} bytes)", published)
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if shape is not None and dims != tuple(shape):
        raise corrupt(path, f"IDX dimensions {dims}, expected {tuple(shape)}", published)
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise corrupt(
            path, f"{problem}: {len(data)} bytes uncompressed, the header {dims} implies {expected}",
            published,
        )
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256.lower():
            raise corrupt(
                path, f"sha256 of the uncompressed file is {digest}, expected {sha256}", published
            )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: PathLike, array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Write ``array`` (uint8) as an IDX file; gzip-compressed if ``compress`` is True or, by
    default, if the name ends in ``.gz``. For tests and for users preparing small data sets."""
    path = Path(path)
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx writes uint8 arrays, got {array.dtype}")
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.tobytes()
    if compress is None:
        compress = path.name.endswith(".gz")
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
