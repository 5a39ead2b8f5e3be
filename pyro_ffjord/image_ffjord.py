r"""FFJORD on images: transforms with event shape ``(C, H, W)`` and a convolutional field.

The flow is FFJORD's, solved on the flattened image :math:`z \in \mathbb{R}^D`,
:math:`D = CHW`: the image is flattened before the solve and unflattened after it, so the
solve, both trace estimators, RNODE, the drift check, caching and the adjoint are exactly
those of :class:`~pyro_ffjord.FFJORD`; only the vector field (:class:`~pyro_ffjord.conv_nets.ConvODENet`)
and the shapes differ.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.distributions import Transform, constraints

from .checks import check_tensor
from .conditional import ConditionalFFJORD
from .config import apply_preset
from .conv_nets import ConvODENet, check_image_shape
from .ffjord import ConditionedFFJORD, FFJORD, _FFJORDParams
from .stats import SolveStats

# Image defaults: the reference's image models use ConcatConv2d layers ("concat") with softplus;
# D is in the hundreds or thousands, where the exact trace (D backward passes per evaluation)
# is far too slow for training, so training uses Hutchinson's estimator.
IMAGE_DEFAULTS = {"activation": "softplus", "time_embedding": "concat", "trace": "hutchinson"}
DEFAULT_HIDDEN_CHANNELS = (64, 64, 64)


class _ImageEvent:
    """The image side of a flow: event shape ``(C, H, W)``, flattened around the solve."""

    domain = constraints.independent(constraints.real, 3)
    codomain = constraints.independent(constraints.real, 3)
    _image_shape: torch.Size
    _context_shape: torch.Size

    @property
    def shape(self) -> torch.Size:
        """The image shape ``(C, H, W)``."""
        return self._image_shape

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self._image_shape)})"

    def _check_event(self, shape: Sequence[int], name: str) -> None:
        if len(shape) < 3 or tuple(shape[-3:]) != tuple(self._image_shape):
            channels, height, width = self._image_shape
            raise ValueError(f"{name} has shape {tuple(shape)} but the image flow expects (..., C, H, W) = "
                             f"(..., {channels}, {height}, {width})")

    def forward_shape(self, shape: torch.Size) -> torch.Size:
        """The output shape for an input of ``shape``: its batch shape broadcast with the context's
        (as :meth:`ConditionedFFJORD.forward_shape`), then ``(C, H, W)``."""
        shape = torch.Size(shape)
        self._check_event(shape, "an input")
        try:
            return torch.broadcast_shapes(shape[:-3], self._context_shape) + shape[-3:]
        except RuntimeError:
            raise ValueError(f"input batch shape {tuple(shape[:-3])} does not broadcast against the context's "
                             f"batch shape {tuple(self._context_shape)}") from None

    inverse_shape = forward_shape

    def _solve(self, x: Tensor, reverse: bool):
        if not isinstance(x, Tensor):
            raise TypeError(f"{'y' if reverse else 'x'} must be a tensor, got {type(x).__name__}")
        self._check_event(x.shape, "y" if reverse else "x")
        flat = x.reshape(x.shape[:-3] + (self._image_shape.numel(),))
        z, ladj = super()._solve(flat, reverse)  # FFJORD's checks and solve, on (..., D)
        return z.reshape(z.shape[:-1] + self._image_shape), ladj

    def with_cache(self, cache_size: int = 1) -> Transform:
        if cache_size == self._cache_size:
            return self
        return ConditionedImageFFJORD(self._image_shape, self._setup_fn, self._stats, self._state_key_fn,
                                      self._context_shape, cache_size)


class ConditionedImageFFJORD(_ImageEvent, ConditionedFFJORD):
    """The image FFJORD bijection for fixed parameters (and context): what
    :meth:`ConditionalImageFFJORD.condition` returns. See :class:`~pyro_ffjord.ConditionedFFJORD`."""

    def __init__(self, shape: Sequence[int], setup_fn, stats: SolveStats, state_key_fn,
                 context_shape: torch.Size = torch.Size(), cache_size: int = 1) -> None:
        super().__init__(setup_fn, stats, state_key_fn, context_shape, cache_size)
        self._image_shape = torch.Size(shape)


def _init_image(flow: _FFJORDParams, shape: torch.Size, hidden_channels, kernel_size: int, strides,
                preset: Optional[str], options: dict, **net_kwargs) -> None:
    """What FFJORD's ``_init_params`` does, with image defaults and a convolutional field."""
    if "hidden_dims" in options:
        raise TypeError("image flows take hidden_channels (channels of the hidden conv layers), not hidden_dims")
    options = apply_preset(preset, {k: v for k, v in options.items() if v is not None})
    for key, value in IMAGE_DEFAULTS.items():
        options.setdefault(key, value)  # after the preset: a preset's trace wins over the default
    hidden = DEFAULT_HIDDEN_CHANNELS if hidden_channels is None else hidden_channels
    options["hidden_dims"] = hidden
    factory = partial(_conv_field, shape, kernel_size, strides)
    flow._init_params(shape.numel(), None, options, net_factory=factory, **net_kwargs)


