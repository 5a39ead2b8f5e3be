"""FFJORD continuous normalizing flows as Pyro transforms."""

from .autoguide import AutoFFJORD
from .conditional import ConditionalFFJORD, conditional_ffjord
from .conv_nets import ConvODENet
from .drift import DriftWarning
from .ffjord import ConditionedFFJORD, FFJORD, ffjord
from .flow_matching import flow_matching_loss
from .image_ffjord import ConditionalImageFFJORD, ConditionedImageFFJORD, ImageFFJORD, image_ffjord
from .image_transforms import LogitTransform, Squeeze, bits_per_dim, dequantize
from .multiscale import FactorOut, MultiscaleFFJORD, multiscale_ffjord
from .nets import ODENet
from .ode import SolverError
from .stats import SolveStats, regularization

__all__ = [
    "AutoFFJORD",
    "FFJORD",
    "ConditionalFFJORD",
    "ConditionedFFJORD",
    "ConditionalImageFFJORD",
    "ConditionedImageFFJORD",
    "ConvODENet",
    "DriftWarning",
    "FactorOut",
    "ImageFFJORD",
    "LogitTransform",
    "MultiscaleFFJORD",
    "ODENet",
    "SolveStats",
    "SolverError",
    "Squeeze",
    "bits_per_dim",
    "conditional_ffjord",
    "dequantize",
    "ffjord",
    "flow_matching_loss",
    "image_ffjord",
    "multiscale_ffjord",
    "regularization",
]
__version__ = "0.1.0"
