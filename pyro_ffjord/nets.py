r"""Time-dependent vector fields :math:`f(z, t)` for FFJORD, with optional conditioning.

Every layer computes an affine map of its input with time mixed in, then (except the last) a
nonlinearity. Conditioning on a context :math:`c` (one per sample) enters each layer as a
per-sample bias and, for ``"lowrank"``, a per-sample low-rank weight :math:`U V^\top`:

.. math::

    h_{l+1} = \sigma\big(\mathrm{layer}_l(h_l, t) + h_l U_l(c) V_l(c)^\top + b_l(c)\big).

The per-sample terms are computed once per solve by :meth:`ODENet.condition`, not once per
function evaluation.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
}
CONDITIONINGS = ("concat", "lowrank", "bias")


class LayerConditioning(NamedTuple):
    """Per-sample terms added to one layer: a bias (..., out) and low-rank factors."""

    bias: Optional[Tensor] = None
    u: Optional[Tensor] = None  # (..., in, rank)
    v: Optional[Tensor] = None  # (..., out, rank)


class ConcatSquashLinear(nn.Module):
    r""":math:`(W x + b)\,\mathrm{sigmoid}(a t + c) + d\,t`: time gates and shifts each unit."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        # The time maps are Linear(1, out) layers; PyTorch's default init for them is U(-1, 1).
        self.gate_weight = nn.Parameter(torch.empty(out_features).uniform_(-1, 1))
        self.gate_bias = nn.Parameter(torch.empty(out_features).uniform_(-1, 1))
        self.shift_weight = nn.Parameter(torch.empty(out_features).uniform_(-1, 1))

    def forward(self, t: Tensor, x: Tensor, extra: Optional[Tensor] = None) -> Tensor:
        h = self.linear(x)
        if extra is not None:
            h = h + extra
        return h * torch.sigmoid(self.gate_weight * t + self.gate_bias) + self.shift_weight * t

    def zero_(self) -> None:
        for p in (self.linear.weight, self.linear.bias, self.shift_weight):
            nn.init.zeros_(p)


class ConcatLinear(nn.Module):
    r""":math:`W [t, x] + b`, computed as :math:`W_x x + w_t t + b` to avoid a concatenation."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / (in_features + 1) ** 0.5
        self.time_weight = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))

    def forward(self, t: Tensor, x: Tensor, extra: Optional[Tensor] = None) -> Tensor:
        h = self.linear(x) + self.time_weight * t
        return h if extra is None else h + extra

    def zero_(self) -> None:
        for p in (self.linear.weight, self.linear.bias, self.time_weight):
            nn.init.zeros_(p)


LAYERS = {"concatsquash": ConcatSquashLinear, "concat": ConcatLinear}


class Elementwise(nn.Module):
    """A plain function such as ``torch.tanh`` as a module (what ``activation=torch.tanh`` builds)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return activation_name(self.fn)


def activation_name(activation) -> str:
    """What a state_dict records of an activation, to refuse loading into another one:
    ``"tanh"`` for the name, ``nn.Tanh``, ``nn.Tanh()`` and ``torch.tanh`` alike."""
    if isinstance(activation, str):
        return activation
    if isinstance(activation, Elementwise):
        activation = activation.fn
    for name, cls in ACTIVATIONS.items():
        if activation is cls or (type(activation) is cls and repr(activation) == repr(cls())):
            return name
        if activation in (getattr(torch, name, None), getattr(nn.functional, name, None)):
            return name
    if isinstance(activation, nn.Module):
        return repr(activation)
    return f"{getattr(activation, '__module__', None)}.{getattr(activation, '__qualname__', repr(activation))}"


def make_activation(activation: Union[str, Callable, nn.Module]) -> nn.Module:
    """A module from a name (``"tanh"``), a module, a module class (``nn.Tanh``) or an
    elementwise function (``torch.tanh``)."""
    if isinstance(activation, nn.Module):
        return activation
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} unknown; choose one of {sorted(ACTIVATIONS)}")
        return ACTIVATIONS[activation]()
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    if callable(activation):
        return Elementwise(activation)
    raise ValueError(
        f"activation must be a name {sorted(ACTIVATIONS)}, a module or a function, got {activation!r}"
    )


def _check_hidden_dims(hidden_dims) -> List[int]:
    ok = isinstance(hidden_dims, (list, tuple)) and all(
        isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden_dims
    )
    if not ok:
        raise ValueError(
            f"hidden_dims must be a list of positive ints (widths of the hidden layers, e.g. [64, 64]; "
            f"[] for a field linear in z), got {hidden_dims!r}"
        )
    return list(hidden_dims)


