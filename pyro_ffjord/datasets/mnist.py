"""MNIST from the published files: the IDX files and the statically binarized ``.amat`` files.

Two sources are read, both from a data directory the caller names (nothing is downloaded and
nothing is ever unpickled):

* The IDX files of LeCun & Cortes (``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``;
  gzip-compressed as published or uncompressed), published at
  http://yann.lecun.com/exdb/mnist/ and mirrors (e.g.
  https://ossci-datasets.s3.amazonaws.com/mnist/). :func:`load_mnist` checks each header (magic
  number, element type, dimensions), the payload length and, where known, the sha256 of the
  uncompressed file, then splits 50k/10k/10k: train = the first 50,000 images of the training
  file, valid = its last 10,000, test = the t10k file. Binarization:

  - ``"static"`` (default): each pixel is drawn once, Bernoulli with probability
    intensity / 255, from a generator seeded with ``seed`` (the same seed gives the same bits on
    any machine; valid and test are thus fixed);
  - ``"dynamic"``: the intensities in [0, 1] are returned and each batch is re-drawn during
    training with :func:`dynamic_binarize`;
  - ``"none"``: the intensities in [0, 1].

* The statically binarized MNIST of Larochelle & Murray (2011),
  ``binarized_mnist_{train,valid,test}.amat`` (text, one image per line, 784 values 0/1
  separated by spaces; 50k/10k/10k), published at
  http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/ — the data of the
  FFJORD paper's VAE table. :func:`load_binarized_mnist` reads them when a user has them;
  :func:`read_amat` reads one file.

Example::

    data = load_mnist("../shared/data/mnist")        # seeded static binarization, seed 0
    data.train.shape, data.valid.shape, data.test.shape
    # (torch.Size([50000, 784]), torch.Size([10000, 784]), torch.Size([10000, 784]))
    grey = load_mnist("../shared/data/mnist", binarize="dynamic")   # intensities in [0, 1]
    x = dynamic_binarize(grey.train[:100])                          # one fresh batch
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, Path]

IDX_URL = "http://yann.lecun.com/exdb/mnist/"
IDX_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"

#: sha256 of the uncompressed IDX files. The image sums are those listed with the project's
#: data copy; the label sums were computed from the same copy, whose uncompressed md5s match
#: the canonical files.
IDX_SHA256: Dict[str, str] = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Expected dimensions of each published IDX file.
IDX_SHAPES: Dict[str, Tuple[int, ...]] = {
    TRAIN_IMAGES: (60000, 28, 28),
    TRAIN_LABELS: (60000,),
    TEST_IMAGES: (10000, 28, 28),
    TEST_LABELS: (10000,),
}

NUM_TRAIN = 50_000
NUM_VALID = 10_000
NUM_TEST = 10_000
NUM_PIXELS = 784
BINARIZATIONS = ("static", "dynamic", "none")

# IDX element type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MNISTFileError(ValueError):
    """A data file exists but is not what it should be (bad header, length or checksum)."""


def _where(name: str, url: str = IDX_URL, mirrors: Tuple[str, ...] = IDX_MIRRORS) -> str:
    also = "".join(f" or {m}{name}" for m in mirrors)
    return f"it is published at {url}{name}{also}"


def _corrupt(path: Path, problem: str, published: str) -> MNISTFileError:
    return MNISTFileError(
        f"{path}: {problem}. The file is corrupt or not the published one; download it again "
        f"({published})."
    )


def _find(data_dir: PathLike, name: str) -> Path:
    """The path of ``name`` in ``data_dir``, gzip-compressed (``name.gz``) or not."""
    data_dir = Path(data_dir)
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST file {name}.gz (or uncompressed {name}) not found in {data_dir}; "
        f"{_where(name + '.gz')}. Put the four IDX files in that directory."
    )


def _read_bytes(path: Path, published: str) -> bytes:
    """The file's content, gunzipped if it starts with the gzip magic bytes."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise _corrupt(path, f"cannot be decompressed as gzip ({exc})", published) from None
    return raw


