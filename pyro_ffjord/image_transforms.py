r"""Fixed image transforms and the bits/dim accounting of image density models.

- :class:`Squeeze`: space-to-depth, ``(C, H, W) -> (C f^2, H/f, W/f)``, the multiscale
  architecture's reshaping (log-det 0).
- :class:`LogitTransform`: pixel intensities in [0, 1] to logit space (the reference's
  ``lib/layers/elemwise.py``); its inverse ends a model whose density is on [0, 1]^D.
- :func:`dequantize` and :func:`bits_per_dim`: uniform dequantization of 8-bit pixels and the
  bits/dim of a continuous model of the dequantized data.

The accounting. Pixels :math:`k \in \{0, \dots, 255\}^D` are dequantized to
:math:`x = (k + u)/256 \in [0, 1)^D`, :math:`u \sim U[0, 1)^D`. A model with density :math:`p`
on :math:`[0, 1]^D` (integrating to at most 1 there) gives the discrete model
:math:`P(k) = \int_{[0,1)^D} p((k + u)/256)\,256^{-D} du`, which sums to at most 1 over all
:math:`k`, and by Jensen's inequality (Theis et al., 2016)

.. math::

    -\log_2 P(k) \le -\mathbb{E}_u\left[\log p(x) - D \log 256\right] / \ln 2 .

:func:`bits_per_dim` returns the bracket for one draw of :math:`u`, divided by :math:`D`:
:math:`-(\log p(x) - D \log 256) / (D \ln 2)`, an unbiased estimate of an upper bound on the
discrete model's code length in bits per dimension (the reference's ``train_cnf.py``). Here
:math:`\log p(x)` is the log-density of :math:`x` on [0, 1]^D: for a flow modelling
:math:`y = \mathrm{logit}(\alpha + (1 - 2\alpha) x)` it must include the log-det of the
logit, e.g. ``TransformedDistribution(base, [*flows, LogitTransform(alpha).inv]).log_prob(x)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Transform, constraints

DEFAULT_ALPHA = 1e-6


def _check_factor(factor) -> int:
    if not (isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1):
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    return factor


class Squeeze(Transform):
    r"""Space-to-depth: each ``f x f`` block of pixels becomes ``f^2`` channels,
    ``(..., C, H, W) -> (..., C f^2, H/f, W/f)``; a permutation of the coordinates, so the
    log-det is 0. Channel ``c f^2 + i f + j`` of the output holds pixel ``(i, j)`` of each block
    of input channel ``c`` (the reference's ``lib/layers/squeeze.py`` order). ``Squeeze(f).inv``
    is depth-to-space.

    Example::

        >>> sq = Squeeze(2)
        >>> y = sq(torch.arange(16.).reshape(1, 4, 4))
        >>> y.shape, y[:, 0, 0].tolist()
        (torch.Size([4, 2, 2]), [0.0, 1.0, 4.0, 5.0])
        >>> torch.equal(sq.inv(y), torch.arange(16.).reshape(1, 4, 4))
        True

    :param int factor: the block size :math:`f` (default 2); H and W must be divisible by it.
    :param int cache_size: 0 or 1, as for any :class:`~torch.distributions.Transform`.
    """

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)
    bijective = True

    def __init__(self, factor: int = 2, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.factor = _check_factor(factor)

    def __eq__(self, other) -> bool:
        return isinstance(other, Squeeze) and other.factor == self.factor

    __hash__ = Transform.__hash__

    def __repr__(self) -> str:
        return f"Squeeze(factor={self.factor})"

    def with_cache(self, cache_size: int = 1) -> "Squeeze":
        return self if cache_size == self._cache_size else Squeeze(self.factor, cache_size)

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        if len(shape) < 3:
            raise ValueError(f"Squeeze maps images (..., C, H, W), got shape {tuple(shape)}")
        *batch, c, h, w = shape
        f = self.factor
        if h % f or w % f:
            raise ValueError(f"Squeeze(factor={f}) needs H and W divisible by {f}, got (C, H, W) = ({c}, {h}, {w})")
        return torch.Size((*batch, c * f * f, h // f, w // f))

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        if len(shape) < 3:
            raise ValueError(f"Squeeze maps images (..., C, H, W), got shape {tuple(shape)}")
        *batch, c, h, w = shape
        f = self.factor
        if c % (f * f):
            raise ValueError(f"Squeeze(factor={f}).inv needs C divisible by {f * f}, got (C, H, W) = ({c}, {h}, {w})")
        return torch.Size((*batch, c // (f * f), h * f, w * f))

    def _call(self, x: Tensor) -> Tensor:
        out = self.forward_shape(x.shape)
        *batch, c, h, w = x.shape
        f = self.factor
        blocks = x.reshape(*batch, c, h // f, f, w // f, f)
        # (..., c, H/f, i, W/f, j) -> (..., c, i, j, H/f, W/f)
        n = len(batch)
        order = (*range(n), n, n + 2, n + 4, n + 1, n + 3)
        return blocks.permute(order).reshape(out)

    def _inverse(self, y: Tensor) -> Tensor:
        out = self.inverse_shape(y.shape)
        *batch, c, h, w = y.shape
        f = self.factor
        blocks = y.reshape(*batch, c // (f * f), f, f, h, w)
        # (..., c, i, j, H/f, W/f) -> (..., c, H/f, i, W/f, j)
        n = len(batch)
        order = (*range(n), n, n + 3, n + 1, n + 4, n + 2)
        return blocks.permute(order).reshape(out)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-3])


class LogitTransform(Transform):
    r"""Pixel intensities to logit space, elementwise:
    :math:`y = \mathrm{logit}(s)`, :math:`s = \alpha + (1 - 2\alpha) x`, with

    .. math::

        \log\left|\frac{dy}{dx}\right| = \log(1 - 2\alpha) - \log s - \log(1 - s)

    (computed from :math:`y`, as :math:`s = \mathrm{sigmoid}(y)`, which stays accurate where
    :math:`s` is near 0 or 1). The reference's ``LogitTransform`` (``lib/layers/elemwise.py``,
    Real NVP's preprocessing); ``alpha > 0`` keeps the logit of 0 and 1 finite.

    Data in [0, 1] map to :math:`[\mathrm{logit}\,\alpha, -\mathrm{logit}\,\alpha]`. The map is a
    bijection from its ``domain``, the interval :math:`[-\alpha/(1-2\alpha), (1-\alpha)/(1-2\alpha)]`
    (the image of :math:`\mathbb{R}` under the inverse, slightly wider than [0, 1]; its ends map
    to :math:`\pm\infty`), onto :math:`\mathbb{R}`. So a model
    ``TransformedDistribution(base, [*flows, LogitTransform(alpha).inv])`` puts a little mass
    outside [0, 1], and its density on [0, 1] integrates to at most 1: bits/dim computed from it
    (:func:`bits_per_dim`) remain a valid bound.

    Example::

        >>> t = LogitTransform(alpha=0.05)
        >>> x = torch.tensor([0.0, 0.5, 1.0])
        >>> t(x)
        tensor([-2.9444,  0.0000,  2.9444])
        >>> torch.allclose(t.inv(t(x)), x)
        True

    :param float alpha: in [0, 0.5); default 1e-6 (the reference's image default).
    :param int cache_size: 0 or 1, as for any :class:`~torch.distributions.Transform`.
    """

    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, alpha: float = DEFAULT_ALPHA, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must be a number in [0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)
        low = -self.alpha / (1 - 2 * self.alpha)
        self.domain = constraints.interval(low, 1 - low)

    def __eq__(self, other) -> bool:
        return isinstance(other, LogitTransform) and other.alpha == self.alpha

    __hash__ = Transform.__hash__

    def __repr__(self) -> str:
        return f"LogitTransform(alpha={self.alpha:g})"

    def with_cache(self, cache_size: int = 1) -> "LogitTransform":
        return self if cache_size == self._cache_size else LogitTransform(self.alpha, cache_size)

    def _call(self, x: Tensor) -> Tensor:
        s = self.alpha + (1 - 2 * self.alpha) * x
        return torch.log(s) - torch.log1p(-s)

    def _inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # log s + log(1 - s) with s = sigmoid(y): logsigmoid(y) + logsigmoid(-y).
        return math.log1p(-2 * self.alpha) - F.logsigmoid(y) - F.logsigmoid(-y)


def _check_levels(levels) -> int:
    if not (isinstance(levels, int) and not isinstance(levels, bool) and levels >= 2):
        raise ValueError(f"levels (values a pixel can take) must be an int >= 2, got {levels!r}")
    return levels


def dequantize(pixels: Tensor, generator: Optional[torch.Generator] = None, levels: int = 256,
               dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""Uniform dequantization: :math:`x = (k + u) / \text{levels}`, :math:`u \sim U[0, 1)`
    drawn independently for every pixel :math:`k`, so :math:`x \in [0, 1)` and
    :math:`\lfloor \text{levels} \cdot x \rfloor = k` (the reference's ``add_noise``, which takes
    ``k / 255`` instead of ``k``).

    :param pixels: integer pixel values in ``[0, levels - 1]`` (uint8 or any integer dtype, or
        a float tensor holding whole numbers); not intensities already scaled to [0, 1].
    :param generator: the random generator for :math:`u` (default torch's global one).
    :param int levels: number of pixel values (256 for 8-bit images).
    :param dtype: floating dtype of the result (default torch's default dtype).

    Example::

        >>> x = dequantize(torch.tensor([0, 128, 255], dtype=torch.uint8))
        >>> (x * 256).floor().tolist(), bool((x < 1).all())
        ([0.0, 128.0, 255.0], True)
    """
    levels = _check_levels(levels)
    if not isinstance(pixels, Tensor):
        raise TypeError(f"pixels must be a tensor, got {type(pixels).__name__}")
    if pixels.is_complex() or pixels.dtype == torch.bool:
        raise ValueError(f"pixels must hold integer values in [0, {levels - 1}], got dtype {pixels.dtype}")
    if pixels.is_floating_point() and not bool((pixels == pixels.round()).all()):
        raise ValueError(f"pixels must hold whole numbers in [0, {levels - 1}] (e.g. uint8), not intensities in "
                         f"[0, 1]; for those, pass (x * {levels - 1}).round()")
    if pixels.numel() and not (bool(pixels.min() >= 0) and bool(pixels.max() <= levels - 1)):
        raise ValueError(f"pixels must lie in [0, {levels - 1}], got values in "
                         f"[{pixels.min().item()}, {pixels.max().item()}]")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    u = torch.rand(pixels.shape, generator=generator, dtype=dtype, device=pixels.device)
    x = (pixels.to(dtype) + u) / levels
    # In float32, (255 + u) / 256 rounds to 1 for u within 2**-16 of 1: keep x below 1.
    return x.clamp(max=1 - torch.finfo(dtype).eps / 2)


def bits_per_dim(log_prob_x: Tensor, num_dims: int, levels: int = 256) -> Tensor:
    r"""Bits per dimension of dequantized data :math:`x \in [0, 1]^D` under a model with
    log-density ``log_prob_x`` (nats) on :math:`[0, 1]^D`:

    .. math::

        \mathrm{bpd} = -\frac{\log p(x) - D \log(\text{levels})}{D \ln 2},

    an estimate of an upper bound on :math:`-\log_2 P(k) / D` for the discrete pixels :math:`k`
    (see the module docstring); elementwise over ``log_prob_x`` (one value per image: average
    them for a data set's bits/dim). A density of 1 on [0, 1]^D gives exactly
    :math:`\log_2 256 = 8` bits/dim.

    :param log_prob_x: log-density of :math:`x` on [0, 1]^D, including the log-det of any
        preprocessing such as :class:`LogitTransform` (nats).
    :param int num_dims: :math:`D`, the number of pixel values per image (``C * H * W``).
    :param int levels: number of pixel values (256 for 8-bit images).

    Example::

        >>> bits_per_dim(torch.zeros(2), num_dims=784)
        tensor([8., 8.])
    """
    levels = _check_levels(levels)
    if not (isinstance(num_dims, int) and not isinstance(num_dims, bool) and num_dims >= 1):
        raise ValueError(f"num_dims must be a positive int (C * H * W), got {num_dims!r}")
    log_prob_x = torch.as_tensor(log_prob_x)
    # log2(levels) - log p / (D ln 2): the same number, exact (8) for log p = 0 and 256 levels.
    return math.log2(levels) - log_prob_x / (num_dims * math.log(2))
