r"""The augmented ODE of a continuous normalizing flow and its solve.

Time is rescaled to :math:`s \in [0, 1]`, :math:`t = sT`, so that the end time :math:`T` is an
ordinary tensor inside the dynamics and gets exact gradients (directly, or through the adjoint
as one of its parameters). The state is

.. math::

    \frac{d}{ds}\begin{pmatrix} z \\ \ell \\ k \\ j \end{pmatrix}
    = \begin{pmatrix} T f(z, sT) \\ T\,\mathrm{tr}(\partial f/\partial z) \\
      \tfrac{T}{2D}\lVert f\rVert^2 \\ \tfrac{T}{D}\lVert \epsilon^\top \partial f/\partial z\rVert^2
      \end{pmatrix},

with :math:`\ell(1) = \log|\det \partial z(1)/\partial z(0)|`; the RNODE states :math:`k, j`
exist only while regularizing and never drive step-size control.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint

from .config import FFJORDConfig, is_adaptive
from .divergence import exact_divergence, hutchinson_divergence
from .nets import LayerConditioning
from .stats import SolveStats

_ADVICE = (
    "Try looser tolerances (atol/rtol), RNODE regularization (kinetic=0.01, jacobian=0.01), "
    "a fixed-step solver (solver='rk4', step_size=T/8), or a larger max_nfe if the dynamics "
    "are merely hard."
)


class SolverError(ValueError):
    """The ODE solve failed: step budget exceeded, step-size underflow or non-finite state."""


class AugmentedDynamics:
    """The right-hand side of one solve: it holds that solve's noise, context terms and T, so
    the adjoint pass reuses exactly them even if other solves happen in between.

    ``kinetic`` and ``jacobian`` are the RNODE weights of this solve (0 adds no state);
    ``noise`` holds Hutchinson's probe vectors when ``trace="hutchinson"``."""

    def __init__(
        self,
        net: Callable,
        *,
        T: Tensor,
        stats: SolveStats,
        cond: Optional[List[LayerConditioning]] = None,
        trace: str = "exact",
        noise: Optional[Tensor] = None,
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        max_nfe: int = 20_000,
    ) -> None:
        self.net, self.cond, self.T = net, cond, T
        self.trace, self.noise = trace, noise
        self.kinetic, self.jacobian = kinetic, jacobian
        self.max_nfe, self.stats = max_nfe, stats
        self.nfe_forward = self.nfe_backward = 0
        self.solving = False

    def _count(self) -> None:
        if self.solving:
            self.nfe_forward += 1
            n, where = self.nfe_forward, "forward"
        else:  # only the adjoint pass calls us outside the forward solve
            self.nfe_backward += 1
            self.stats.nfe_backward_total += 1
            n, where = self.nfe_backward, "adjoint (backward)"
        if n > self.max_nfe:
            raise SolverError(
                f"the {where} solve exceeded its step budget of max_nfe={self.max_nfe} function "
                f"evaluations: the dynamics are stiff or diverging. {_ADVICE}"
            )

    def __call__(self, s: Tensor, state: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        self._count()
        z = state[0]
        graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not (graph and z.requires_grad):
                # Without a graph to extend (e.g. the adjoint's no-grad forward solve) start a
                # fresh leaf: a view made under no_grad cannot be differentiated against.
                z = z.detach().requires_grad_()
            f = self.T * self.net(s * self.T, z, self.cond)
            if self.trace == "exact":
                div, frob = exact_divergence(f, z, graph, self.jacobian)
            else:
                div, frob = hutchinson_divergence(f, z, self.noise, graph, self.jacobian)
        out = [f, div]
        if self.kinetic or self.jacobian:
            out.append(0.5 * f.pow(2).mean(-1) / self.T if self.kinetic else torch.zeros_like(div))
            out.append(frob / self.T if self.jacobian else torch.zeros_like(div))
        if not graph:
            out = [o.detach() for o in out]
        return tuple(out)


def batch_rms(state: Sequence[Tensor]) -> Tensor:
    """Step-size control norm of ``error_norm="batch"``: the larger of the RMS of z and of the
    log-det over the whole batch (torchdiffeq's default, without the RNODE states)."""
    return torch.max(state[0].pow(2).mean().sqrt(), state[1].pow(2).mean().sqrt())


def worst_sample_rms(state: Sequence[Tensor]) -> Tensor:
    """Step-size control norm of ``error_norm="sample"``: the worst sample's RMS over
    (z, log-det), so that one sample's error cannot hide in the batch."""
    z, logdet = state[0], state[1]
    per_sample = (z.pow(2).sum(-1) + logdet.pow(2)) / (z.shape[-1] + 1)
    return per_sample.max().sqrt()


def solve(
    dynamics: AugmentedDynamics,
    x: Tensor,
    *,
    reverse: bool,
    config: FFJORDConfig,
    solver: str,
    adjoint: bool,
    adjoint_params: Sequence[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Integrate from ``x`` (s: 0 -> 1, or 1 -> 0 if ``reverse``).

    Returns the end point and :math:`\\log|\\det J|` of the *forward* map (so the same
    quantity in both directions), and stores the RNODE penalty in ``dynamics.stats``.
    """
    zeros = x.new_zeros(x.shape[:-1])
    regularize = dynamics.kinetic or dynamics.jacobian
    state = (x, zeros, zeros, zeros) if regularize else (x, zeros)
    grid = [1.0, 0.0] if reverse else [0.0, 1.0]
    s = torch.tensor(grid, dtype=x.dtype, device=x.device)
    kwargs: dict = {"method": solver, "rtol": config.rtol, "atol": config.atol}
    if is_adaptive(solver):
        kwargs["options"] = {"norm": worst_sample_rms if config.error_norm == "sample" else batch_rms}
    else:
        kwargs["options"] = {"step_size": 1.0 / config.fixed_steps(float(dynamics.T.detach()))}
    dynamics.stats.solves += 1
    dynamics.stats.last = dynamics
    dynamics.solving = True
    try:
        if adjoint:
            if is_adaptive(solver):
                # Seminorm: the parameter adjoints need no error control (Kidger et al., 2021).
                kwargs["adjoint_options"] = {"norm": "seminorm"}
            params = tuple(p for p in adjoint_params if p.requires_grad)
            out = odeint_adjoint(dynamics, state, s, adjoint_params=params, **kwargs)
        else:
            out = odeint(dynamics, state, s, **kwargs)
    except AssertionError as e:  # torchdiffeq signals underflow and step limits by assert
        raise SolverError(f"ODE solver {solver!r} failed ({e}). {_ADVICE}") from e
    finally:
        dynamics.solving = False
        dynamics.stats.nfe_forward_total += dynamics.nfe_forward
    end = [o[-1] for o in out]
    z, logdet = end[0], end[1]
    if not bool(torch.isfinite(z).all() and torch.isfinite(logdet).all()):
        raise SolverError(f"the ODE solution is not finite (diverging dynamics). {_ADVICE}")
    if reverse:
        logdet = -logdet
    if regularize:
        kinetic, jacobian = (-e if reverse else e for e in end[2:])
        dynamics.stats.regularization = dynamics.kinetic * kinetic.mean() + dynamics.jacobian * jacobian.mean()
    return z, logdet