def read_idx(
    path: PathLike,
    sha256: Optional[str] = None,
    shape: Optional[Tuple[int, ...]] = None,
) -> np.ndarray:
    """Read one IDX file (gzip-compressed or raw) into a numpy array.

    The header is checked: two zero bytes, a known element-type code, the number of dimensions,
    the dimensions themselves (against ``shape`` if given) and the payload length; if
    ``sha256`` is given, the sha256 of the uncompressed file must match.

    :param path: the file.
    :param sha256: expected hex digest of the uncompressed file, or ``None`` to skip.
    :param shape: expected dimensions, or ``None`` to accept any.
    :returns: an array of the file's dimensions in native byte order.
    :raises FileNotFoundError: if the file does not exist.
    :raises MNISTFileError: on a bad header, a wrong length or a checksum mismatch.
    """
    path = Path(path)
    published = _where(path.name if path.name.endswith(".gz") else path.name + ".gz")
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} not found; {published}")
    data = _read_bytes(path, published)
    if len(data) < 4:
        raise _corrupt(path, f"only {len(data)} bytes, too short for an IDX header", published)
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise _corrupt(
            path, f"bad IDX magic number 0x{data[:4].hex()} (expected 0x000008 followed by the "
            "number of dimensions, e.g. 0x00000803 for images)", published,
        )
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise _corrupt(path, f"truncated IDX header ({ndim} dimensions, {len(data)} bytes)", published)
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if shape is not None and dims != tuple(shape):
        raise _corrupt(path, f"IDX dimensions {dims}, expected {tuple(shape)}", published)
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise _corrupt(
            path, f"{problem}: {len(data)} bytes uncompressed, the header {dims} implies {expected}",
            published,
        )
    if sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256.lower():
            raise _corrupt(
                path, f"sha256 of the uncompressed file is {digest}, expected {sha256}", published
            )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def read_mnist_idx(data_dir: PathLike, name: str, verify: bool = True) -> np.ndarray:
    """Read one of the four published MNIST IDX files from ``data_dir`` by its name
    (e.g. ``"t10k-images-idx3-ubyte"``), checking its dimensions and, with ``verify``, its
    sha256. Labels are checked to lie in 0..9."""
    if name not in IDX_SHAPES:
        raise ValueError(f"unknown MNIST file {name!r}; choose one of {sorted(IDX_SHAPES)}")
    path = _find(data_dir, name)
    array = read_idx(path, IDX_SHA256[name] if verify else None, IDX_SHAPES[name])
    if array.ndim == 1 and array.size and array.max() > 9:
        raise _corrupt(path, f"label {int(array.max())} outside 0..9", _where(name + ".gz"))
    return array


def binarize_static(images: np.ndarray, seed: int, chunk: int = 10_000) -> np.ndarray:
    """Seeded static binarization: pixel ``i`` is 1 with probability ``images[i] / 255``.

    Uses ``numpy.random.default_rng(seed)`` and compares float64 uniforms with the
    intensities, chunk by chunk in row order (the result does not depend on ``chunk``).

    :param images: uint8 intensities 0..255, any shape.
    :returns: a uint8 array of 0/1 of the same shape.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"binarize_static expects uint8 intensities, got {images.dtype}")
    rng = np.random.default_rng(seed)
    flat = images.reshape(len(images), -1) if images.ndim > 1 else images.reshape(-1, 1)
    out = np.empty(flat.shape, dtype=np.uint8)
    chunk = max(1, int(chunk))
    for start in range(0, len(flat), chunk):
        block = flat[start:start + chunk]
        out[start:start + chunk] = rng.random(block.shape) * 255.0 < block
    return out.reshape(images.shape)


def dynamic_binarize(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Dynamic binarization of one batch: a fresh Bernoulli draw with probability ``x``
    (intensities in [0, 1], as :func:`load_mnist` returns with ``binarize="dynamic"``).

    Example::

        >>> x = torch.full((2, 3), 0.5)
        >>> b = dynamic_binarize(x, torch.Generator().manual_seed(0))
        >>> b.shape, set(b.unique().tolist()) <= {0.0, 1.0}
        (torch.Size([2, 3]), True)
    """
    return torch.bernoulli(x, generator=generator)


