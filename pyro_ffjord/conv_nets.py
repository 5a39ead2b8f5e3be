r"""Convolutional vector fields :math:`f(z, t)` on images, for FFJORD on event shape ``(C, H, W)``.

The ODE machinery (:mod:`pyro_ffjord.ode`, :mod:`pyro_ffjord.divergence`) works on flat states
``(..., D)``; :class:`ConvODENet` takes and returns such flat vectors, ``D = C * H * W``, and
reshapes to ``(N, C, H, W)`` only inside, so that both trace estimators, RNODE, the drift check
and the adjoint work on images unchanged. Each layer is a convolution with time mixed in:

- ``"concat"`` (:class:`ConcatConv2d`, the layer of the paper's image models): a constant
  channel holding :math:`t` is concatenated to the input, :math:`\mathrm{conv}([t, h])`;
- ``"concatsquash"`` (:class:`ConcatSquashConv2d`): each output channel is gated and shifted,
  :math:`\mathrm{conv}(h)\,\mathrm{sigmoid}(a t + c) + d\,t`.

A nonlinearity follows every layer but the last. Conditioning on a context :math:`c` (one per
sample) adds a per-sample, per-channel bias to a layer's output (before the time gate):

- ``"concat"``: :math:`W_c c` on the first layer only. This is what concatenating :math:`c` to
  the input as constant channels computes away from the image border (with zero padding, such
  channels would also mark the border);
- ``"bias"``: :math:`b_l(c)` on every layer :math:`l`, from one linear head.

``"lowrank"`` (per-sample low-rank weights, :class:`~pyro_ffjord.nets.ODENet`'s amortization for
VAEs) has no convolutional counterpart here and is refused.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .nets import LayerConditioning, VectorField, activation_name, make_activation

CONV_CONDITIONINGS = ("concat", "bias")
STRIDES = (1, 2, -2)


def _conv(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Module:
    # The reference's choices: 'same' convolutions at stride 1, a 4x4 kernel with padding 1 to
    # halve (stride 2) or double (stride -2, transposed) the resolution exactly.
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
    if stride == 2:
        return nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1)
    return nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1)


class ConcatConv2d(nn.Module):
    r""":math:`\mathrm{conv}([t, h])`: a channel holding :math:`t` joins the input (zero padded
    like the other channels, so the border sees it too)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = _conv(in_channels + 1, out_channels, kernel_size, stride)

    def forward(self, t: Tensor, h: Tensor, extra: Optional[Tensor] = None) -> Tensor:
        tt = t.to(h.dtype).reshape(1, 1, 1, 1).expand(h.shape[0], 1, *h.shape[2:])
        out = self.conv(torch.cat([tt, h], 1))
        return out if extra is None else out + extra

    def zero_(self) -> None:
        for p in self.conv.parameters():
            nn.init.zeros_(p)


