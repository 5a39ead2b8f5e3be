r"""FFJORD conditioned on a context, as a Pyro
:class:`~pyro.distributions.conditional.ConditionalTransformModule`."""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

from pyro.distributions.conditional import ConditionalTransformModule
from torch import Tensor

from .checks import check_tensor
from .ffjord import ConditionedFFJORD, _FFJORDParams
from .stats import HasSolveStats, SolveStats


class ConditionalFFJORD(HasSolveStats, _FFJORDParams, ConditionalTransformModule):
    r"""FFJORD whose vector field :math:`f(z, t; c)` depends on a context :math:`c`, e.g. the
    encoder output of a VAE for an amortized posterior :math:`q(z \mid x)`.

    :meth:`condition` returns a :class:`~pyro_ffjord.ffjord.ConditionedFFJORD`. The context has
    shape ``(..., context_dim)`` and broadcasts against the input's batch shape (both ways: the
    output's batch shape is the broadcast of the two, and ``forward_shape``/``inverse_shape``
    say so), so a :class:`~pyro.distributions.ConditionalTransformedDistribution` conditioned on
    a context of batch shape ``(N,)`` has batch shape ``(N,)`` even with an unbatched base.
    Conditioning:

    - ``"concat"``: the context joins the input of the first layer (computed once per solve
      as a per-sample bias :math:`W_c c`).
    - ``"lowrank"`` (the paper's amortization for VAEs): a linear head maps :math:`c` to
      per-sample factors :math:`U_l(c), V_l(c)` of rank ``rank`` and biases :math:`b_l(c)` for
      every layer :math:`l`, which adds :math:`h_l U_l V_l^\top + b_l` to the layer's output.
    - ``"bias"``: per-sample biases :math:`b_l(c)` only.

    Example::

        >>> import torch
        >>> import pyro.distributions as dist
        >>> flow = ConditionalFFJORD(2, context_dim=3, hidden_dims=[16], conditioning="lowrank")
        >>> base = dist.Normal(torch.zeros(2), 1.).to_event(1)
        >>> d = dist.ConditionalTransformedDistribution(base, [flow]).condition(torch.randn(5, 3))
        >>> d.rsample().shape
        torch.Size([5, 2])

    :param int input_dim: dimension of the flow.
    :param int context_dim: dimension of the context.
    :param hidden_dims: hidden widths (default :func:`~pyro_ffjord.config.default_hidden_dims`).
    :param str conditioning: ``"concat"`` (default), ``"lowrank"`` or ``"bias"``.
    :param int rank: rank of the per-sample weights with ``"lowrank"``.

    Other arguments and options are those of :class:`~pyro_ffjord.FFJORD`.

    References:

    [1] Grathwohl, Chen et al. FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models. ICLR 2019 (section 4.3, amortized low-rank CNF posteriors).
    """

    def __init__(
        self,
        input_dim: int,
        context_dim: int,
        hidden_dims: Optional[Sequence[int]] = None,
        conditioning: str = "concat",
        rank: int = 1,
        preset: Optional[str] = None,
        **options,
    ) -> None:
        super().__init__()
        if not (isinstance(context_dim, int) and not isinstance(context_dim, bool) and context_dim > 0):
            raise ValueError(f"context_dim must be a positive int, got {context_dim!r}")
        self._stats = SolveStats()
        self._init_params(
            input_dim,
            preset,
            dict(options, hidden_dims=hidden_dims),
            context_dim=context_dim,
            conditioning=conditioning,
            rank=rank,
        )

    @property
    def context_dim(self) -> int:
        return self.net.context_dim

    def condition(self, context: Tensor) -> ConditionedFFJORD:
        check_tensor(context, "context", self.context_dim, "context_dim", next(self.net.parameters()))
        key = partial(self._context_state_key, context)
        return ConditionedFFJORD(partial(self._setup, context), self._stats, key, context.shape[:-1])

    def _context_state_key(self, context: Tensor) -> tuple:
        return (*self._state_key(), context._version)  # a context changed in place is another map

    def forward(self, *args, **kwargs):
        raise TypeError(
            "ConditionalFFJORD is a conditional transform: condition it on a context first, "
            "flow.condition(context)(x), or use it in pyro.distributions.ConditionalTransformedDistribution"
            "(base, [flow]).condition(context)"
        )


def conditional_ffjord(
    input_dim: int, context_dim: int, hidden_dims: Optional[Sequence[int]] = None, **options
) -> ConditionalFFJORD:
    """A helper in Pyro's style that builds a :class:`ConditionalFFJORD`.

    Example::

        >>> conditional_ffjord(2, 4, conditioning="bias").context_dim
        4
    """
    return ConditionalFFJORD(input_dim, context_dim, hidden_dims=hidden_dims, **options)