@dataclass
class MNISTSplits:
    """MNIST split 50k/10k/10k: images as ``(N, 784)`` float tensors (0/1 when binarized,
    intensities in [0, 1] otherwise), labels as int64 tensors (``None`` for the ``.amat``
    files, which have none).

    ``binarization`` is ``"static"``, ``"dynamic"`` (images are intensities: binarize each
    batch with :func:`dynamic_binarize`), ``"none"`` or ``"amat"`` (the published binarized
    files); ``seed`` is the static binarization's seed, ``source`` the directory read.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    train_labels: Optional[Tensor]
    valid_labels: Optional[Tensor]
    test_labels: Optional[Tensor]
    binarization: str
    seed: Optional[int]
    source: str

    def split(self, name: str) -> Tensor:
        """The images of ``"train"``, ``"valid"`` or ``"test"``."""
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {name!r}")
        return getattr(self, name)


def load_mnist(
    data_dir: PathLike,
    binarize: str = "static",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> MNISTSplits:
    """Load MNIST from the four published IDX files in ``data_dir`` (``.gz`` or uncompressed).

    Train is the first 50,000 images of the training file, valid its last 10,000 (the
    standard split), test the 10,000 t10k images. Images are flattened to 784 pixels.

    :param data_dir: directory holding the IDX files.
    :param binarize: ``"static"`` (default: Bernoulli with probability intensity/255, drawn
        once with ``seed``; the training file with ``seed``, the test file with ``seed + 1``),
        ``"dynamic"`` (intensities in [0, 1]; use :func:`dynamic_binarize` per batch) or
        ``"none"`` (intensities in [0, 1]).
    :param seed: seed of the static binarization.
    :param dtype: floating dtype of the images.
    :param verify: check the sha256 of each file (about a quarter of a second).
    :raises FileNotFoundError: a file is missing (the message says where it is published).
    :raises MNISTFileError: a file is corrupt.
    """
    if binarize not in BINARIZATIONS:
        raise ValueError(f"binarize={binarize!r} unknown; choose one of {BINARIZATIONS}")
    train_x = read_mnist_idx(data_dir, TRAIN_IMAGES, verify)
    train_y = read_mnist_idx(data_dir, TRAIN_LABELS, verify)
    test_x = read_mnist_idx(data_dir, TEST_IMAGES, verify)
    test_y = read_mnist_idx(data_dir, TEST_LABELS, verify)
    train_x = train_x.reshape(len(train_x), -1)
    test_x = test_x.reshape(len(test_x), -1)
    if binarize == "static":
        train_t = torch.from_numpy(binarize_static(train_x, seed)).to(dtype)
        test_t = torch.from_numpy(binarize_static(test_x, seed + 1)).to(dtype)
    else:
        train_t = torch.from_numpy(train_x).to(dtype) / 255.0
        test_t = torch.from_numpy(test_x).to(dtype) / 255.0
    train_l = torch.from_numpy(train_y.astype(np.int64))
    test_l = torch.from_numpy(test_y.astype(np.int64))
    return MNISTSplits(
        train=train_t[:NUM_TRAIN],
        valid=train_t[NUM_TRAIN:],
        test=test_t,
        train_labels=train_l[:NUM_TRAIN],
        valid_labels=train_l[NUM_TRAIN:],
        test_labels=test_l,
        binarization=binarize,
        seed=seed if binarize == "static" else None,
        source=str(Path(data_dir)),
    )


# -- the published statically binarized MNIST (.amat) ---------------------------------------
AMAT_FILES = {split: f"binarized_mnist_{split}.amat" for split in ("train", "valid", "test")}
AMAT_SIZES = {"train": NUM_TRAIN, "valid": NUM_VALID, "test": NUM_TEST}


def read_amat(path: PathLike, num_rows: Optional[int] = None, num_cols: int = NUM_PIXELS) -> np.ndarray:
    """Read a binarized-MNIST ``.amat`` file: one image per line, ``num_cols`` values 0 or 1
    separated by whitespace (a ``.gz`` file is decompressed). Blank lines are skipped.

    :param num_rows: expected number of images, or ``None`` to accept any.
    :returns: a uint8 array ``(N, num_cols)`` of 0/1.
    :raises FileNotFoundError: if the file does not exist.
    :raises MNISTFileError: on a line of the wrong length, a value other than 0/1, or a wrong
        number of lines.
    """
    path = Path(path)
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    published = _where(name, AMAT_URL, ())
    if not path.is_file():
        raise FileNotFoundError(f"binarized MNIST file {path} not found; {published}")
    text = _read_bytes(path, published)
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != num_cols:
            raise _corrupt(
                path, f"line {lineno} has {len(tokens)} values (expected {num_cols} values 0/1)",
                published,
            )
        joined = b"".join(tokens)
        row = np.frombuffer(joined, dtype=np.uint8) - ord("0")
        # one byte per value, each 0 or 1 (uint8 arithmetic wraps bytes below '0' to >1 too)
        if len(joined) != num_cols or row.max() > 1:
            bad = next(t for t in tokens if t not in (b"0", b"1"))
            raise _corrupt(
                path, f"line {lineno} holds {bad.decode(errors='replace')!r}, not 0 or 1", published
            )
        rows.append(row)
    if num_rows is not None and len(rows) != num_rows:
        raise _corrupt(path, f"{len(rows)} images, expected {num_rows}", published)
    if not rows:
        return np.zeros((0, num_cols), dtype=np.uint8)
    return np.stack(rows)


def load_binarized_mnist(data_dir: PathLike, dtype: torch.dtype = torch.float32) -> MNISTSplits:
    """Load the published statically binarized MNIST (Larochelle & Murray, 2011) from
    ``binarized_mnist_{train,valid,test}.amat`` in ``data_dir`` (or the same names with
    ``.gz``), 50k/10k/10k images of 784 values 0/1; there are no labels.

    :raises FileNotFoundError: a file is missing (the message says where it is published).
    :raises MNISTFileError: a file is malformed.
    """
    data_dir = Path(data_dir)
    splits = {}
    for split, name in AMAT_FILES.items():
        path = data_dir / name
        if not path.is_file() and (data_dir / f"{name}.gz").is_file():
            path = data_dir / f"{name}.gz"
        if not path.is_file():
            raise FileNotFoundError(
                f"binarized MNIST file {name} not found in {data_dir}; it is published at "
                f"{AMAT_URL}{name}"
            )
        splits[split] = torch.from_numpy(read_amat(path, AMAT_SIZES[split])).to(dtype)
    return MNISTSplits(
        train=splits["train"], valid=splits["valid"], test=splits["test"],
        train_labels=None, valid_labels=None, test_labels=None,
        binarization="amat", seed=None, source=str(data_dir),
    )


def amat_available(data_dir: PathLike) -> bool:
    """Whether ``data_dir`` holds the three published ``.amat`` files (or their ``.gz``)."""
    data_dir = Path(data_dir)
    return all(
        (data_dir / n).is_file() or (data_dir / f"{n}.gz").is_file() for n in AMAT_FILES.values()
    )


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


def write_amat(path: PathLike, images: np.ndarray) -> None:
    """Write 0/1 images ``(N, D)`` in the ``.amat`` text format (one image per line)."""
    images = np.asarray(images)
    buffer = io.StringIO()
    for row in images.reshape(len(images), -1):
        buffer.write(" ".join("1" if v else "0" for v in row))
        buffer.write("\n")
    Path(path).write_text(buffer.getvalue())
