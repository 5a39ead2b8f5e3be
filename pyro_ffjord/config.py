"""Validated solver and estimator options shared by every FFJORD transform."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.rk_common import RKAdaptiveStepsizeODESolver
from torchdiffeq._impl.solvers import AdaptiveStepsizeODESolver

TRACES = ("hutchinson", "exact")
NOISES = ("rademacher", "gaussian")
TIME_EMBEDDINGS = ("concatsquash", "concat")
ERROR_NORMS = ("batch", "sample")


# Named option sets. Architecture keywords (hidden_dims, activation, ...) may appear too.
# "fast" is the winner of benchmarks/toy_race.py on 2-D toys: exact trace, backprop through
# three fixed rk4 steps, adaptive dopri5 for evaluation (see README, "Speed"). Fixed steps
# assume the dynamics stay smooth; eval mode stays adaptive so reported likelihoods are honest.
PRESETS = {
    "reference": dict(
        hidden_dims=[64, 64, 64], activation="tanh", time_embedding="concatsquash",
        zero_init=False, trace="exact", solver="dopri5", atol=1e-5, rtol=1e-5, adjoint=True, T=0.5,
    ),
    "fast": dict(trace="exact", solver="rk4", steps=3, eval_solver="dopri5", adjoint=False),
}


def apply_preset(preset: Optional[str], kwargs: dict) -> dict:
    """Merge a named preset under the caller's keywords (the caller's win).

    A ``steps`` entry becomes ``step_size = T / steps`` for the final ``T``.
    """
    if preset is None:
        return kwargs
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} unknown; choose one of {sorted(PRESETS)}")
    merged = {**PRESETS[preset], **kwargs}
    steps = merged.pop("steps", None)
    if steps is not None and "step_size" not in kwargs:
        merged["step_size"] = merged.get("T", FFJORDConfig.T) / steps
    return merged


def is_adaptive(solver: str) -> bool:
    """Whether a torchdiffeq method picks its own step sizes (and so takes tolerances)."""
    cls = SOLVERS[solver]
    return issubclass(cls, (RKAdaptiveStepsizeODESolver, AdaptiveStepsizeODESolver))


@dataclass
class FFJORDConfig:
    """Options of the augmented ODE solve; see :class:`~pyro_ffjord.FFJORD` for their meaning."""

    trace: str = "hutchinson"
    eval_trace: str = "exact"
    noise: str = "rademacher"
    solver: str = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    step_size: Optional[float] = None
    eval_solver: Optional[str] = None
    adjoint: bool = False
    T: float = 0.5
    train_T: bool = False
    kinetic: float = 0.0
    jacobian: float = 0.0
    error_norm: str = "batch"
    max_nfe: int = 20_000

    def __post_init__(self) -> None:
        _choice("trace", self.trace, TRACES)
        _choice("eval_trace", self.eval_trace, TRACES)
        _choice("noise", self.noise, NOISES)
        _choice("error_norm", self.error_norm, ERROR_NORMS)
        for name in ("solver", "eval_solver"):
            value = getattr(self, name)
            if value is not None and value not in SOLVERS:
                raise ValueError(
                    f"{name}={value!r} is not a torchdiffeq method; choose one of {sorted(SOLVERS)}"
                )
        if self.solver == "scipy_solver" or self.eval_solver == "scipy_solver":
            raise ValueError("scipy_solver cannot backpropagate; use a torch solver such as 'dopri5'")
        for name in ("atol", "rtol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for solver in {self.solver, self.eval_solver or self.solver}:
            if not is_adaptive(solver) and self.step_size is None:
                raise ValueError(
                    f"the fixed-step solver {solver!r} needs step_size (in units of t, e.g. T / 8)"
                )
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")
        if not (math.isfinite(self.T) and self.T > 0):
            raise ValueError(f"T (the end time) must be positive and finite, got {self.T}")
        for name in ("kinetic", "jacobian"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} is a regularization weight and must be >= 0")
        if int(self.max_nfe) < 1:
            raise ValueError(f"max_nfe must be a positive integer, got {self.max_nfe}")

    @classmethod
    def from_options(cls, options: dict) -> "FFJORDConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(options) - known
        if unknown:
            raise TypeError(
                f"unknown FFJORD option(s) {sorted(unknown)}; known options: {sorted(known)}"
            )
        return cls(**options)

    @property
    def regularized(self) -> bool:
        return self.kinetic > 0 or self.jacobian > 0


def _choice(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")