class VectorField(nn.Module):
    """What :class:`ODENet` and :class:`~pyro_ffjord.conv_nets.ConvODENet` share: their
    ``architecture`` record (what a state_dict must agree on beyond tensor shapes) kept in the
    state_dict and checked on loading, :meth:`field_parameters`, and :meth:`condition` up to the
    terms of a context head (``_head_conditioning``, each field's own)."""

    #: how :meth:`set_extra_state`'s error names the field
    field_kind = "vector field"
    architecture: Dict[str, Any]
    conditioning: Optional[str]

    def get_extra_state(self) -> dict:
        return dict(self.architecture)

    def set_extra_state(self, state: dict) -> None:
        # Shapes catch other widths; an activation or time embedding that differs would load
        # silently and compute another function.
        if state != self.architecture:
            diff = {k: (state.get(k), v) for k, v in self.architecture.items() if state.get(k) != v}
            raise ValueError(
                f"this state_dict was saved from a {self.field_kind} with another architecture: "
                + ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in diff.items())
                + "; build the flow with the saved options before loading"
            )

    def field_parameters(self) -> List[nn.Parameter]:
        """Parameters used inside :meth:`forward` (not those of the context head, which only
        reach the dynamics through :meth:`condition`'s outputs)."""
        return [*self.layers.parameters(), *self.activation.parameters()]

    def condition(self, context: Optional[Tensor]) -> Optional[List[LayerConditioning]]:
        """Per-layer conditioning terms for a context of shape ``(..., context_dim)``: with
        ``"concat"``, ``context_proj``'s bias on the first layer only; else the context head's."""
        if self.conditioning is None or context is None:
            return None
        if self.conditioning == "concat":
            first = LayerConditioning(bias=self.context_proj(context))
            return [first] + [LayerConditioning()] * (len(self.layers) - 1)
        return self._head_conditioning(context)

    def _head_conditioning(self, context: Tensor) -> List[LayerConditioning]:
        raise NotImplementedError


class ODENet(VectorField):
    r"""An MLP vector field :math:`f(z, t)` mapping ``input_dim`` to ``input_dim``.

    :param int input_dim: dimension of :math:`z`.
    :param hidden_dims: widths of the hidden layers.
    :param activation: name (``"tanh"``, ``"softplus"``, ``"elu"``, ``"swish"``...) or module.
    :param str time_embedding: ``"concatsquash"`` or ``"concat"``.
    :param int context_dim: size of the context; 0 for an unconditional field.
    :param str conditioning: ``"concat"``, ``"lowrank"`` or ``"bias"`` (see module docstring).
    :param int rank: rank of the per-sample weights for ``"lowrank"``.
    :param bool zero_init: start with :math:`f \equiv 0`, so the flow is the identity at
        initialisation (the conditioning terms of the last layer start at zero too).

    Example::

        >>> net = ODENet(2, [16, 16])
        >>> net(torch.tensor(0.3), torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Sequence[int],
        activation: Union[str, Callable, nn.Module] = "tanh",
        time_embedding: str = "concatsquash",
        context_dim: int = 0,
        conditioning: str = "concat",
        rank: int = 1,
        zero_init: bool = False,
    ) -> None:
        super().__init__()
        if time_embedding not in LAYERS:
            raise ValueError(f"time_embedding={time_embedding!r}; choose one of {tuple(LAYERS)}")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning={conditioning!r}; choose one of {CONDITIONINGS}")
        if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        hidden_dims = _check_hidden_dims(hidden_dims)
        self.input_dim = input_dim
        self.context_dim = context_dim
        self.conditioning = conditioning if context_dim > 0 else None
        # What a state_dict must agree on beyond tensor shapes (see get_extra_state).
        self.architecture = {"activation": activation_name(activation), "time_embedding": time_embedding,
                             "conditioning": self.conditioning, "rank": rank if self.conditioning == "lowrank" else None}
        self.rank = rank
        dims = [input_dim, *hidden_dims, input_dim]
        self.layers = nn.ModuleList(LAYERS[time_embedding](a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.activation = make_activation(activation)
        self._head_slices: List[tuple] = []
        if self.conditioning == "concat":
            # cat(z, c) into the first layer == first layer on z plus a per-sample bias W_c c.
            self.context_proj = nn.Linear(context_dim, dims[1], bias=False)
        elif self.conditioning is not None:
            sizes = []
            for a, b in zip(dims[:-1], dims[1:]):
                bias, u, v = b, (a * rank if conditioning == "lowrank" else 0), (b * rank if conditioning == "lowrank" else 0)
                sizes.append((bias, u, v))
            self._head_slices = sizes
            self.head = nn.Linear(context_dim, sum(sum(s) for s in sizes))
        if zero_init:
            self.layers[-1].zero_()
            if self.conditioning in ("lowrank", "bias"):
                self._zero_last_head_terms()

    def _zero_last_head_terms(self) -> None:
        # Zero the last layer's per-sample bias and V factor (not U, so V still gets gradients).
        start = sum(sum(s) for s in self._head_slices[:-1])
        bias, u, v = self._head_slices[-1]
        with torch.no_grad():
            for lo, hi in ((start, start + bias), (start + bias + u, start + bias + u + v)):
                self.head.weight[lo:hi].zero_()
                self.head.bias[lo:hi].zero_()

    def _head_conditioning(self, context: Tensor) -> List[LayerConditioning]:
        # "lowrank" and "bias": every layer's terms, sliced from one linear head.
        flat = self.head(context)
        batch = context.shape[:-1]
        out, offset = [], 0
        for layer, (nb, nu, nv) in zip(self.layers, self._head_slices):
            bias = flat[..., offset : offset + nb]
            offset += nb
            u = v = None
            if nu:
                u = flat[..., offset : offset + nu].reshape(*batch, -1, self.rank)
                offset += nu
                v = flat[..., offset : offset + nv].reshape(*batch, -1, self.rank)
                offset += nv
            out.append(LayerConditioning(bias, u, v))
        return out

    def forward(self, t: Tensor, z: Tensor, cond: Optional[List[LayerConditioning]] = None) -> Tensor:
        h = z
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            extra = None
            if cond is not None:
                c = cond[i]
                extra = c.bias
                if c.u is not None:
                    low = ((h.unsqueeze(-2) @ c.u) @ c.v.transpose(-1, -2)).squeeze(-2)
                    extra = low if extra is None else extra + low
            h = layer(t, h, extra)
            if i < last:
                h = self.activation(h)
        return h
