"""pyro_ffjord.datasets.binarize: seeded static binarization (independent of the chunking, of
0..255 intensities and [0, 1] grey levels alike) and dynamic binarization per batch."""

from __future__ import annotations

import numpy as np
import torch

from pyro_ffjord.datasets import binarize


def test_static_is_seeded_and_chunk_independent():
    x = np.random.default_rng(0).random((25, 6))
    a = binarize.static(x, seed=3)
    assert a.dtype == np.uint8 and a.shape == x.shape and set(np.unique(a)) <= {0, 1}
    for chunk in (1, 7, 25, 1000):
        assert np.array_equal(a, binarize.static(x, seed=3, chunk=chunk))
    assert not np.array_equal(a, binarize.static(x, seed=4))
    # the draw is default_rng(seed).random(shape) < x, seeds may be sequences
    assert np.array_equal(a, np.random.default_rng(3).random(x.shape) < x)
    assert np.array_equal(binarize.static(x, [7, 1]), np.random.default_rng([7, 1]).random(x.shape) < x)
    # 1-D and 3-D inputs keep their shape
    assert binarize.static(np.full(4, 0.5), 0).shape == (4,)
    assert binarize.static(np.full((2, 3, 4), 0.5), 0).shape == (2, 3, 4)


def test_static_of_uint8_intensities():
    images = np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8)
    a = binarize.static(images, seed=0, scale=255.0)
    assert np.array_equal(a, np.random.default_rng(0).random(images.shape) * 255.0 < images)
    assert (a[images == 0] == 0).all() and (a[images == 255] == 1).all()
    assert abs(a.mean() - images.mean() / 255) < 0.05


def test_dynamic_draws_afresh_per_batch():
    x = torch.full((200, 10), 0.3)
    g = torch.Generator().manual_seed(0)
    b1, b2 = binarize.dynamic(x, g), binarize.dynamic(x, g)
    assert b1.dtype == x.dtype and set(b1.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(b1, b2)
    assert torch.equal(b1, binarize.dynamic(x, torch.Generator().manual_seed(0)))
    assert abs(float(b1.mean()) - 0.3) < 0.05
