r"""The paper's multiscale CNF for images (the reference's ``lib/odenvp.py``) as Pyro transforms.

Read from data to latent, as the reference does, a multiscale model with ``S`` scales is

- at every scale but the last: ``blocks`` CNFs on ``(c, h, w)``; :class:`~pyro_ffjord.image_transforms.Squeeze`
  to ``(4c, h/2, w/2)``; ``blocks`` CNFs there; then the last ``2c`` channels are factored out
  (they go to the latent unchanged) and the first ``2c`` channels go on to the next scale;
- at the last scale: ``blocks`` CNFs, no squeeze.

Pyro's transforms map the base (latent) to the data, so :class:`MultiscaleFFJORD` lists the
same pieces in the opposite order, each inverted: :class:`FactorOut` (the next scales on the
first ``2c`` channels, the identity on the rest), CNFs, ``Squeeze(2).inv``, CNFs.
"""

from __future__ import annotations

import itertools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import pyro.distributions as dist
import torch
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import Tensor
from torch.distributions import Transform, constraints
from torch.distributions.utils import _sum_rightmost

from .conv_nets import check_image_shape
from .image_ffjord import DEFAULT_HIDDEN_CHANNELS, ImageFFJORD
from .image_transforms import LogitTransform, Squeeze
from .stats import regularization


class _Pass(NamedTuple):
    """The latest pass: its values from input end to output end, which end it produced, the
    parameter state it was computed with and whether it built a graph."""

    values: Tuple[Tensor, ...]
    produced: str
    key: tuple
    grad: bool


