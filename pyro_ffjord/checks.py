"""Input checks shared by every FFJORD transform: a bad tensor gets a clear error before any
solve starts, never a cryptic failure (or a silent NaN) inside the ODE solver."""

from __future__ import annotations

import torch
from torch import Tensor


def check_tensor(value: Tensor, name: str, size: int, size_name: str, like: Tensor) -> None:
    """Check that ``value`` is a finite tensor of shape ``(..., size)`` with the dtype and
    device of ``like`` (a parameter of the flow).

    Example::

        >>> check_tensor(torch.zeros(3, 2), "x", 2, "input_dim", torch.zeros(1))
        >>> check_tensor(torch.zeros(3, 5), "x", 2, "input_dim", torch.zeros(1))
        Traceback (most recent call last):
        ...
        ValueError: x has shape (3, 5) but the flow expects (..., input_dim=2): the last dimension must be 2
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if value.dim() == 0 or value.shape[-1] != size:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but the flow expects (..., {size_name}={size}): "
            f"the last dimension must be {size}"
        )
    if not (value.is_floating_point() or value.is_complex()):
        raise ValueError(
            f"{name} is {value.dtype}, but FFJORD maps real vectors; convert it, e.g. {name}.to({like.dtype})"
        )
    if value.dtype != like.dtype:
        raise ValueError(
            f"{name} is {value.dtype} but the flow's parameters are {like.dtype}; convert one, "
            f"e.g. flow.to({value.dtype}) or {name}.to({like.dtype})"
        )
    if value.device != like.device:
        raise ValueError(
            f"{name} is on {value.device} but the flow's parameters are on {like.device}; "
            f"move one, e.g. flow.to({str(value.device)!r})"
        )
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values; FFJORD needs finite inputs")
