"""FFJORD continuous normalizing flows as Pyro transforms."""

from .autoguide import AutoFFJORD
from .conditional import ConditionalFFJORD, conditional_ffjord
from .drift import DriftWarning
from .ffjord import ConditionedFFJORD, FFJORD, ffjord
from .nets import ODENet
from .ode import SolverError
from .stats import SolveStats, regularization

__all__ = [
    "AutoFFJORD",
    "FFJORD",
    "ConditionalFFJORD",
    "ConditionedFFJORD",
    "DriftWarning",
    "ODENet",
    "SolveStats",
    "SolverError",
    "conditional_ffjord",
    "ffjord",
    "regularization",
]
__version__ = "0.1.0"
