"""The eight 2-D toy densities of the FFJORD paper, as seeded samplers.

Definitions and scales follow the paper's reference code (its ``inf_train_gen``); scikit-learn's
``make_circles``/``make_moons``/``make_swiss_roll`` are rewritten here in numpy so the package
needs no scikit-learn.

Example::

    >>> x = sample("8gaussians", 1000, seed=0)
    >>> x.shape, x.dtype
    (torch.Size([1000, 2]), torch.float32)
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import numpy as np
import torch

Sampler = Callable[[np.random.Generator, int], np.ndarray]


def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x, z = t * np.cos(t), t * np.sin(t)
    data = np.stack([x, z], 1) + rng.normal(scale=1.0, size=(n, 2))
    return data / 5.0


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    n_out = n // 2
    n_in = n - n_out
    a_out = np.linspace(0, 2 * np.pi, n_out, endpoint=False)
    a_in = np.linspace(0, 2 * np.pi, n_in, endpoint=False)
    outer = np.stack([np.cos(a_out), np.sin(a_out)], 1)
    inner = 0.5 * np.stack([np.cos(a_in), np.sin(a_in)], 1)
    data = np.concatenate([outer, inner]) + rng.normal(scale=0.08, size=(n, 2))
    return rng.permutation(data) * 3.0


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    counts = [n // 4] * 3
    counts.insert(0, n - sum(counts))
    parts = []
    for count, radius in zip(counts, (1.0, 0.75, 0.5, 0.25)):
        angle = np.linspace(0, 2 * np.pi, count, endpoint=False)
        parts.append(radius * np.stack([np.cos(angle), np.sin(angle)], 1))
    data = rng.permutation(np.concatenate(parts) * 3.0)
    return data + rng.normal(scale=0.08, size=data.shape)


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    n_out = n // 2
    n_in = n - n_out
    a_out, a_in = np.linspace(0, np.pi, n_out), np.linspace(0, np.pi, n_in)
    outer = np.stack([np.cos(a_out), np.sin(a_out)], 1)
    inner = np.stack([1 - np.cos(a_in), 1 - np.sin(a_in) - 0.5], 1)
    data = rng.permutation(np.concatenate([outer, inner])) + rng.normal(scale=0.1, size=(n, 2))
    return data * 2 + np.array([-1.0, -0.2])


def _eight_gaussians(rng: np.random.Generator, n: int) -> np.ndarray:
    s = 1.0 / np.sqrt(2)
    centers = 4.0 * np.array([(1, 0), (-1, 0), (0, 1), (0, -1), (s, s), (s, -s), (-s, s), (-s, -s)])
    points = rng.normal(size=(n, 2)) * 0.5 + centers[rng.integers(0, 8, n)]
    return points / 1.414


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    classes, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    rads = np.linspace(0, 2 * np.pi, classes, endpoint=False)
    features = rng.normal(size=(n, 2)) * np.array([radial_std, tangential_std])
    features[:, 0] += 1.0
    labels = np.arange(n) % classes
    angles = rads[labels] + rate * np.exp(features[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    rotations = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    return 2 * rng.permutation(np.einsum("ti,tij->tj", features, rotations))


def _two_spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    half = n // 2
    m = np.sqrt(rng.random((n - half, 1))) * 540 * (2 * np.pi) / 360
    dx = -np.cos(m) * m + rng.random((n - half, 1)) * 0.5
    dy = np.sin(m) * m + rng.random((n - half, 1)) * 0.5
    arm = np.hstack([dx, dy])
    data = np.vstack([arm, -arm[:half]]) / 3
    return rng.permutation(data + rng.normal(size=data.shape) * 0.1)


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2 = rng.random(n) - rng.integers(0, 2, n) * 2 + np.floor(x1) % 2
    return np.stack([x1, x2], 1) * 2


SAMPLERS: Dict[str, Sampler] = {
    "swissroll": _swissroll,
    "8gaussians": _eight_gaussians,
    "pinwheel": _pinwheel,
    "circles": _circles,
    "moons": _moons,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
}
NAMES = tuple(SAMPLERS)


def sample(
    name: str,
    n: int,
    seed: Optional[Union[int, np.random.Generator]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``n`` points of the toy density ``name`` (one of :data:`NAMES`) as an ``(n, 2)`` tensor.

    :param seed: an int or a :class:`numpy.random.Generator`; equal seeds give equal samples.
    """
    if name not in SAMPLERS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {NAMES}")
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return torch.as_tensor(SAMPLERS[name](rng, int(n)), dtype=dtype)