class ConcatSquashConv2d(nn.Module):
    r""":math:`(\mathrm{conv}(h) + e)\,\mathrm{sigmoid}(a t + c) + d\,t`, per output channel, with
    :math:`e` the conditioning bias (if any)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = _conv(in_channels, out_channels, kernel_size, stride)
        # As in ConcatSquashLinear: the time maps are Linear(1, out) layers, default init U(-1, 1).
        self.gate_weight = nn.Parameter(torch.empty(out_channels).uniform_(-1, 1))
        self.gate_bias = nn.Parameter(torch.empty(out_channels).uniform_(-1, 1))
        self.shift_weight = nn.Parameter(torch.empty(out_channels).uniform_(-1, 1))

    def forward(self, t: Tensor, h: Tensor, extra: Optional[Tensor] = None) -> Tensor:
        out = self.conv(h)
        if extra is not None:
            out = out + extra
        gate = torch.sigmoid(self.gate_weight * t + self.gate_bias)
        return out * gate[:, None, None] + (self.shift_weight * t)[:, None, None]

    def zero_(self) -> None:
        for p in (*self.conv.parameters(), self.shift_weight):
            nn.init.zeros_(p)


CONV_LAYERS = {"concat": ConcatConv2d, "concatsquash": ConcatSquashConv2d}


def _positive_ints(value, name: str, example: str) -> List[int]:
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    )
    if not ok:
        raise ValueError(f"{name} must be a list of positive ints, e.g. {example}, got {value!r}")
    return list(value)


def check_image_shape(shape) -> torch.Size:
    """``shape`` as a :class:`torch.Size` ``(C, H, W)`` of positive ints, else a clear error.

    Example::

        >>> check_image_shape((1, 28, 28))
        torch.Size([1, 28, 28])
    """
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3):
        raise ValueError(f"shape must be an image shape (C, H, W), e.g. (1, 28, 28), got {shape!r}")
    return torch.Size(_positive_ints(shape, "shape (C, H, W)", "(1, 28, 28)"))


def _check_strides(strides, n_layers: int, height: int, width: int) -> Tuple[int, ...]:
    if strides is None:
        return (1,) * n_layers
    if not (isinstance(strides, (list, tuple)) and len(strides) == n_layers and all(s in STRIDES for s in strides)):
        raise ValueError(f"strides must list one of {STRIDES} per layer ({n_layers} layers: the hidden ones "
                         f"and the output one), got {strides!r}")
    h, w = height, width
    for i, s in enumerate(strides):
        if s == 2 and (h % 2 or w % 2):
            raise ValueError(f"strides={tuple(strides)}: layer {i} halves a {h}x{w} map, which needs even sizes")
        h, w = (h // 2, w // 2) if s == 2 else (h * 2, w * 2) if s == -2 else (h, w)
    if (h, w) != (height, width):
        raise ValueError(f"strides={tuple(strides)} map {height}x{width} images to {h}x{w}; the field must "
                         "return the input's size (as many -2 as 2)")
    return tuple(strides)


class ConvODENet(VectorField):
    r"""A convolutional vector field :math:`f(z, t)` on images of shape ``(C, H, W)``, taking and
    returning flat vectors ``(..., C*H*W)`` (see the module docstring).

    It has the interface FFJORD's solve uses from :class:`~pyro_ffjord.nets.ODENet`:
    ``input_dim``, ``forward(t, z, cond)``, :meth:`condition`, :meth:`field_parameters` and an
    ``architecture`` record kept in the state_dict (loading one of another image shape, kernel,
    strides, activation, time embedding or conditioning is refused).

    :param shape: the image shape ``(C, H, W)``.
    :param hidden_channels: channels of the hidden layers, e.g. ``(64, 64, 64)``.
    :param activation: name (``"softplus"``, ``"tanh"``, ``"elu"``, ``"swish"``...) or module.
    :param str time_embedding: ``"concat"`` or ``"concatsquash"``.
    :param int context_dim: size of the context; 0 for an unconditional field.
    :param str conditioning: ``"concat"`` or ``"bias"`` (see the module docstring).
    :param bool zero_init: start with :math:`f \equiv 0` (the last layer and its conditioning
        bias start at zero), so the flow starts as the identity.
    :param int kernel_size: odd kernel size of the stride-1 layers (padded to keep the size).
    :param strides: one of 1, 2 (4x4 kernel, halves H and W) or -2 (transposed, doubles them) per
        layer, hidden ones then output, as in the reference; default all 1.

    Example::

        >>> net = ConvODENet((1, 4, 4), [8, 8])
        >>> net(torch.tensor(0.3), torch.randn(5, 16)).shape
        torch.Size([5, 16])
    """

    field_kind = "convolutional field"

    def __init__(
        self,
        shape: Sequence[int],
        hidden_channels: Sequence[int],
        activation: Union[str, Callable, nn.Module] = "softplus",
        time_embedding: str = "concat",
        context_dim: int = 0,
        conditioning: str = "concat",
        zero_init: bool = False,
        kernel_size: int = 3,
        strides: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        self.shape = check_image_shape(shape)
        hidden = _positive_ints(hidden_channels, "hidden_channels", "(64, 64, 64) (channels of the hidden layers)")
        if time_embedding not in CONV_LAYERS:
            raise ValueError(f"time_embedding={time_embedding!r}; choose one of {tuple(CONV_LAYERS)}")
        if conditioning not in CONV_CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r} is not supported by the convolutional field; "
                             f"choose one of {CONV_CONDITIONINGS}")
        if not (isinstance(kernel_size, int) and not isinstance(kernel_size, bool) and kernel_size > 0
                and kernel_size % 2 == 1):
            raise ValueError(f"kernel_size must be a positive odd int (padding keeps the size), got {kernel_size!r}")
        if not (isinstance(context_dim, int) and not isinstance(context_dim, bool) and context_dim >= 0):
            raise ValueError(f"context_dim must be an int >= 0, got {context_dim!r}")
        channels, height, width = self.shape
        self.strides = _check_strides(strides, len(hidden) + 1, height, width)
        self.input_dim = channels * height * width
        self.context_dim = context_dim
        self.conditioning = conditioning if context_dim > 0 else None
        # What a state_dict must agree on beyond tensor shapes (see get_extra_state): a conv
        # field's weights fit any image size, so the shape is recorded too.
        self.architecture = {"shape": tuple(self.shape), "activation": activation_name(activation),
                             "time_embedding": time_embedding, "conditioning": self.conditioning,
                             "kernel_size": kernel_size, "strides": self.strides}
        dims = [channels, *hidden, channels]
        self.layers = nn.ModuleList(
            CONV_LAYERS[time_embedding](a, b, kernel_size, s) for a, b, s in zip(dims[:-1], dims[1:], self.strides)
        )
        self.activation = make_activation(activation)
        self._bias_sizes = [dims[1]] if self.conditioning == "concat" else dims[1:]
        if self.conditioning == "concat":
            # As ODENet: cat(z, c) into the first layer == the first layer on z plus W_c c.
            self.context_proj = nn.Linear(context_dim, dims[1], bias=False)
        elif self.conditioning == "bias":
            self.head = nn.Linear(context_dim, sum(self._bias_sizes))
        if zero_init:
            self.layers[-1].zero_()
            if self.conditioning == "bias":
                with torch.no_grad():
                    self.head.weight[-channels:].zero_()
                    self.head.bias[-channels:].zero_()

    def _head_conditioning(self, context: Tensor) -> List[LayerConditioning]:
        # "bias": per-layer conditioning biases (..., channels) from one linear head.
        return [LayerConditioning(bias=b) for b in self.head(context).split(self._bias_sizes, dim=-1)]

    def forward(self, t: Tensor, z: Tensor, cond: Optional[List[LayerConditioning]] = None) -> Tensor:
        batch = z.shape[:-1]
        h = z.reshape(-1, *self.shape)  # every batch dim folded into N for the convolutions
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            extra = None
            if cond is not None and cond[i].bias is not None:
                # The context's batch broadcasts against z's (the solve expanded z to it).
                bias = cond[i].bias
                extra = bias.expand(batch + bias.shape[-1:]).reshape(h.shape[0], -1, 1, 1)
            h = layer(t, h, extra)
            if i < last:
                h = self.activation(h)
        return h.reshape(batch + (self.input_dim,))
