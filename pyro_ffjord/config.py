"""Validated solver and estimator options shared by every FFJORD transform, and the defaults
(architecture and presets), defined once."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import List, Optional

# torchdiffeq's methods, by how they step (its public ``odeint`` takes these names). Adaptive
# methods pick their steps to meet atol/rtol; fixed-grid ones take ``steps`` (or step_size).
ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID_SOLVERS = ("rk4", "euler", "midpoint", "heun2", "heun3", "explicit_adams", "implicit_adams",
                      "fixed_adams")
SOLVERS = ADAPTIVE_SOLVERS + FIXED_GRID_SOLVERS
# Fewest function evaluations one step of a fixed-grid method costs (the implicit method's
# corrector may take more): a grid that cannot fit in max_nfe is refused before it starts.
EVALS_PER_STEP = {"euler": 1, "midpoint": 2, "rk4": 4, "heun2": 2, "heun3": 3, "explicit_adams": 1,
                  "implicit_adams": 1, "fixed_adams": 1}

# The default solve: training backpropagates through DEFAULT_STEPS fixed rk4 steps (with a drift
# check against an adaptive solve, see pyro_ffjord.drift); eval mode is adaptive dopri5.
DEFAULT_STEPS = 3
DEFAULT_EVAL_SOLVER = "dopri5"

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
    (a caller's ``step_size`` replaces the preset's ``steps``, which also go when the caller's
    solvers are all adaptive).

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
    solvers = {merged.get("solver", FFJORDConfig.solver), merged.get("eval_solver") or DEFAULT_EVAL_SOLVER}
    if "steps" not in kwargs and all(is_adaptive(s) for s in solvers if s in SOLVERS):
        merged.pop("steps", None)  # the caller chose adaptive solvers: the preset's grid is moot
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
    solver: str = "rk4"
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
    max_memory_gb: Optional[float] = None
    drift_check: int = 50
    drift_tol: float = 0.05

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
            _positive_finite(name, getattr(self, name))
        for name in ("adjoint", "train_T"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _positive_finite("T (the end time)", self.T)
        for name in ("kinetic", "jacobian"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} is a regularization weight and must be finite and >= 0, got {value!r}")
        if not (_is_int(self.max_nfe) and self.max_nfe >= 1):
            raise ValueError(f"max_nfe (the step budget of one solve) must be a positive int, got {self.max_nfe!r}")
        if self.max_memory_gb is not None:
            _positive_finite("max_memory_gb", self.max_memory_gb)
        self._check_steps()

    def _check_steps(self) -> None:
        if self.steps is not None:
            if not (_is_int(self.steps) and self.steps >= 1):
                raise ValueError(f"steps must be a positive int (fixed steps over [0, T]), got {self.steps!r}")
            if self.step_size is not None:
                raise ValueError("give steps or step_size, not both")
        if self.step_size is not None:
            _positive_finite("step_size", self.step_size)
        used = {self.solver, self.eval_method}
        fixed = sorted(s for s in used if not is_adaptive(s))
        timed = "steps" if self.steps is not None else "step_size"
        if (self.steps is not None or self.step_size is not None) and not fixed:
            raise ValueError(
                f"{timed} applies to fixed-grid solvers, but solver={self.solver!r}"
                f"{'' if self.eval_solver is None else f' and eval_solver={self.eval_solver!r}'} choose their "
                f"own steps (atol/rtol); drop {timed}, or use a fixed-grid solver such as solver='rk4'"
            )
        for solver in fixed:
            self.check_step_budget(solver, self.T)
        if not (_is_int(self.drift_check) and self.drift_check >= 0):
            raise ValueError(f"drift_check must be an int >= 0 (training solves between checks; 0: never), "
                             f"got {self.drift_check!r}")
        _positive_finite("drift_tol", self.drift_tol)

    @property
    def eval_method(self) -> str:
        """The solver of eval mode: ``eval_solver``, else the training solver if it is adaptive,
        else dopri5 (a fixed grid trains fast; a reported likelihood must not depend on it)."""
        if self.eval_solver is not None:
            return self.eval_solver
        return self.solver if is_adaptive(self.solver) else DEFAULT_EVAL_SOLVER

    def check_step_budget(self, solver: str, T: float) -> None:
        """Refuse, before solving, a fixed grid whose evaluations cannot fit in ``max_nfe``."""
        if is_adaptive(solver):
            return
        need = self.fixed_steps(T) * EVALS_PER_STEP.get(solver, 1)
        if need > self.max_nfe:
            raise ValueError(
                f"solver={solver!r} with {self.fixed_steps(T)} steps over [0, T={T:g}] needs at least "
                f"{need} function evaluations per solve, more than max_nfe={self.max_nfe}; use fewer "
                "steps (a larger step_size) or raise max_nfe"
            )

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
        ``step_size`` that land exactly on T, else :data:`DEFAULT_STEPS`."""
        if self.steps is not None:
            return self.steps
        if self.step_size is None:
            return DEFAULT_STEPS
        return max(1, math.ceil(T / self.step_size - 1e-9))


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_finite(name: str, value) -> None:
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _choice(name: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}")