def _conv_field(shape, kernel_size, strides, input_dim: int, hidden, **architecture) -> ConvODENet:
    return ConvODENet(shape, hidden, kernel_size=kernel_size, strides=strides, **architecture)


class ImageFFJORD(_ImageEvent, FFJORD):
    r"""FFJORD on images: a learnable bijection of :math:`\mathbb{R}^{C \times H \times W}`
    (``event_dim = 3``) whose vector field is convolutional (:class:`~pyro_ffjord.conv_nets.ConvODENet`).

    The ODE is FFJORD's, solved on the flattened image (``D = C*H*W``), with the same log-det

    .. math::

        \log\left|\det\frac{\partial y}{\partial x}\right| = \int_0^T
        \mathrm{tr}\left(\frac{\partial f}{\partial z(t)}\right)dt .

    Inputs have shape ``(..., C, H, W)``; anything else is refused with an error naming the
    expected shape. Use it over an image base, e.g. ``Normal(0, 1).expand((C, H, W)).to_event(3)``,
    or in a multiscale stack (:class:`~pyro_ffjord.multiscale.MultiscaleFFJORD`).

    Defaults for images: ``time_embedding="concat"`` (a time channel concatenated to each layer's
    input, the reference's ``ConcatConv2d``) and ``activation="softplus"``, as in the paper's
    image models; ``trace="hutchinson"`` in training mode (the exact trace costs D backward
    passes per function evaluation). Eval mode uses ``eval_trace`` (default ``"exact"``, so
    reported likelihoods are exact, at D backward passes per evaluation: hundreds of times a
    training step's cost for MNIST-sized images); pass ``eval_trace="hutchinson"`` for cheap
    unbiased estimates of the log-density instead. Everything else (solvers, ``T``, RNODE
    weights, ``adjoint``, presets, caching, state_dict) is as in :class:`~pyro_ffjord.FFJORD`.

    Example::

        >>> import pyro.distributions as dist
        >>> flow = ImageFFJORD((1, 4, 4), hidden_channels=[8, 8])
        >>> base = dist.Normal(torch.zeros(1, 4, 4), 1.).to_event(3)
        >>> d = dist.TransformedDistribution(base, [flow])
        >>> y = d.rsample((5,))
        >>> y.shape, d.log_prob(y).shape
        (torch.Size([5, 1, 4, 4]), torch.Size([5]))

    :param shape: the image shape ``(C, H, W)``.
    :param hidden_channels: channels of the field's hidden conv layers (default ``(64, 64, 64)``,
        the paper's).
    :param int kernel_size: odd kernel size of the stride-1 layers (default 3).
    :param strides: per layer (hidden ones, then output) 1, 2 (halves H, W) or -2 (doubles
        them); default all 1, as the paper's multiscale models.
    :param str preset: a named option set of :data:`pyro_ffjord.config.PRESETS`.

    Other keywords: FFJORD's options and architecture keywords (``activation``,
    ``time_embedding``: ``"concat"`` or ``"concatsquash"``, ``zero_init``).
    """

    def __init__(
        self,
        shape: Sequence[int],
        hidden_channels: Optional[Sequence[int]] = DEFAULT_HIDDEN_CHANNELS,
        kernel_size: int = 3,
        strides: Optional[Sequence[int]] = None,
        preset: Optional[str] = None,
        **options,
    ) -> None:
        # FFJORD.__init__ without its MLP field: the same transform state, then a conv field.
        super(FFJORD, self).__init__(self._setup, SolveStats(), self._state_key)
        self._image_shape = check_image_shape(shape)
        _init_image(self, self._image_shape, hidden_channels, kernel_size, strides, preset, options)


