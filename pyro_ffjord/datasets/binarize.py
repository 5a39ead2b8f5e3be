"""Binarization of grey images into 0/1 pixels, as the VAE literature does it.

* :func:`static`: one seeded draw, kept for the whole run (valid and test sets, or a training
  set binarized once): pixel ``i`` is 1 with probability ``x[i] / scale``.
* :func:`dynamic`: a fresh draw for every training batch (Bernoulli with probability ``x``).

Example::

    >>> import numpy as np
    >>> static(np.array([[0.0, 1.0]]), seed=0).tolist()
    [[0, 1]]
    >>> static(np.array([[0, 255]], dtype=np.uint8), seed=0, scale=255.0).tolist()
    [[0, 1]]
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

Seed = Union[int, Sequence[int]]


def static(x: np.ndarray, seed: Seed, scale: float = 1.0, chunk: int = 10_000) -> np.ndarray:
    """Seeded static binarization: pixel ``i`` is 1 with probability ``x[i] / scale``.

    Compares the float64 uniforms of ``numpy.random.default_rng(seed)`` times ``scale`` with
    ``x``, chunk by chunk in row order: the result does not depend on ``chunk`` (one stream of
    uniforms), and the same seed gives the same bits on any machine.

    :param x: intensities in ``[0, scale]``, any shape (e.g. uint8 0..255 with
        ``scale=255.0``, or grey levels in [0, 1] with the default ``scale=1.0``).
    :param seed: anything ``default_rng`` accepts (an int or a sequence of ints).
    :param chunk: rows drawn at a time (bounds the memory of the uniforms).
    :returns: a uint8 array of 0/1 of the shape of ``x``.
    """
    x = np.asarray(x)
    rng = np.random.default_rng(seed)
    flat = x.reshape(len(x), -1) if x.ndim > 1 else x.reshape(-1, 1)
    out = np.empty(flat.shape, dtype=np.uint8)
    chunk = max(1, int(chunk))
    for start in range(0, len(flat), chunk):
        block = flat[start:start + chunk]
        out[start:start + chunk] = rng.random(block.shape) * scale < block
    return out.reshape(x.shape)


def dynamic(x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Dynamic binarization of one training batch: a fresh Bernoulli draw with probability
    ``x`` (intensities in [0, 1]).

    Example::

        >>> b = dynamic(torch.full((2, 3), 0.5), torch.Generator().manual_seed(0))
        >>> b.shape, set(b.unique().tolist()) <= {0.0, 1.0}
        (torch.Size([2, 3]), True)
    """
    return torch.bernoulli(x, generator=generator)
