"""Frey faces (Brendan Frey's face, 1965 grey images of 28x20 pixels) from the published pickle.

File: ``freyfaces.pkl``, the file read by the Sylvester-flows, VampPrior and FFJORD VAE code
(published in the Sylvester-flows repository, :data:`PUBLISHED`; the same images are in
Roweis' ``frey_rawface.mat``). It is a Python-2, protocol-0 pickle of a list holding one uint8
array ``(1965, 560)``; each row is a 28x20 face in row-major order, values 8..238.

The pickle is read by :class:`RestrictedUnpickler`, which admits only numpy array
reconstruction (``_reconstruct``, ``ndarray``, numeric ``dtype``; and ``_codecs.encode`` with
latin-1 only, which Python 3 uses for bytes in protocols 0-2): any other global — ``os.system``,
``builtins.eval``, ... — is refused before anything runs. With ``verify=True`` (the default)
the file's sha256 is checked *before* unpickling, so only the published bytes reach the
unpickler. Plain ``pickle.load`` is never used.

Split (as the reference code): the images are shuffled with ``numpy.random.RandomState(seed)``
(the legacy generator, stream-stable across numpy versions, so ``seed=123`` reproduces the
reference's default split exactly; the paper used seeds 123, 321 and 231), then the first 1565
are train, the next 200 valid, the last 200 test.

Example::

    data = load("../shared/data/freyfaces")            # uint8 pixel values 0..255, seed 123
    data.train.shape, data.valid.shape, data.test.shape
    # (torch.Size([1565, 560]), torch.Size([200, 560]), torch.Size([200, 560]))
    faces = data.train.reshape(-1, *IMAGE_SHAPE)        # (1565, 28, 20)
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .files import DatasetFileError, PathLike, check_sha256, corrupt, require_file

FILENAME = "freyfaces.pkl"
#: sha256 of ``freyfaces.pkl`` as stored (the published file, 3,568,521 bytes).
SHA256 = "3b69410c6a5fd6e03f09012905168be3712373a094a776f7e58fcd0670d2138a"
PUBLISHED = (
    "https://github.com/riannevdberg/sylvester-flows (data/Freyfaces/freyfaces.pkl); the same "
    "images as https://cs.nyu.edu/~roweis/data/frey_rawface.mat"
)
IMAGE_SHAPE = (28, 20)
NUM_PIXELS = 560
NUM_IMAGES = 1965
NUM_TRAIN, NUM_VALID, NUM_TEST = 1565, 200, 200
DEFAULT_SEED = 123


class ForbiddenGlobal(pickle.UnpicklingError):
    """The pickle asked for a global that is not part of numpy array reconstruction."""


class _NdarrayType:
    """Stands for ``numpy.ndarray`` inside the pickle: accepted as the first argument of
    ``_reconstruct`` but not callable, so the pickle cannot call ``ndarray(...)`` itself."""

    def __repr__(self) -> str:
        return "numpy.ndarray (restricted)"


_NDARRAY = _NdarrayType()
# numpy's own _reconstruct, taken from ndarray.__reduce__ rather than imported from
# numpy.core (deprecated in numpy 2) or numpy._core (absent in numpy 1).
_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NDARRAY:
        raise ForbiddenGlobal(f"_reconstruct of {subtype!r}: only numpy.ndarray is admitted")
    if not isinstance(shape, tuple) or not all(isinstance(s, int) for s in shape) or np.prod(shape) != 0:
        raise ForbiddenGlobal(f"_reconstruct with shape {shape!r}: numpy pickles use an empty shape")
    return _NUMPY_RECONSTRUCT(np.ndarray, shape, dtype)


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, (str, bytes)) or np.dtype(spec).kind not in "biufc":
        raise ForbiddenGlobal(f"dtype {spec!r}: only numeric dtypes are admitted")
    return np.dtype(spec, bool(align), bool(copy))


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or str(encoding).lower().replace("-", "") != "latin1":
        raise ForbiddenGlobal(f"_codecs.encode({type(text).__name__}, {encoding!r}): only latin1 text")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that reconstructs numpy arrays of numeric dtype and nothing else.

    Admitted globals (:attr:`ALLOWED`): ``numpy.core.multiarray._reconstruct`` and
    ``numpy._core.multiarray._reconstruct`` (only for ``ndarray`` with the empty initial shape
    numpy writes), ``numpy.ndarray`` (only as that argument), ``numpy.dtype`` (numeric kinds
    only) and ``_codecs.encode`` (latin-1 text only). Any other global raises
    :class:`ForbiddenGlobal` naming it, before it is imported or called. Use with
    ``encoding="latin1"`` for Python-2 pickles (numpy's convention).
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): _dtype,
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(
                f"forbidden global {module}.{name}: only numpy array reconstruction is admitted"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise ForbiddenGlobal(f"forbidden persistent id {pid!r}")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding="latin1"``)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


def read_freyfaces(
    path: PathLike, sha256: Optional[str] = SHA256, num_images: Optional[int] = NUM_IMAGES
) -> np.ndarray:
    """Read a Frey-faces pickle: a list holding one uint8 array ``(N, 560)``.

    :param path: the ``.pkl`` file.
    :param sha256: expected sha256 of the file as stored, checked before unpickling;
        ``None`` skips it (the unpickler is restricted either way).
    :param num_images: expected ``N``, or ``None`` to accept any.
    :returns: the uint8 array ``(N, 560)``, rows are 28x20 faces in row-major order.
    :raises DatasetFileMissing: the file does not exist.
    :raises DatasetFileError: wrong checksum, a forbidden global, not a pickle, or wrong
        structure, dtype or shape.
    """
    path = Path(path)
    path = require_file(path.parent, path.name, PUBLISHED)
    check_sha256(path, sha256, PUBLISHED)
    try:
        obj = restricted_loads(path.read_bytes())
    except ForbiddenGlobal as exc:
        raise DatasetFileError(f"{path}: refused to unpickle: {exc}. {PUBLISHED}") from exc
    except Exception as exc:  # malformed pickles raise many types
        raise corrupt(path, f"cannot be unpickled ({type(exc).__name__}: {exc})", PUBLISHED) from exc
    if not (isinstance(obj, list) and len(obj) == 1 and isinstance(obj[0], np.ndarray)):
        raise corrupt(path, f"holds {type(obj).__name__}, expected a list of one numpy array", PUBLISHED)
    faces = obj[0]
    if faces.dtype != np.uint8 or faces.ndim != 2 or faces.shape[1] != NUM_PIXELS:
        raise corrupt(
            path, f"array {faces.dtype} {faces.shape}, expected uint8 (N, {NUM_PIXELS})", PUBLISHED
        )
    if num_images is not None and len(faces) != num_images:
        raise corrupt(path, f"{len(faces)} images, expected {num_images}", PUBLISHED)
    return faces


def split_indices(seed: int = DEFAULT_SEED, n: int = NUM_IMAGES) -> Tuple[np.ndarray, ...]:
    """Row indices of train/valid/test: ``RandomState(seed).permutation(n)`` cut after 1565
    and 1765 rows — the same order as the reference's ``np.random.seed(seed);
    np.random.shuffle(data)``.

    Example::

        >>> [len(i) for i in split_indices(123)]
        [1565, 200, 200]
    """
    order = np.random.RandomState(seed).permutation(n)
    return order[:NUM_TRAIN], order[NUM_TRAIN:NUM_TRAIN + NUM_VALID], order[NUM_TRAIN + NUM_VALID:]


@dataclass
class FreyFacesSplits:
    """Frey faces split 1565/200/200: images as ``(N, 560)`` tensors (reshape to
    :data:`IMAGE_SHAPE`), uint8 pixel values 0..255 by default (the classes of a 256-way
    categorical likelihood) or, for a floating dtype, intensities ``value / 255``.
    ``*_index`` are the rows of the file; ``seed`` the shuffle's seed; ``sha256`` the verified
    checksum (``None`` if not checked)."""

    train: Tensor
    valid: Tensor
    test: Tensor
    train_index: Tensor
    valid_index: Tensor
    test_index: Tensor
    seed: int
    source: str
    sha256: Optional[str]
    info: dict = field(default_factory=dict)


def load(
    data_dir: PathLike,
    seed: int = DEFAULT_SEED,
    dtype: torch.dtype = torch.uint8,
    verify: bool = True,
) -> FreyFacesSplits:
    """Load ``freyfaces.pkl`` from ``data_dir`` and split it 1565/200/200 after a shuffle seeded
    with ``seed`` (see :func:`split_indices`).

    :param dtype: ``torch.uint8`` (default: pixel values 0..255), another integer dtype
        (same values), or a floating dtype (intensities in [0, 1], ``value / 255``).
    :param verify: check the sha256 of the file before unpickling it.
    """
    path = require_file(data_dir, FILENAME, PUBLISHED)
    faces = read_freyfaces(path, SHA256 if verify else None)
    x = torch.from_numpy(faces)
    x = x.to(dtype) / 255.0 if dtype.is_floating_point else x.to(dtype)
    idx = [torch.from_numpy(i.astype(np.int64)) for i in split_indices(seed)]
    info = {
        "source": str(path),
        "sha256": SHA256 if verify else None,
        "split": f"1565/200/200 after RandomState({seed}).permutation (the reference's shuffle)",
        "pixels": "uint8 0..255" if not dtype.is_floating_point else "value / 255",
    }
    return FreyFacesSplits(
        train=x[idx[0]], valid=x[idx[1]], test=x[idx[2]],
        train_index=idx[0], valid_index=idx[1], test_index=idx[2],
        seed=seed, source=str(path), sha256=SHA256 if verify else None, info=info,
    )
