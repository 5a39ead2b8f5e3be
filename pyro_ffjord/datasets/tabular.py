"""Tabular density-estimation data sets as train/valid/test tensors: the pieces the readers share,
one bundled data set, and :func:`load`, which dispatches by name.

The five data sets of the FFJORD paper's density table (POWER 6-D, GAS 8-D, HEPMASS 21-D,
MINIBOONE 43-D, BSDS300 63-D) are read from MAF's published files and preprocessed exactly as
MAF's code does by :mod:`pyro_ffjord.datasets.maf_tabular`, which documents every step. This
module holds :class:`TabularSplits` (what every reader returns), MAF's split rule
(:func:`maf_split_sizes`), the file lookup and checks, and ``breast_cancer``.

``breast_cancer``: the Wisconsin diagnostic breast-cancer table bundled with scikit-learn (569
rows, 30 continuous features; nothing is downloaded), so that a tabular example runs end to end
without MAF's files. Why this one of the tables scikit-learn bundles: its 30 features are
continuous measurements, like MAF's sets; ``load_digits`` (64-D) holds 8x8 images with 17 grey
levels, so it needs dequantization, is an image set rather than a table, and three of its pixels
are always 0 (standard deviation 0: MAF's normalisation is undefined for them); ``load_wine``
(13-D) has only 178 rows (17 test rows). Caveats: 569 rows is small (462 train rows), and six of
its features are exactly 0 in the same 13 rows (no concavity measured), a small point mass
that a density model can exploit. Split: rows shuffled with ``numpy.random.RandomState(seed)``
(legacy generator, stream-stable across numpy versions), then MAF's rule (10% test, 10% of the
rest valid, taken from the end); normalised by the training rows' mean and standard deviation
(``ddof=0``), so valid and test stay unseen.

Example::

    >>> data = load("breast_cancer")
    >>> data.dim, len(data.train), len(data.valid), len(data.test)
    (30, 462, 51, 56)
    >>> bool(data.train.mean(0).abs().max() < 1e-5)
    True

    power = load("power", "data")            # MAF's data/ folder, or data/power itself
    power.train.shape                        # torch.Size([1659917, 6])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .files import PathLike, corrupt, require_file

#: Where MAF's preprocessed files are published: ``data.tar.gz`` unpacks to ``data/<set>/...``.
ZENODO = "https://zenodo.org/record/1161203"
#: Dimensions after preprocessing (the FFJORD and MAF papers' tables).
DIMS: Dict[str, int] = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63, "breast_cancer": 30}
#: Train/valid/test sizes of the published files (MAF paper, appendix); the readers reproduce them.
PUBLISHED_SIZES: Dict[str, Tuple[int, int, int]] = {
    "power": (1_659_917, 184_435, 204_928),
    "gas": (852_174, 94_685, 105_206),
    "hepmass": (315_123, 35_013, 174_987),
    "miniboone": (29_556, 3_284, 3_648),
    "bsds300": (1_000_000, 50_000, 250_000),
}
NAMES = tuple(DIMS)
BREAST_CANCER_SEED = 42


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == has no single truth value
class TabularSplits:
    """Train/valid/test rows ``(N, dim)`` of one data set, preprocessed as published.

    ``mean``/``std`` are the per-column statistics the data were normalised with (float64;
    ``x * std + mean`` undoes it), ``None`` where the data set is used as stored (BSDS300).
    ``source`` is the file read; ``info`` says what was done to it.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    name: str = ""
    mean: Optional[Tensor] = None
    std: Optional[Tensor] = None
    source: str = ""
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Number of columns."""
        return int(self.train.shape[1])

    @property
    def sizes(self) -> Tuple[int, int, int]:
        """Rows in train, valid and test."""
        return len(self.train), len(self.valid), len(self.test)


def maf_split_sizes(n: int) -> Tuple[int, int, int]:
    """MAF's split of ``n`` rows: ``int(0.1 * n)`` test rows, then ``int(0.1 * rest)`` valid rows
    (both taken from the end, in that order), the first rows train.

    Example (POWER's 2,049,280 rows give the published sizes)::

        >>> maf_split_sizes(2_049_280) == PUBLISHED_SIZES["power"]
        True
        >>> maf_split_sizes(200)
        (162, 18, 20)
    """
    n_test = int(0.1 * n)  # the float product then int(), as MAF's code computes it
    n_valid = int(0.1 * (n - n_test))
    return n - n_test - n_valid, n_valid, n_test


def split_tail(x: np.ndarray, path: PathLike, published: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``x``'s rows cut by :func:`maf_split_sizes` (order kept: train, valid, test).

    :raises DatasetFileError: too few rows for every split to have one (MAF's slicing
        ``x[-0:]`` would silently make the "test" split the whole table).
    """
    n_train, n_valid, n_test = maf_split_sizes(len(x))
    if min(n_train, n_valid, n_test) < 1:
        raise corrupt(path, f"{len(x)} rows are too few to split 80/10/10", published)
    return x[:n_train], x[n_train:n_train + n_valid], x[n_train + n_valid:]


def find_data_file(data_dir: PathLike, name: str, subfolder: str, published: str) -> Path:
    """``data_dir/name`` (``data_dir`` is the data set's own folder) or ``data_dir/subfolder/name``
    (``data_dir`` is MAF's ``data/`` folder).

    :raises DatasetFileMissing: neither is a file; the message names the file, the folder
        searched and where it is published.
    """
    return require_file(data_dir, name, published, alternatives=(f"{subfolder}/{name}",))


def check_table(x: Any, path: PathLike, published: str, columns: Optional[int] = None,
                what: str = "the array") -> np.ndarray:
    """``x`` as a float64 copy after checking it is a 2-D floating array (with ``columns``
    columns, when given) of finite values.

    :raises DatasetFileError: naming ``path`` and what is wrong.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        shape = getattr(x, "shape", type(x).__name__)
        raise corrupt(path, f"{what} has shape {shape}, expected a 2-D table (rows, columns)", published)
    if x.dtype.kind != "f":
        raise corrupt(path, f"{what} has dtype {x.dtype}, expected floating point", published)
    if columns is not None and x.shape[1] != columns:
        raise corrupt(path, f"{what} has {x.shape[1]} columns, expected {columns}", published)
    if len(x) == 0:
        raise corrupt(path, f"{what} has no rows", published)
    if not np.isfinite(x).all():
        raise corrupt(path, f"{what} holds non-finite values (NaN or inf)", published)
    return x.astype(np.float64, copy=False)  # the callers never write into it


def standardise(x: np.ndarray, mean: np.ndarray, std: np.ndarray, path: PathLike, published: str) -> np.ndarray:
    """``(x - mean) / std``; a column of standard deviation 0 cannot be normalised."""
    if not (std > 0).all():
        raise corrupt(path, f"columns {np.flatnonzero(~(std > 0)).tolist()} are constant (std 0)", published)
    return (x - mean) / std


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype {dtype}: tabular data are float32 (the default, as MAF) or float64")


def make_splits(name: str, arrays: Tuple[np.ndarray, np.ndarray, np.ndarray], dtype: torch.dtype,
                path: PathLike, published: str, mean: Optional[np.ndarray] = None,
                std: Optional[np.ndarray] = None, **info: Any) -> TabularSplits:
    """The float64 arrays as tensors of ``dtype`` (float32 rounds them, as MAF's ``astype``), after
    checking the preprocessing left the published number of columns."""
    width = arrays[0].shape[1]
    if width != DIMS[name]:
        raise corrupt(path, f"preprocessing leaves {width} columns, {name} has {DIMS[name]}", published)
    tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(dtype) for a in arrays]
    stats = [None if s is None else torch.from_numpy(np.asarray(s, dtype=np.float64)) for s in (mean, std)]
    return TabularSplits(*tensors, name=name, mean=stats[0], std=stats[1], source=str(path),
                         info={"published": published, **info})


def load_breast_cancer(seed: int = BREAST_CANCER_SEED, dtype: torch.dtype = torch.float32) -> TabularSplits:
    """scikit-learn's bundled breast-cancer table (569 x 30), shuffled with
    ``RandomState(seed)``, split by :func:`maf_split_sizes` (462/51/56) and normalised by the
    training rows' statistics (see the module docstring for why this data set)."""
    check_dtype(dtype)
    try:
        from sklearn.datasets import load_breast_cancer as bundled
    except ImportError:
        raise ImportError("the breast_cancer data set ships with scikit-learn: pip install scikit-learn") from None
    source = "sklearn.datasets.load_breast_cancer"
    x = bundled().data.astype(np.float64)
    x = x[np.random.RandomState(seed).permutation(len(x))]
    train, valid, test = split_tail(x, source, source)
    mean, std = train.mean(axis=0), train.std(axis=0)
    arrays = tuple(standardise(a, mean, std, source, source) for a in (train, valid, test))
    return make_splits("breast_cancer", arrays, dtype, source, source, mean, std, seed=seed,
                       steps="RandomState(seed) shuffle; MAF's 10%/10% split; normalised by train mean/std")


def load(name: str, data_dir: Optional[PathLike] = None, dtype: torch.dtype = torch.float32,
         **kwargs: Any) -> TabularSplits:
    """Load a tabular data set by name: ``"power"``, ``"gas"``, ``"hepmass"``, ``"miniboone"``,
    ``"bsds300"`` (from ``data_dir``: the data set's own folder or MAF's ``data/`` folder) or
    ``"breast_cancer"`` (bundled, ``data_dir`` unused). ``kwargs`` go to the reader."""
    key = name.lower()
    if key == "breast_cancer":
        return load_breast_cancer(dtype=dtype, **kwargs)
    # Imported here, not at the top: maf_tabular imports this module's shared pieces.
    from . import maf_tabular

    readers = {"power": maf_tabular.load_power, "gas": maf_tabular.load_gas, "hepmass": maf_tabular.load_hepmass,
               "miniboone": maf_tabular.load_miniboone, "bsds300": maf_tabular.load_bsds300}
    if key not in readers:
        raise ValueError(f"unknown tabular data set {name!r}; known: {', '.join(NAMES)}")
    if data_dir is None:
        raise ValueError(f"{key} is read from MAF's files: pass data_dir (they are published at {ZENODO})")
    return readers[key](data_dir, dtype=dtype, **kwargs)