def image_ffjord(shape: Sequence[int], hidden_channels: Optional[Sequence[int]] = DEFAULT_HIDDEN_CHANNELS,
                 **options) -> ImageFFJORD:
    """A helper in Pyro's style that builds an :class:`ImageFFJORD`.

    Example::

        >>> image_ffjord((3, 8, 8), hidden_channels=[16]).event_dim
        3
    """
    return ImageFFJORD(shape, hidden_channels=hidden_channels, **options)


class ConditionalImageFFJORD(ConditionalFFJORD):
    r""":class:`ImageFFJORD` whose field depends on a context :math:`c` of shape
    ``(..., context_dim)``, one per sample: :meth:`condition` returns a
    :class:`ConditionedImageFFJORD`, whose batch shape is the input's broadcast with the
    context's (as :class:`~pyro_ffjord.ConditionalFFJORD`).

    Conditioning (see :mod:`pyro_ffjord.conv_nets`): ``"concat"`` adds :math:`W_c c` to every
    channel of the first layer's output, ``"bias"`` adds per-channel biases :math:`b_l(c)` to
    every layer's output; ``"lowrank"`` is not available for convolutional fields.

    Example::

        >>> import pyro.distributions as dist
        >>> flow = ConditionalImageFFJORD((1, 4, 4), context_dim=3, hidden_channels=[8])
        >>> base = dist.Normal(torch.zeros(1, 4, 4), 1.).to_event(3)
        >>> d = dist.ConditionalTransformedDistribution(base, [flow]).condition(torch.randn(5, 3))
        >>> d.rsample().shape
        torch.Size([5, 1, 4, 4])

    :param shape: the image shape ``(C, H, W)``.
    :param int context_dim: dimension of the context.
    :param str conditioning: ``"concat"`` (default) or ``"bias"``.

    Other arguments are those of :class:`ImageFFJORD`.
    """

    def __init__(
        self,
        shape: Sequence[int],
        context_dim: int,
        hidden_channels: Optional[Sequence[int]] = DEFAULT_HIDDEN_CHANNELS,
        conditioning: str = "concat",
        kernel_size: int = 3,
        strides: Optional[Sequence[int]] = None,
        preset: Optional[str] = None,
        **options,
    ) -> None:
        # ConditionalFFJORD.__init__ without its MLP field.
        super(ConditionalFFJORD, self).__init__()
        if not (isinstance(context_dim, int) and not isinstance(context_dim, bool) and context_dim > 0):
            raise ValueError(f"context_dim must be a positive int, got {context_dim!r}")
        self._stats = SolveStats()
        self._image_shape = check_image_shape(shape)
        _init_image(self, self._image_shape, hidden_channels, kernel_size, strides, preset, options,
                    context_dim=context_dim, conditioning=conditioning)

    @property
    def shape(self) -> torch.Size:
        """The image shape ``(C, H, W)``."""
        return self._image_shape

    def condition(self, context: Tensor) -> ConditionedImageFFJORD:
        check_tensor(context, "context", self.context_dim, "context_dim", next(self.net.parameters()))
        key = partial(self._context_state_key, context)
        return ConditionedImageFFJORD(self._image_shape, partial(self._setup, context), self._stats, key,
                                      context.shape[:-1])
