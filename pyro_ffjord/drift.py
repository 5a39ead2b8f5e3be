r"""The safety net of fixed-step training.

By default a flow trains through a few fixed rk4 steps: several times cheaper than an adaptive
solve, and as good while the dynamics stay smooth. But a flow can learn to exploit a coarse
grid: the training loss then rewards a map that the exact solution does not have, and the
honest (adaptive, eval-mode) likelihood drifts away from the training one. So every
``drift_check`` training solves the same batch is solved again without gradients by the
adaptive eval solver, with the same trace estimator and probe vectors, and the two are
compared: the mean absolute log-det difference (nats) and the mean distance of the end points
relative to their scale. Above ``drift_tol`` the grid doubles (a warning says so) and training
goes on; the state_dict keeps the new step count.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .config import DEFAULT_EVAL_SOLVER, EVALS_PER_STEP, FFJORDConfig, is_adaptive
from .ode import AugmentedDynamics, SolverError, solve
from .stats import SolveStats


class DriftWarning(UserWarning):
    """The fixed-step training solve drifted from the adaptive one; the grid was refined."""


class Drift(NamedTuple):
    logdet: float  # mean |log-det (fixed grid) - log-det (adaptive)|, nats
    z: float  # mean |z (fixed grid) - z (adaptive)| / max(1, RMS of z)


def measure(dynamics: AugmentedDynamics, x: Tensor, z: Tensor, logdet: Tensor, *, reverse: bool,
            config: FFJORDConfig) -> Optional[Drift]:
    """The drift of one training solve (``z``, ``logdet`` from ``x``) against the adaptive
    solver of eval mode; ``None`` when that solve itself fails (then nothing is known)."""
    solver = config.eval_method if is_adaptive(config.eval_method) else DEFAULT_EVAL_SOLVER
    check = AugmentedDynamics(dynamics.net, T=dynamics.T.detach(), stats=SolveStats(), cond=dynamics.cond,
                              trace=dynamics.trace, noise=dynamics.noise, max_nfe=config.max_nfe)
    with torch.no_grad():
        try:
            z_ref, logdet_ref = solve(check, x.detach(), reverse=reverse, config=config, solver=solver,
                                      adjoint=False, adjoint_params=())
        except SolverError:
            return None
        scale = max(1.0, float(z_ref.pow(2).mean().sqrt()))
        return Drift(logdet=float((logdet.detach() - logdet_ref).abs().mean()),
                     z=float((z.detach() - z_ref).norm(dim=-1).mean()) / scale)


def guard(dynamics: AugmentedDynamics, x: Tensor, z: Tensor, logdet: Tensor, *, reverse: bool,
          config: FFJORDConfig, stats: SolveStats) -> None:
    """Count a training solve; on every ``drift_check``-th, measure the drift and refine the
    grid (double ``steps``) when it exceeds ``drift_tol``."""
    stats.training_solves += 1
    if not config.drift_check or stats.training_solves % config.drift_check:
        return
    drift = measure(dynamics, x, z, logdet, reverse=reverse, config=config)
    stats.drift = drift
    if drift is None or max(drift) <= config.drift_tol:
        return
    T = float(dynamics.T.detach())
    old = config.fixed_steps(T)
    new = 2 * old
    if new * EVALS_PER_STEP.get(config.solver, 1) > config.max_nfe:
        warnings.warn(f"FFJORD: the {old}-step {config.solver!r} training solve drifted {drift.logdet:.3g} nats "
                      f"from the adaptive one, and {new} steps would exceed max_nfe={config.max_nfe}",
                      DriftWarning, stacklevel=4)
        return
    config.steps, config.step_size = new, None
    warnings.warn(
        f"FFJORD: the {old}-step {config.solver!r} training solve drifted from the adaptive solution "
        f"(log-det {drift.logdet:.3g} nats, end points {drift.z:.3g}; drift_tol={config.drift_tol}): "
        f"training continues with {new} steps. Set steps= to choose, or drift_check=0 to stop checking.",
        DriftWarning, stacklevel=4,
    )
