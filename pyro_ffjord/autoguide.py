"""An autoguide whose posterior is a stack of FFJORD flows."""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
from pyro.distributions.transforms import iterated
from pyro.infer.autoguide import AutoNormalizingFlow

from .ffjord import ffjord
from .stats import regularization


class AutoFFJORD(AutoNormalizingFlow):
    """:class:`~pyro.infer.autoguide.AutoNormalizingFlow` with ``num_flows`` FFJORD flows
    over a standard normal, the one-line CNF guide::

        guide = AutoFFJORD(model, num_flows=2, kinetic=0.01)

    It is the same as ``AutoNormalizingFlow(model, partial(iterated, num_flows, ffjord,
    **options))``. A single CNF is already a universal flow; a second one mainly adds depth
    in time. Keyword options are those of :class:`~pyro_ffjord.FFJORD`.

    :param callable model: a Pyro model.
    :param int num_flows: flows in sequence.
    :param hidden_dims: widths of each flow's vector field (default from :func:`ffjord`).
    """

    def __init__(
        self,
        model: Callable,
        num_flows: int = 1,
        hidden_dims: Optional[Sequence[int]] = None,
        **options,
    ) -> None:
        if not (isinstance(num_flows, int) and not isinstance(num_flows, bool) and num_flows >= 1):
            raise ValueError(f"num_flows must be a positive int, got {num_flows!r}")
        init = partial(iterated, num_flows, ffjord, hidden_dims=hidden_dims, **options)
        super().__init__(model, init)

    @property
    def regularization(self) -> torch.Tensor:
        """Summed RNODE penalty of the latest guide sample (see :func:`regularization`)."""
        return regularization(self)
