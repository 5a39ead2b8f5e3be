"""Reading images from MATLAB ``.mat`` files (Caltech 101 silhouettes, Omniglot ``chardata.mat``)
with ``scipy.io.loadmat``, checking each variable's shape and values.

Both data sets store each 28x28 image column-major (MATLAB's order): a flat image is reshaped
``(28, 28)`` in Fortran order. Caltech stores one image per row, Omniglot one per column
(``images_in_columns=True``); both are returned as rows in row-major pixel order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .files import corrupt

#: value kinds of :func:`mat_images`: 0/1 pixels (returned as uint8) or grey levels in [0, 1]
#: (returned as float32).
VALUES = ("binary", "unit")


def load_mat(path: Path, published: str) -> dict:
    """``scipy.io.loadmat(path)``; a file scipy cannot read raises :class:`DatasetFileError`
    naming it and where it is published."""
    from scipy.io import loadmat  # scipy is needed only for these files

    try:
        return loadmat(str(path))
    except Exception as exc:  # scipy raises several types on malformed files
        problem = f"cannot be read as a MATLAB file ({type(exc).__name__}: {exc})"
        raise corrupt(path, problem, published) from exc


def mat_images(
    path: Path,
    mat: dict,
    key: str,
    published: str,
    count: Optional[int],
    image_shape: Tuple[int, int] = (28, 28),
    images_in_columns: bool = False,
    values: str = "binary",
) -> np.ndarray:
    """The images of ``mat[key]`` as rows ``(N, H * W)`` in row-major pixel order.

    :param path: the file ``mat`` was read from (named in errors).
    :param key: the variable: ``(N, H * W)``, or ``(H * W, N)`` with ``images_in_columns``;
        each image column-major.
    :param published: where the file is published (named in errors).
    :param count: the expected number of images ``N``, or ``None`` to accept any.
    :param values: ``"binary"`` (only 0 and 1, returned as uint8) or ``"unit"`` (numbers in
        [0, 1], returned as float32).
    :raises DatasetFileError: no such variable, a wrong shape, or values of the wrong kind.
    """
    if values not in VALUES:
        raise ValueError(f"values={values!r}: choose one of {VALUES}")
    if key not in mat:
        present = sorted(k for k in mat if not k.startswith("__"))
        raise corrupt(path, f"no variable {key!r} (the file has {present})", published)
    x = np.asarray(mat[key])
    pixels = int(np.prod(image_shape))
    n = count if count is not None else "N"
    axis, want = (1, f"({pixels}, {n})") if images_in_columns else (0, f"({n}, {pixels})")
    if x.ndim != 2 or x.shape[1 - axis] != pixels or (count is not None and x.shape[axis] != count):
        raise corrupt(path, f"{key} has shape {x.shape}, expected {want}", published)
    if values == "binary":
        if not np.isin(x, (0, 1)).all():
            raise corrupt(path, f"{key} holds values other than 0 and 1", published)
        x = x.astype(np.uint8)
    else:
        if x.dtype.kind not in "biuf":
            raise corrupt(path, f"{key} has dtype {x.dtype}, expected numbers in [0, 1]", published)
        x = x.astype(np.float32)  # checked after the cast: the values returned are in range
        if not np.isfinite(x).all() or x.min(initial=0) < 0 or x.max(initial=0) > 1:
            raise corrupt(path, f"{key} holds values outside [0, 1]", published)
    if images_in_columns:
        x = x.T
    x = x.reshape((-1, *image_shape), order="F")
    return np.ascontiguousarray(x).reshape(-1, pixels)
