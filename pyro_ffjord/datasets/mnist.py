"""MNIST from the published files: the IDX files, or the statically binarized ``.amat`` files.

One entry, :func:`load`, reads from a data directory the caller names (nothing is downloaded
and nothing is ever unpickled); its ``binarization`` argument says which files are read:

* ``"static"`` (default), ``"dynamic"`` or ``"none"``: the IDX files of LeCun & Cortes
  (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
  ``t10k-labels-idx1-ubyte.gz``; gzip-compressed as published or uncompressed), published at
  http://yann.lecun.com/exdb/mnist/ and mirrors (e.g. https://ossci-datasets.s3.amazonaws.com/mnist/).
  Each header (magic number, element type, dimensions), the payload length and the sha256 of
  the uncompressed file are checked (:mod:`.idx`). Split 50k/10k/10k: train = the first 50,000
  images of the training file, valid = its last 10,000, test = the t10k file.

  - ``"static"``: each pixel is drawn once, Bernoulli with probability intensity / 255, from a
    generator seeded with ``seed`` (:func:`.binarize.static`; the same seed gives the same bits
    on any machine; valid and test are thus fixed);
  - ``"dynamic"``: the intensities in [0, 1] are returned and each batch is re-drawn during
    training with :func:`.binarize.dynamic`;
  - ``"none"``: the intensities in [0, 1].

* ``"amat"``: the published statically binarized MNIST of Larochelle & Murray (2011),
  ``binarized_mnist_{train,valid,test}.amat`` (text, one image per line, 784 values 0/1;
  50k/10k/10k; :mod:`.amat`), published at
  http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/ — the data of the
  FFJORD paper's VAE table. There are no labels, and ``seed`` is not used.
  :func:`amat_available` says whether a directory holds them.

Example::

    data = load("../shared/data/mnist")        # seeded static binarization, seed 0
    data.train.shape, data.valid.shape, data.test.shape
    # (torch.Size([50000, 784]), torch.Size([10000, 784]), torch.Size([10000, 784]))
    grey = load("../shared/data/mnist", binarization="dynamic")   # intensities in [0, 1]
    x = binarize.dynamic(grey.train[:100])                        # one fresh batch
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import binarize
from .amat import read_amat
from .files import PathLike, corrupt, require_file
from .idx import read_idx

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
#: ``binarization`` values of :func:`load`: the first three read the IDX files, ``"amat"``
#: the published binarized ``.amat`` files.
BINARIZATIONS = ("static", "dynamic", "none", "amat")

AMAT_FILES = {split: f"binarized_mnist_{split}.amat" for split in ("train", "valid", "test")}
AMAT_SIZES = {"train": NUM_TRAIN, "valid": NUM_VALID, "test": NUM_TEST}


def idx_published(name: str) -> str:
    """Where the IDX file ``name`` (e.g. ``"t10k-images-idx3-ubyte.gz"``) is published."""
    return " or ".join(f"{url}{name}" for url in (IDX_URL, *IDX_MIRRORS))


def read_mnist_idx(data_dir: PathLike, name: str, verify: bool = True) -> np.ndarray:
    """Read one of the four published MNIST IDX files from ``data_dir`` by its name
    (e.g. ``"t10k-images-idx3-ubyte"``; ``name.gz`` or uncompressed ``name``), checking its
    dimensions and, with ``verify``, its sha256. Labels are checked to lie in 0..9.

    :raises DatasetFileMissing: the file is not in ``data_dir`` (says where it is published).
    :raises DatasetFileError: the file is corrupt or not the published one.
    """
    if name not in IDX_SHAPES:
        raise ValueError(f"unknown MNIST file {name!r}; choose one of {sorted(IDX_SHAPES)}")
    published = idx_published(name + ".gz")
    path = require_file(data_dir, name + ".gz", published, alternatives=(name,))
    array = read_idx(path, published, IDX_SHA256[name] if verify else None, IDX_SHAPES[name])
    if array.ndim == 1 and array.size and array.max() > 9:
        raise corrupt(path, f"label {int(array.max())} outside 0..9", published)
    return array


def read_binarized_mnist(data_dir: PathLike, split: str) -> np.ndarray:
    """Read ``binarized_mnist_{split}.amat`` (or the same name with ``.gz``) from ``data_dir``:
    uint8 0/1 ``(N, 784)``, ``N`` the published size of ``split`` (:data:`AMAT_SIZES`).

    :raises DatasetFileMissing: the file is not in ``data_dir`` (says where it is published).
    :raises DatasetFileError: the file is malformed.
    """
    name = AMAT_FILES[split]
    published = AMAT_URL + name
    path = require_file(data_dir, name, published, alternatives=(name + ".gz",))
    return read_amat(path, published, AMAT_SIZES[split], NUM_PIXELS)


def amat_available(data_dir: PathLike) -> bool:
    """Whether ``data_dir`` holds the three published ``.amat`` files (or their ``.gz``)."""
    data_dir = Path(data_dir)
    return all(
        (data_dir / n).is_file() or (data_dir / f"{n}.gz").is_file() for n in AMAT_FILES.values()
    )


@dataclass
class MNISTSplits:
    """MNIST split 50k/10k/10k: images as ``(N, 784)`` float tensors (0/1 when binarized,
    intensities in [0, 1] otherwise), labels as int64 tensors (``None`` for the ``.amat``
    files, which have none).

    ``binarization`` is the argument of :func:`load`: ``"static"``, ``"dynamic"`` (images are
    intensities: binarize each batch with :func:`.binarize.dynamic`), ``"none"`` or ``"amat"``
    (the published binarized files); ``seed`` is the static binarization's seed (``None``
    otherwise), ``source`` the directory read.
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


