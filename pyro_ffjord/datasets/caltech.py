"""Caltech 101 silhouettes (Marlin et al., 2010): 8671 binary 28x28 silhouettes of 101 classes.

Both published MATLAB files (read with ``scipy.io.loadmat``) are published at
https://people.cs.umass.edu/~marlin/data.shtml:

* ``caltech101_silhouettes_28_split1.mat`` — the split used by the FFJORD, Sylvester-flows and
  VampPrior VAE experiments: ``train_data`` (4100, 784), ``val_data`` (2264, 784),
  ``test_data`` (2307, 784), ``train_labels``/``val_labels``/``test_labels`` (1..101) and
  ``classnames``. Read when present in the data directory (``split == "split1"``).
* ``caltech101_silhouettes_28.mat`` — the same 8671 images unsplit: ``X`` (8671, 784) uint8
  {0, 1}, ``Y`` (1, 8671) classes 1..101 (sorted by class), ``classnames``. Used otherwise, with
  a random split of the same sizes drawn by ``numpy.random.default_rng(seed)``
  (``split == "random"``): it approximates the paper's split but is not it, so results must
  say which was used (:attr:`CaltechSplits.split`, ``info["split"]``).

In both files each row is a 28x28 image stored column-major (reshape ``(28, 28)`` in Fortran
order) with 1 = background. As the reference code, rows are returned in row-major pixel order
and inverted (``invert=True``: 1 = silhouette).

Example::

    data = load("../shared/data/caltech101_silhouettes")   # no split1 here: seeded split
    data.split, data.train.shape, data.valid.shape, data.test.shape
    # ('random', torch.Size([4100, 784]), torch.Size([2264, 784]), torch.Size([2307, 784]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .files import DatasetFileMissing, PathLike, check_sha256, corrupt, require_file
from .matfile import load_mat, mat_images

PUBLISHED = "https://people.cs.umass.edu/~marlin/data.shtml"
SPLIT_FILE = "caltech101_silhouettes_28_split1.mat"
UNSPLIT_FILE = "caltech101_silhouettes_28.mat"
#: sha256 of the files as stored; the split1 file's is not known here (``None``: not checked).
SHA256: Dict[str, Optional[str]] = {
    UNSPLIT_FILE: "862d0a4b828256d54ad5de7c5066c18c72f355cac5b7cde4c1c3be7c000d180b",
    SPLIT_FILE: None,
}
IMAGE_SHAPE = (28, 28)
NUM_PIXELS = 784
NUM_IMAGES = 8671
NUM_CLASSES = 101
SIZES = {"train": 4100, "valid": 2264, "test": 2307}
_SPLIT_KEYS = {"train": "train", "valid": "val", "test": "test"}


def _images(path: Path, mat: dict, key: str, rows: Optional[int]) -> np.ndarray:
    """``mat[key]`` as uint8 0/1 rows ``(rows, 784)`` in row-major pixel order (the file is
    column-major)."""
    return mat_images(path, mat, key, PUBLISHED, rows, IMAGE_SHAPE, values="binary")


def _labels(path: Path, mat: dict, key: str, rows: int) -> np.ndarray:
    if key not in mat:
        raise corrupt(path, f"no variable {key!r}", PUBLISHED)
    y = np.asarray(mat[key]).reshape(-1)
    if y.size != rows or y.min(initial=1) < 1 or y.max(initial=1) > NUM_CLASSES:
        raise corrupt(path, f"{key}: {y.size} labels in {y.min(initial=0)}..{y.max(initial=0)}, "
                            f"expected {rows} in 1..{NUM_CLASSES}", PUBLISHED)
    return y.astype(np.int64)


def _classnames(mat: dict) -> Optional[Tuple[str, ...]]:
    if "classnames" not in mat:
        return None
    return tuple(str(np.asarray(c).reshape(-1)[0]) for c in np.asarray(mat["classnames"]).reshape(-1))


def read_split1(
    path: PathLike, sha256: Optional[str] = SHA256[SPLIT_FILE], strict_sizes: bool = True
) -> dict:
    """Read ``caltech101_silhouettes_28_split1.mat``.

    :param strict_sizes: require the published sizes 4100/2264/2307.
    :returns: ``{"train": (x, y), "valid": (x, y), "test": (x, y), "classnames": ...}`` with
        ``x`` uint8 0/1 ``(N, 784)`` in row-major pixel order (not inverted) and ``y`` int64
        classes 1..101.
    """
    path = Path(path)
    require_file(path.parent, path.name, PUBLISHED)
    check_sha256(path, sha256, PUBLISHED)
    mat = load_mat(path, PUBLISHED)
    out: dict = {"classnames": _classnames(mat)}
    for split, key in _SPLIT_KEYS.items():
        x = _images(path, mat, f"{key}_data", SIZES[split] if strict_sizes else None)
        out[split] = (x, _labels(path, mat, f"{key}_labels", len(x)))
    return out


def read_unsplit(
    path: PathLike, sha256: Optional[str] = SHA256[UNSPLIT_FILE]
) -> Tuple[np.ndarray, np.ndarray, Optional[Tuple[str, ...]]]:
    """Read ``caltech101_silhouettes_28.mat``: ``(X, Y, classnames)`` with ``X`` uint8 0/1
    ``(8671, 784)`` in row-major pixel order (not inverted), ``Y`` int64 classes 1..101."""
    path = Path(path)
    require_file(path.parent, path.name, PUBLISHED)
    check_sha256(path, sha256, PUBLISHED)
    mat = load_mat(path, PUBLISHED)
    x = _images(path, mat, "X", NUM_IMAGES)
    return x, _labels(path, mat, "Y", NUM_IMAGES), _classnames(mat)


def random_split_indices(seed: int = 0, n: int = NUM_IMAGES) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of train/valid/test for the seeded split of the unsplit file:
    ``numpy.random.default_rng(seed).permutation(n)`` cut into 4100/2264/2307.

    Example::

        >>> [len(i) for i in random_split_indices(0)]
        [4100, 2264, 2307]
    """
    if n != sum(SIZES.values()):
        raise ValueError(f"the split needs {sum(SIZES.values())} images, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    a, b = SIZES["train"], SIZES["train"] + SIZES["valid"]
    return order[:a], order[a:b], order[b:]


@dataclass
class CaltechSplits:
    """Caltech 101 silhouettes split 4100/2264/2307: images ``(N, 784)`` (reshape to
    :data:`IMAGE_SHAPE`) as 0/1 tensors, labels int64 classes 1..101.

    ``split`` is ``"split1"`` (the published split file, as the paper) or ``"random"`` (a
    seeded split of the unsplit file, ``seed``); ``info["split"]`` says it in words.
    """

    train: Tensor
    valid: Tensor
    test: Tensor
    train_labels: Tensor
    valid_labels: Tensor
    test_labels: Tensor
    split: str
    seed: Optional[int]
    source: str
    classnames: Optional[Tuple[str, ...]] = None
    info: dict = field(default_factory=dict)


def load(
    data_dir: PathLike,
    seed: int = 0,
    invert: bool = True,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    source: str = "auto",
) -> CaltechSplits:
    """Load Caltech 101 silhouettes from ``data_dir``.

    :param seed: seed of the random split (used only without the split1 file).
    :param invert: ``1 - x`` as the reference code (1 = silhouette, 0 = background).
    :param verify: check the sha256 where known.
    :param source: ``"auto"`` (split1 if present, else the unsplit file), ``"split1"`` or
        ``"random"`` (the unsplit file with a seeded split, even if split1 is present).
    :raises DatasetFileMissing: neither file is present (names both and where they are published).
    """
    if source not in ("auto", "split1", "random"):
        raise ValueError(f"source={source!r}: choose 'auto', 'split1' or 'random'")
    data_dir = Path(data_dir)
    use_split1 = source == "split1" or (source == "auto" and (data_dir / SPLIT_FILE).is_file())
    if use_split1:
        path = require_file(data_dir, SPLIT_FILE, PUBLISHED)
        parts = read_split1(path, SHA256[SPLIT_FILE] if verify else None)
        splits = {k: parts[k] for k in SIZES}
        names, used_seed = parts["classnames"], None
        words = f"published split1 ({SPLIT_FILE}), as the paper"
    else:
        if source == "auto" and not (data_dir / UNSPLIT_FILE).is_file():
            raise DatasetFileMissing(
                f"neither {SPLIT_FILE} nor the unsplit {UNSPLIT_FILE} found in {data_dir}; both "
                f"are published at {PUBLISHED}"
            )
        path = require_file(data_dir, UNSPLIT_FILE, PUBLISHED)
        x, y, names = read_unsplit(path, SHA256[UNSPLIT_FILE] if verify else None)
        splits = {k: (x[i], y[i]) for k, i in zip(SIZES, random_split_indices(seed))}
        used_seed = seed
        words = (f"random 4100/2264/2307 split of the unsplit {UNSPLIT_FILE} "
                 f"(default_rng({seed}).permutation); approximates, is not, the paper's split1")

    def images(x: np.ndarray) -> Tensor:
        return torch.from_numpy(1 - x if invert else x).to(dtype)

    return CaltechSplits(
        train=images(splits["train"][0]), valid=images(splits["valid"][0]), test=images(splits["test"][0]),
        train_labels=torch.from_numpy(splits["train"][1]), valid_labels=torch.from_numpy(splits["valid"][1]),
        test_labels=torch.from_numpy(splits["test"][1]),
        split="split1" if use_split1 else "random", seed=used_seed, source=str(path), classnames=names,
        info={"split": words, "source": str(path), "inverted": invert, "split_seed": used_seed},
    )

