"""Validated solver and estimator options shared by every FFJORD transform, and the defaults
(architecture and presets), defined once."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List, Optional

# torchdiffeq's methods, by how they step (its public ``odeint`` takes these names). Adaptive
# methods pick their steps to meet atol/rtol; fixed-grid ones take ``steps`` (or step_size).
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID_SOLVERS = ("rk4", "euler", "midpoint", "heun2", "heun3", "explicit_adams", "implicit_adams",
                      "fixed_adams")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS

# Architecture defaults of the vector field (see pyro_ffjord.nets.ODENet).
ARCH_DEFAULTS = {"activation": "tanh", "time_embedding": "concatsquash", "zero_init": False}
# Up to this dimension the default training trace is exact: D batched VJPs cost little and the
# exact trace learns faster per second than Hutchinson's estimate (benchmarks/toy_race.py, D = 2).
EXACT_TRACE_MAX_DIM = 4


def default_hidden_dims(input_dim: int) -> List[int]:
    """The default field: three hidden layers of width ``max(64, 4 * input_dim)``.

    Example::

        >>> default_hidden_dims(2), default_hidden_dims(32)
        ([64, 64, 64], [128, 128, 128])
    """
    return [max(64, 4 * input_dim)] * 3


TRACES = ("hutchinson", "exact")
NOISES = ("rademacher", "gaussian")
TIME_EMBEDDINGS = ("concatsquash", "concat")
ERROR_NORMS = ("batch", "sample")


# Named option sets. Architecture keywords (hidden_dims, activation, ...) may appear too.
# "reference" is the reference code's configuration for the 2-D toys. "fast" is the winner of
# benchmarks/toy_race.py on 2-D toys: exact trace, backprop through three fixed rk4 steps,
# adaptive dopri5 for evaluation (see README, "Speed"). Fixed steps assume the dynamics stay
# smooth; eval mode stays adaptive so reported likelihoods are honest.
PRESETS = {
    "reference": dict(
        hidden_dims=[64, 64, 64], activation="tanh", time_embedding="concatsquash",
        zero_init=False, trace="exact", solver="dopri5", atol=1e-5, rtol=1e-5, adjoint=True, T=0.5,
    ),
    "fast": dict(trace="exact", solver="rk4", steps=3, eval_solver="dopri5", adjoint=False),
}


def apply_preset(preset: Optional[str], kwargs: dict) -> dict:
    """Merge a named preset under the caller's keywords: every keyword the caller gives wins
    (a caller's ``step_size`` replaces the preset's ``steps``).

    Example::

        >>> apply_preset("fast", {"steps": 6, "T": 1.0})["steps"]
        6
    """
    if preset is None:
        return dict(kwargs)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} unknown; choose one of {sorted(PRESETS)}")
    merged = {**PRESETS[preset], **kwargs}
    if "step_size" in kwargs and "steps" not in kwargs:
        merged.pop("steps", None)
    return merged


def is_adaptive(solver: str) -> bool:
    """Whether a torchdiffeq method picks its own step sizes (and so takes tolerances)."""
    return solver in ADAPTIVE_SOLVERS


@dataclass
class FFJORDConfig:
    """Options of the augmented ODE solve; see :class:`~pyro_ffjord.FFJORD` for their meaning."""

    trace: str = "hutchinson"
    eval_trace: str = "exact"
    noise: str = "rademacher"
    solver: str = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    steps: Optional[int] = None
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
            if value == "scipy_solver":
                raise ValueError("scipy_solver cannot backpropagate; use a torch solver such as 'dopri5'")
            if value is not None and value not in SOLVERS:
                raise ValueError(
                    f"{name}={value!r} is not a supported torchdiffeq method; choose an adaptive one "
                    f"{ADAPTIVE_SOLVERS} or a fixed-grid one {FIXED_GRID_SOLVERS}"
                )
        for name in ("atol", "rtol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.steps is not None:
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"steps must be a positive int (fixed steps over [0, T]), got {self.steps!r}")
            if self.step_size is not None:
                raise ValueError("give steps or step_size, not both")
        for solver in {self.solver, self.eval_solver or self.solver}:
            if not is_adaptive(solver) and self.steps is None and self.step_size is None:
                raise ValueError(
                    f"the fixed-step solver {solver!r} needs steps (whole steps over [0, T], e.g. 4) "
                    "or step_size (in units of t)"
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

    def fixed_steps(self, T: float) -> int:
        """Steps a fixed-grid solver takes over [0, T]: ``steps``, or whole steps of at most
        ``step_size`` that land exactly on T."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(T / self.step_size - 1e-9))


def _choice(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")
