"""The IDX file format of LeCun & Cortes (MNIST), read with its header checked, and written.

An IDX file is two zero bytes, an element-type code, the number of dimensions ``d``, ``d``
big-endian uint32 dimensions, then the elements in row-major order, big-endian. The format is
described at http://yann.lecun.com/exdb/mnist/; the files are published gzip-compressed and are
read either way. Which data set a file belongs to, and so where it is published, is the
caller's to say (``published``, named in every error).

The file is read as a stream: the header and the payload size it declares are checked before
the payload is read, and no more than the declared size plus one byte is ever decompressed.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path
from typing import BinaryIO, Optional, Tuple

import numpy as np

from .files import DatasetFileMissing, PathLike, corrupt

# IDX element type codes (third byte of the magic number) -> big-endian numpy dtype.
IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: Default cap on the payload a header may declare (2 GiB; MNIST's largest file is 47 MB), so
#: that a corrupt or hostile header is refused before anything is allocated or inflated.
MAX_BYTES = 1 << 31

# Payload is read in chunks of this size: a header's claim is never allocated in one read.
_CHUNK = 1 << 22

# What a broken gzip stream raises while it is read (BadGzipFile is an OSError).
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


def _read(stream: BinaryIO, n: int, path: Path, published: str) -> bytes:
    """Up to ``n`` bytes of ``stream``; a gzip error becomes a :class:`DatasetFileError`."""
    try:
        return stream.read(n)
    except _GZIP_ERRORS as exc:
        raise corrupt(path, f"cannot be decompressed as gzip ({exc})", published) from None


def _read_header(
    stream: BinaryIO, path: Path, published: str
) -> Tuple[np.dtype, Tuple[int, ...], bytes]:
    """The element dtype, the dimensions and the raw header bytes, read from the stream's start."""
    magic = _read(stream, 4, path, published)
    if len(magic) < 4:
        raise corrupt(path, f"only {len(magic)} bytes, too short for an IDX header", published)
    if magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_TYPES:
        raise corrupt(
            path, f"bad IDX magic number 0x{magic.hex()} (expected 0x000008 followed by the "
            "number of dimensions, e.g. 0x00000803 for images)", published,
        )
    ndim = magic[3]
    if ndim == 0:
        raise corrupt(path, "truncated IDX header (0 dimensions)", published)
    raw_dims = _read(stream, 4 * ndim, path, published)
    if len(raw_dims) < 4 * ndim:
        raise corrupt(
            path, f"truncated IDX header ({ndim} dimensions, {4 + len(raw_dims)} of "
            f"{4 + 4 * ndim} header bytes)", published,
        )
    # Python ints: the product of the dimensions must not wrap around as numpy's would.
    dims = tuple(int.from_bytes(raw_dims[i : i + 4], "big") for i in range(0, 4 * ndim, 4))
    return IDX_TYPES[magic[2]], dims, magic + raw_dims


def read_idx(
    path: PathLike,
    published: str,
    sha256: Optional[str] = None,
    shape: Optional[Tuple[int, ...]] = None,
    max_bytes: int = MAX_BYTES,
) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a numpy array, streaming.

    The header is read and checked first: two zero bytes, a known element-type code, the
    number of dimensions, the dimensions themselves (against ``shape`` if given) and the
    payload size they declare (at most ``max_bytes``). Only then is the payload read, exactly
    the declared number of bytes plus one to detect trailing data, so that a gzip file that
    inflates far beyond its header is never inflated whole. If ``sha256`` is given, the sha256
    of the uncompressed file must match.

    :param path: the file.
    :param published: where the file is published (named in every error).
    :param sha256: expected hex digest of the uncompressed file, or ``None`` to skip.
    :param shape: expected dimensions, or ``None`` to accept any.
    :param max_bytes: largest payload (in bytes) a header may declare.
    :returns: an array of the file's dimensions in native byte order.
    :raises DatasetFileMissing: if the file does not exist.
    :raises DatasetFileError: on a bad header, a wrong length, a broken gzip stream or a
        checksum mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFileMissing(f"IDX file {path} not found; it is published at {published}")
    with open(path, "rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
        with stream:
            return _read_idx_stream(stream, path, published, sha256, shape, max_bytes)


def _read_idx_stream(
    stream: BinaryIO,
    path: Path,
    published: str,
    sha256: Optional[str],
    shape: Optional[Tuple[int, ...]],
    max_bytes: int,
) -> np.ndarray:
    """:func:`read_idx` on an open (decompressing) stream positioned at the file's start."""
    dtype, dims, header = _read_header(stream, path, published)
    if shape is not None and dims != tuple(shape):
        raise corrupt(path, f"IDX dimensions {dims}, expected {tuple(shape)}", published)
    count = 1
    for d in dims:
        count *= d
    size = count * dtype.itemsize
    if size > max_bytes:
        raise corrupt(
            path, f"the IDX header {dims} declares {size} payload bytes, more than the "
            f"{max_bytes} accepted (max_bytes)", published,
        )
    # np.empty only reserves the pages; they are committed as chunks arrive, so a truncated
    # file never costs the memory its header claims.
    payload = np.empty(size, dtype=np.uint8)
    digest = hashlib.sha256(header)
    done = 0
    while done < size:
        chunk = _read(stream, min(_CHUNK, size - done), path, published)
        if not chunk:
            raise corrupt(
                path, f"truncated: the IDX header {dims} declares {size} payload bytes, "
                f"the file holds {done}", published,
            )
        payload[done : done + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
        digest.update(chunk)
        done += len(chunk)
    # One more byte, no more, tells whether anything follows (and checks a gzip trailer's CRC).
    if _read(stream, 1, path, published):
        raise corrupt(
            path, f"has trailing bytes after the {size} payload bytes the IDX header {dims} "
            "declares", published,
        )
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise corrupt(
            path, f"sha256 of the uncompressed file is {digest.hexdigest()}, expected {sha256}",
            published,
        )
    array = payload.view(dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


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
