"""Omniglot 28x28 as published with the IWAE code (Burda et al., 2016): ``chardata.mat``.

File: ``chardata.mat`` (MATLAB, read with ``scipy.io.loadmat``), published at
https://github.com/yburda/iwae/tree/master/datasets/OMNIGLOT. Variables: ``data`` (784, 24345)
and ``testdata`` (784, 8070), grey levels in [0, 1], one image per column, each column a 28x28
image stored column-major (the IWAE convention: ``data.T.reshape((-1, 28, 28), order="F")``);
``target`` (50, 24345) and ``testtarget`` (50, 8070), one-hot alphabets (optional here).

Splits and binarization follow the FFJORD / Sylvester-flows code:

* the training columns are shuffled (``numpy.random.RandomState(seed).permutation``; the
  reference shuffles with its run's seed) and the last 1345 become the validation set;
* train is returned as grey levels in [0, 1], to be re-binarized every batch with
  :func:`pyro_ffjord.datasets.binarize.dynamic`;
* valid and test are binarized once, Bernoulli with probability the grey level, from
  ``numpy.random.default_rng([binarize_seed, 0])`` and ``([binarize_seed, 1])``
  (:func:`pyro_ffjord.datasets.binarize.static`) — the reference's seed is 777 (its draws are
  not reproduced bit for bit); the test set's bits do not depend on ``seed``.

No checksum of the published file is known here (:data:`SHA256` is ``None``; pass one to
:func:`read_chardata` to check it).

Example::

    data = load("data/omniglot")                # chardata.mat in that directory
    data.train.shape, data.valid.shape, data.test.shape
    # (torch.Size([23000, 784]), torch.Size([1345, 784]), torch.Size([8070, 784]))
    x = binarize.dynamic(data.train[:100])       # one fresh batch of 0/1
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from . import binarize
from .files import PathLike, check_sha256, require_file
from .matfile import load_mat, mat_images

FILENAME = "chardata.mat"
PUBLISHED = "https://github.com/yburda/iwae/tree/master/datasets/OMNIGLOT (chardata.mat)"
SHA256: Optional[str] = None
IMAGE_SHAPE = (28, 28)
NUM_PIXELS = 784
NUM_TRAIN_FILE, NUM_TEST = 24345, 8070
NUM_VALID = 1345
REFERENCE_BINARIZE_SEED = 777


def _images(path: Path, mat: dict, key: str, count: Optional[int]) -> np.ndarray:
    """``mat[key]`` (784, N) column-major images -> float32 ``(N, 784)`` in row-major order."""
    return mat_images(
        path, mat, key, PUBLISHED, count, IMAGE_SHAPE, images_in_columns=True, values="unit"
    )


def _alphabets(mat: dict, key: str, count: int) -> Optional[np.ndarray]:
    """Alphabet index 0..49 from a one-hot ``(50, N)`` variable, or ``None`` if absent/odd."""
    y = np.asarray(mat.get(key, np.zeros((0, 0))))
    if y.ndim != 2 or y.shape[1] != count or y.shape[0] == 0:
        return None
    return y.argmax(0).astype(np.int64)


def read_chardata(
    path: PathLike, sha256: Optional[str] = SHA256, strict_sizes: bool = True
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Read ``chardata.mat``.

    :param sha256: expected sha256 of the file as stored, or ``None`` to skip.
    :param strict_sizes: require the published 24345 training and 8070 test images.
    :returns: ``(train, test, train_alphabets, test_alphabets)``: float32 grey levels
        ``(N, 784)`` in row-major pixel order, and alphabet indices (``None`` if the file has
        no ``target``/``testtarget``).
    :raises DatasetFileMissing: the file does not exist.
    :raises DatasetFileError: unreadable, wrong checksum, missing variable, wrong shape/values.
    """
    path = Path(path)
    require_file(path.parent, path.name, PUBLISHED)
    check_sha256(path, sha256, PUBLISHED)
    mat = load_mat(path, PUBLISHED)
    train = _images(path, mat, "data", NUM_TRAIN_FILE if strict_sizes else None)
    test = _images(path, mat, "testdata", NUM_TEST if strict_sizes else None)
    return train, test, _alphabets(mat, "target", len(train)), _alphabets(mat, "testtarget", len(test))


@dataclass
class OmniglotSplits:
    """Omniglot split 23000/1345/8070 (for the published file): ``train`` grey levels in
    [0, 1] (binarize each batch with :func:`binarize.dynamic`), ``valid``/``test`` 0/1, all
    ``(N, 784)`` (reshape to :data:`IMAGE_SHAPE`); alphabet indices 0..49 or ``None``."""

    train: Tensor
    valid: Tensor
    test: Tensor
    train_alphabets: Optional[Tensor]
    valid_alphabets: Optional[Tensor]
    test_alphabets: Optional[Tensor]
    seed: Optional[int]
    binarize_seed: int
    source: str
    info: dict = field(default_factory=dict)


def load(
    data_dir: PathLike,
    seed: int = 0,
    binarize_seed: int = REFERENCE_BINARIZE_SEED,
    shuffle: bool = True,
    num_valid: int = NUM_VALID,
    dtype: torch.dtype = torch.float32,
    strict_sizes: bool = True,
    sha256: Optional[str] = SHA256,
) -> OmniglotSplits:
    """Load ``chardata.mat`` from ``data_dir`` with the paper's splits and binarization.

    :param seed: seed of the shuffle of the training file before its last ``num_valid``
        images are set aside for validation.
    :param binarize_seed: seed of the one-off binarization of valid and test.
    :param shuffle: ``False`` takes the last ``num_valid`` images of the file as they stand.
    :param strict_sizes: require the published image counts.
    """
    path = require_file(data_dir, FILENAME, PUBLISHED)
    train, test, train_a, test_a = read_chardata(path, sha256, strict_sizes)
    if not 0 < num_valid < len(train):
        raise ValueError(f"num_valid={num_valid} must be in 1..{len(train) - 1}")
    order = np.random.RandomState(seed).permutation(len(train)) if shuffle else np.arange(len(train))
    fit, val = order[:-num_valid], order[-num_valid:]

    def labels(a: Optional[np.ndarray], rows) -> Optional[Tensor]:
        return None if a is None else torch.from_numpy(a[rows])

    valid_bits = binarize.static(train[val], [binarize_seed, 0])
    test_bits = binarize.static(test, [binarize_seed, 1])
    return OmniglotSplits(
        train=torch.from_numpy(train[fit]).to(dtype),
        valid=torch.from_numpy(valid_bits).to(dtype),
        test=torch.from_numpy(test_bits).to(dtype),
        train_alphabets=labels(train_a, fit), valid_alphabets=labels(train_a, val),
        test_alphabets=None if test_a is None else torch.from_numpy(test_a),
        seed=seed if shuffle else None, binarize_seed=binarize_seed, source=str(path),
        info={
            "source": str(path),
            "split": f"last {num_valid} of the training file after "
                     + (f"RandomState({seed}).permutation" if shuffle else "no shuffle") + " = valid",
            "binarization": f"train dynamic (per batch); valid/test once, seed {binarize_seed}",
        },
    )