class _RemembersPass:
    """Remembers the intermediate values of the latest pass, so that the log-det of that pass
    costs no solve: torch's ``ComposeTransform`` recomputes intermediates by calling its parts
    again, and an FFJORD part solves its ODE again for a value it was given (it reuses only the
    end its latest solve produced). As FFJORD does, a pass is reused only for the end it
    produced and only while the parameters, buffers and mode are unchanged."""

    _pass: Optional[_Pass] = None

    def _pass_key(self) -> tuple:
        tensors = itertools.chain(self.parameters(), self.buffers())
        return (self.training, *((id(t), t._version) for t in tensors))

    def _recall(self) -> Optional[_Pass]:
        latest = self._pass
        if latest is None or latest.key != self._pass_key():
            return None
        if torch.is_grad_enabled() and not latest.grad:  # computed without a graph
            return None
        return latest

    def _remember(self, values: Sequence[Tensor], produced: str) -> None:
        self._pass = _Pass(tuple(values), produced, self._pass_key(), torch.is_grad_enabled())

    def __call__(self, x: Tensor) -> Tensor:
        latest = self._recall()
        if latest is not None and latest.produced == "x" and latest.values[0] is x:
            return latest.values[-1]
        values = self._forward_values(x)
        self._remember(values, "y")
        return values[-1]

    def _inv_call(self, y: Tensor) -> Tensor:
        latest = self._recall()
        if latest is not None and latest.produced == "y" and latest.values[-1] is y:
            return latest.values[0]
        values = self._inverse_values(y)
        self._remember(values, "x")
        return values[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        latest = self._recall()
        if latest is not None and latest.values[0] is x and latest.values[-1] is y:
            return self._ladj(latest.values)
        return self._ladj(self._values_between(x, y))

    def clear_cache(self) -> None:
        self._pass = None

    def train(self, mode: bool = True):
        self._pass = None  # frees the graph it holds; the key holds the mode anyway
        return super().train(mode)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_pass"] = None  # holds a graph; never pickled or deep-copied
        return state


class _Chain(_RemembersPass, ComposeTransformModule):
    """A :class:`ComposeTransformModule` that remembers its latest pass (see :class:`_RemembersPass`):
    sampling then scoring the sample, or scoring data, costs one solve per CNF."""

    inv = property(Transform.inv.fget)  # an inverse that goes through _inv_call, not a new compose

    def __init__(self, parts: Sequence[Transform]) -> None:
        if not parts:
            raise ValueError("a chain needs at least one transform")
        super().__init__(list(parts))

    def with_cache(self, cache_size: int = 1) -> "_Chain":
        return self  # it always remembers its latest pass

    def _forward_values(self, x: Tensor) -> List[Tensor]:
        values = [x]
        for part in self.parts:
            values.append(part(values[-1]))
        return values

    def _inverse_values(self, y: Tensor) -> List[Tensor]:
        values = [y]
        for part in reversed(self.parts):
            values.append(part.inv(values[-1]))
        return values[::-1]

    def _values_between(self, x: Tensor, y: Tensor) -> List[Tensor]:
        return self._forward_values(x)[:-1] + [y]  # as ComposeTransform: the last pair is (x_n, y)

    def _ladj(self, values: Sequence[Tensor]) -> Tensor:
        event_dim = self.domain.event_dim
        total = 0
        for part, a, b in zip(self.parts, values[:-1], values[1:]):
            total = total + _sum_rightmost(part.log_abs_det_jacobian(a, b), event_dim - part.domain.event_dim)
            event_dim += part.codomain.event_dim - part.domain.event_dim
        return total


class FactorOut(_RemembersPass, TransformModule):
    r"""Applies ``inner`` to the first ``channels`` channels of an image and the identity to the
    others: :math:`(x_1, x_2) \mapsto (g(x_1), x_2)`, so
    :math:`\log|\det J| = \log|\det \partial g/\partial x_1|`. In a multiscale model (data to
    latent) the channels :math:`x_2` are factored out, :math:`x_1` goes on to the coarser scales.

    ``inner`` maps images ``(..., channels, H, W)`` to images of the same shape (a transform of
    event dim 3, such as :class:`~pyro_ffjord.ImageFFJORD` or a compose of them, or an
    elementwise one); its parameters, if it is a module, are this module's.

    Example::

        >>> from torch.distributions import AffineTransform
        >>> t = FactorOut(AffineTransform(0.0, 2.0))
        >>> x = torch.ones(4, 2, 2)
        >>> y = t(x)
        >>> y[:, 0, 0].tolist(), round(t.log_abs_det_jacobian(x, y).item(), 4)  # 8 log 2
        ([2.0, 2.0, 1.0, 1.0], 5.5452)

    :param inner: the transform of the first channels.
    :param int channels: how many channels ``inner`` transforms; default the first half
        (``C // 2``, the reference's split), decided by each input's ``C``.
    """

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)
    bijective = True

    def __init__(self, inner: Transform, channels: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(inner, Transform):
            raise TypeError(f"inner must be a torch.distributions.Transform, got {type(inner).__name__}")
        if inner.domain.event_dim > 3 or inner.codomain.event_dim > 3:
            raise ValueError(f"inner must act on images (event dim at most 3), got {inner!r}")
        if channels is not None and not (isinstance(channels, int) and not isinstance(channels, bool) and channels > 0):
            raise ValueError(f"channels must be a positive int or None (the first half), got {channels!r}")
        self.inner = inner
        self.channels = channels

    def _split_at(self, shape: Sequence[int]) -> int:
        if len(shape) < 3:
            raise ValueError(f"FactorOut maps images (..., C, H, W), got shape {tuple(shape)}")
        c = shape[-3]
        k = c // 2 if self.channels is None else self.channels
        if not 0 < k < c:
            raise ValueError(f"FactorOut transforms the first {k} channel(s) and passes the others through, "
                             f"which needs 0 < {k} < C; got shape {tuple(shape)}")
        return k

    @staticmethod
    def _join(a: Tensor, b: Tensor) -> Tensor:
        batch = torch.broadcast_shapes(a.shape[:-3], b.shape[:-3])  # a conditioned inner broadcasts
        return torch.cat([a.expand(batch + a.shape[-3:]), b.expand(batch + b.shape[-3:])], dim=-3)

    def _checked(self, before: Tensor, after: Tensor) -> Tensor:
        if after.shape[-3:] != before.shape[-3:]:
            raise ValueError(f"FactorOut's inner transform must keep the shape of its channels: it maps "
                             f"{tuple(before.shape[-3:])} to {tuple(after.shape[-3:])}")
        return after

    def _forward_values(self, x: Tensor) -> Tuple[Tensor, ...]:
        k = self._split_at(x.shape)
        x1 = x[..., :k, :, :]
        y1 = self._checked(x1, self.inner(x1))
        return x, x1, y1, self._join(y1, x[..., k:, :, :])

    def _inverse_values(self, y: Tensor) -> Tuple[Tensor, ...]:
        k = self._split_at(y.shape)
        y1 = y[..., :k, :, :]
        x1 = self._checked(y1, self.inner.inv(y1))
        return self._join(x1, y[..., k:, :, :]), x1, y1, y

    def _values_between(self, x: Tensor, y: Tensor) -> Tuple[Tensor, ...]:
        k = self._split_at(x.shape)
        return x, x[..., :k, :, :], y[..., :k, :, :], y

    def _ladj(self, values: Sequence[Tensor]) -> Tensor:
        _, x1, y1, _ = values
        return _sum_rightmost(self.inner.log_abs_det_jacobian(x1, y1), 3 - self.inner.domain.event_dim)

    def _shape_through(self, shape: Sequence[int], inner_shape_fn) -> torch.Size:
        shape = torch.Size(shape)
        k = self._split_at(shape)
        part = shape[:-3] + (k,) + shape[-2:]
        out = torch.Size(inner_shape_fn(part))
        if out[-3:] != part[-3:]:
            raise ValueError(f"FactorOut's inner transform must keep the shape of its channels: it maps "
                             f"{tuple(part[-3:])} to {tuple(out[-3:])}")
        return torch.broadcast_shapes(out[:-3], shape[:-3]) + shape[-3:]

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        return self._shape_through(shape, self.inner.forward_shape)

    def inverse_shape(self, shape: torch.Size) -> torch.Size:
        return self._shape_through(shape, self.inner.inverse_shape)

    def with_cache(self, cache_size: int = 1) -> "FactorOut":
        return self  # it always remembers its latest pass

    def __repr__(self) -> str:
        return f"FactorOut({self.inner!r}, channels={self.channels})"


def default_scales(shape: Sequence[int]) -> int:
    """The reference's number of scales (halve H and W while both are at least 4), stopping
    early where a squeeze would meet an odd size.

    Example::

        >>> default_scales((1, 28, 28)), default_scales((3, 32, 32)), default_scales((1, 4, 4))
        (3, 4, 1)
    """
    _, h, w = check_image_shape(shape)
    scales = 0
    while h >= 4 and w >= 4:
        scales += 1
        if h % 2 or w % 2:
            break
        h, w = h // 2, w // 2
    return max(scales, 1)


def _scale_parts(shape: torch.Size, scale: int, scales: int, blocks: int, make) -> List[Transform]:
    """The generative parts of one scale and the coarser ones inside it: from this scale's
    latent (its shape after the squeeze) to ``shape``."""
    c, h, w = shape
    here = [make(shape) for _ in range(blocks)]
    if scale == scales - 1:
        return here
    squeezed, kept = torch.Size((4 * c, h // 2, w // 2)), torch.Size((2 * c, h // 2, w // 2))
    inner = _scale_parts(kept, scale + 1, scales, blocks, make)
    if scale + 1 < scales - 1:
        # The next scale's latent is its squeezed shape: squeeze the kept channels into it (in
        # data-to-latent terms, unsqueeze its latent back), so the latent stays one image.
        inner = [Squeeze(2), *inner]
    return [FactorOut(_Chain(inner), channels=2 * c), *[make(squeezed) for _ in range(blocks)],
            Squeeze(2).inv, *here]


class MultiscaleFFJORD(_Chain):
    r"""The paper's multiscale CNF for images (section 4.1; the reference's ``ODENVP``,
    ``lib/odenvp.py``), as one :class:`~pyro.distributions.torch_transform.ComposeTransformModule`
    from a standard normal latent of shape :attr:`latent_shape` to images of shape ``shape``
    (see the module docstring for the structure). ``flow.parts`` is the plain list of transforms.

    Use it as ``TransformedDistribution(flow.base_distribution(), [flow])``; its parameters are
    ``flow.parameters()``. It remembers the values between its parts from its latest pass, so
    scoring data costs one reverse solve per CNF and scoring a sample it drew costs none.

    Mirrors the reference: ``blocks_per_scale`` CNFs before and after each squeeze (its
    ``StackedCNFLayers``), half the channels factored out after each scale but the last (the
    first half goes on), no squeeze at the last scale, the number of scales (:func:`default_scales`)
    and, with ``logit_alpha``, the logit preprocessing as the data end (its ``LogitTransform``;
    the reference uses ``alpha=1e-6`` for images). The defaults of :class:`~pyro_ffjord.ImageFFJORD`
    are the reference's image field: ``(64, 64, 64)`` channels, 3x3 concat convolutions, softplus,
    Rademacher Hutchinson noise. Differences:

    - the latent is one image of shape :attr:`latent_shape` (``(4C, H/2, W/2)`` with two scales or
      more), not the reference's concatenation of flattened pieces: each coarser stack is
      squeezed into and out of the shape of the channels it works on. That permutes latent
      coordinates only, and the base is i.i.d. standard normal, so densities are the same;
    - Pyro's direction: each CNF maps its latent side to its data side (a CNF learns either);
    - the solve's defaults are this package's (``T=0.5``, fixed rk4 training steps with the drift
      check, dopri5 in eval mode); the reference trained ``T`` from 1 with dopri5: pass
      ``T=1.0, train_T=True, solver="dopri5"`` to follow it. No ZeroMeanTransform option.

    Example::

        >>> flow = MultiscaleFFJORD((1, 4, 4), scales=2, blocks_per_scale=1, hidden_channels=[4])
        >>> flow.latent_shape
        torch.Size([4, 2, 2])
        >>> d = dist.TransformedDistribution(flow.base_distribution(), [flow])
        >>> x = d.rsample((3,))
        >>> x.shape, d.log_prob(x).shape
        (torch.Size([3, 1, 4, 4]), torch.Size([3]))

    :param shape: the image shape ``(C, H, W)``.
    :param int scales: number of scales (default :func:`default_scales`); every scale but the
        last halves H and W, which must be divisible by ``2 ** (scales - 1)``.
    :param int blocks_per_scale: CNFs before and after each squeeze (2, the reference's).
    :param hidden_channels: channels of every CNF's field.
    :param float logit_alpha: if given, the last part is ``LogitTransform(logit_alpha).inv``, so
        the model is a density on intensities in [0, 1] (see :func:`~pyro_ffjord.bits_per_dim`).

    Other keywords are options of every :class:`~pyro_ffjord.ImageFFJORD` (``trace``,
    ``eval_trace``, ``solver``, ``T``, ``kinetic``...).
    """

    def __init__(
        self,
        shape: Sequence[int],
        scales: Optional[int] = None,
        blocks_per_scale: int = 2,
        hidden_channels: Sequence[int] = DEFAULT_HIDDEN_CHANNELS,
        logit_alpha: Optional[float] = None,
        **options,
    ) -> None:
        shape = check_image_shape(shape)
        scales = default_scales(shape) if scales is None else scales
        for name, value in (("scales", scales), ("blocks_per_scale", blocks_per_scale)):
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        step = 2 ** (scales - 1)
        if shape[1] % step or shape[2] % step:
            raise ValueError(f"scales={scales} squeezes {scales - 1} time(s), which needs H and W divisible by "
                             f"{step}; got (C, H, W) = {tuple(shape)}")

        def make(s: torch.Size) -> ImageFFJORD:
            return ImageFFJORD(s, hidden_channels=hidden_channels, **options)

        parts = _scale_parts(shape, 0, scales, blocks_per_scale, make)
        if logit_alpha is not None:
            parts.append(LogitTransform(logit_alpha).inv)
        super().__init__(parts)
        self.shape, self.scales = shape, scales
        self.latent_shape = self.inverse_shape(shape)

    @property
    def flows(self) -> List[ImageFFJORD]:
        """Every CNF of the model (e.g. to read their solve statistics)."""
        return [m for m in self.modules() if isinstance(m, ImageFFJORD)]

    @property
    def regularization(self) -> Tensor:
        """Summed RNODE penalty of the latest solves (see :func:`~pyro_ffjord.regularization`)."""
        return regularization(self)

    def base_distribution(self) -> dist.TorchDistribution:
        """The standard normal latent, ``Normal(0, 1)`` over :attr:`latent_shape` (event dim 3),
        in the dtype and on the device of the parameters."""
        p = next(self.parameters())
        return dist.Normal(torch.zeros(self.latent_shape, dtype=p.dtype, device=p.device), 1.0).to_event(3)


def multiscale_ffjord(shape: Sequence[int], scales: Optional[int] = None, blocks_per_scale: int = 2,
                      hidden_channels: Sequence[int] = DEFAULT_HIDDEN_CHANNELS, **options) -> MultiscaleFFJORD:
    """A helper that builds a :class:`MultiscaleFFJORD`.

    Example::

        >>> len(multiscale_ffjord((1, 8, 8), scales=3, blocks_per_scale=1, hidden_channels=[4]).flows)
        5
    """
    return MultiscaleFFJORD(shape, scales=scales, blocks_per_scale=blocks_per_scale,
                            hidden_channels=hidden_channels, **options)
