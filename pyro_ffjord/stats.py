"""What the solves of a flow leave behind: function-evaluation counts and the RNODE penalty,
the properties every FFJORD transform exposes for them, and :func:`regularization`, which
sums the penalties of all the flows inside a module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # only for the annotation: ode.py imports this module
    from .ode import AugmentedDynamics


class SolveStats:
    """Function-evaluation counts and the RNODE penalty of a transform's solves.

    ``nfe_forward`` / ``nfe_backward`` refer to the latest solve (the backward count grows
    while the adjoint pass runs; with direct backpropagation it stays 0 and autograd replays
    the ``nfe_forward`` evaluations). The ``*_total`` counters accumulate over all solves.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.solves = 0
        self.nfe_forward_total = 0
        self.nfe_backward_total = 0
        self.regularization: Optional[Tensor] = None
        self.last: Optional[AugmentedDynamics] = None
        self.training_solves = 0  # fixed-grid training solves, for the drift check
        self.drift = None  # the latest pyro_ffjord.drift.Drift measured

    def __getstate__(self) -> dict:
        # The latest solve and its penalty hold graph tensors: copies and pickles start clean.
        return dict(self.__dict__, last=None, regularization=None)

    @property
    def nfe_forward(self) -> int:
        return 0 if self.last is None else self.last.nfe_forward

    @property
    def nfe_backward(self) -> int:
        return 0 if self.last is None else self.last.nfe_backward


class HasSolveStats:
    """The solve statistics of a flow, as properties; the flow keeps them in ``_stats``
    (a conditional flow shares one :class:`SolveStats` with every transform it conditions)."""

    _stats: SolveStats

    @property
    def stats(self) -> SolveStats:
        """Counters of this flow's solves (see :class:`SolveStats`)."""
        return self._stats

    @property
    def nfe_forward(self) -> int:
        """Function evaluations of the latest solve."""
        return self._stats.nfe_forward

    @property
    def nfe_backward(self) -> int:
        """Function evaluations of the latest solve's adjoint pass (0 without ``adjoint``)."""
        return self._stats.nfe_backward

    @property
    def regularization(self) -> Optional[Tensor]:
        r"""Weighted RNODE penalty of the latest solve: ``kinetic`` times the batch mean of
        :math:`\int_0^T \tfrac{1}{2D}\lVert f\rVert^2 dt` plus ``jacobian`` times that of
        :math:`\int_0^T \tfrac1D \lVert \partial f/\partial z\rVert_F^2 dt` (estimated with the
        solve's probe vectors). A differentiable scalar when the owning module is training, a
        weight is set and gradients are enabled; otherwise ``None``. Add it to the loss."""
        return self._stats.regularization


def regularization(module: torch.nn.Module) -> Tensor:
    """The summed RNODE penalty of the latest solves of every FFJORD inside ``module``
    (a guide, a model's :class:`~pyro.nn.PyroModule`, or a flow); 0 when there is none.

    Add it to an SVI loss computed by hand::

        loss = Trace_ELBO().differentiable_loss(model, guide, *args) + regularization(guide)
        loss.backward()

    Example::

        >>> from pyro_ffjord import FFJORD
        >>> flow = FFJORD(2, kinetic=0.1)
        >>> _ = flow(torch.randn(4, 2))
        >>> bool(regularization(flow) > 0)
        True
    """
    total = torch.zeros(())
    for m in module.modules():
        if isinstance(m, HasSolveStats) and m.regularization is not None:
            total = total + m.regularization
    return total