def load(
    data_dir: PathLike,
    binarization: str = "static",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
) -> MNISTSplits:
    """Load MNIST from ``data_dir``: the IDX files, or the ``.amat`` files for
    ``binarization="amat"`` (see the module's docstring for both).

    :param data_dir: directory holding the files.
    :param binarization: ``"static"`` (default: Bernoulli with probability intensity/255,
        drawn once with ``seed``; the training file with ``seed``, the test file with
        ``seed + 1``), ``"dynamic"`` (intensities in [0, 1]; use :func:`.binarize.dynamic` per
        batch), ``"none"`` (intensities in [0, 1]) or ``"amat"`` (the published static
        binarization of Larochelle & Murray, read from ``binarized_mnist_*.amat``; no labels).
    :param seed: seed of the static binarization (unused otherwise).
    :param dtype: floating dtype of the images.
    :param verify: check the sha256 of each IDX file (about a quarter of a second); the
        ``.amat`` files have no published checksum and are checked line by line instead.
    :raises DatasetFileMissing: a file is missing (the message says where it is published).
    :raises DatasetFileError: a file is corrupt.
    """
    if binarization not in BINARIZATIONS:
        raise ValueError(f"binarization={binarization!r} unknown; choose one of {BINARIZATIONS}")
    if binarization == "amat":
        x = {split: torch.from_numpy(read_binarized_mnist(data_dir, split)).to(dtype) for split in AMAT_FILES}
        return MNISTSplits(
            train=x["train"], valid=x["valid"], test=x["test"],
            train_labels=None, valid_labels=None, test_labels=None,
            binarization="amat", seed=None, source=str(Path(data_dir)),
        )
    train_x = read_mnist_idx(data_dir, TRAIN_IMAGES, verify)
    train_y = read_mnist_idx(data_dir, TRAIN_LABELS, verify)
    test_x = read_mnist_idx(data_dir, TEST_IMAGES, verify)
    test_y = read_mnist_idx(data_dir, TEST_LABELS, verify)
    train_x = train_x.reshape(len(train_x), -1)
    test_x = test_x.reshape(len(test_x), -1)
    if binarization == "static":
        train_t = torch.from_numpy(binarize.static(train_x, seed, scale=255.0)).to(dtype)
        test_t = torch.from_numpy(binarize.static(test_x, seed + 1, scale=255.0)).to(dtype)
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
        binarization=binarization,
        seed=seed if binarization == "static" else None,
        source=str(Path(data_dir)),
    )
