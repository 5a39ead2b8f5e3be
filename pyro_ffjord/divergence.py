r"""Divergence :math:`\mathrm{tr}(\partial f / \partial z)` of a vector field, exact or estimated.

Both estimators also return the squared Frobenius norm term used by RNODE's Jacobian
regularizer, :math:`\lVert \epsilon^\top \partial f/\partial z \rVert^2 / D`, from the same
vector-Jacobian products (no extra backward pass). With the exact trace the basis vectors
play the role of :math:`\epsilon`, giving :math:`\lVert \partial f/\partial z \rVert_F^2 / D`
exactly; with Hutchinson's estimator it is an unbiased estimate of the same quantity.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def sample_noise(like: Tensor, kind: str) -> Tensor:
    """Hutchinson probe vectors with zero mean and identity covariance, shaped like ``like``."""
    if kind == "rademacher":
        return torch.randint(0, 2, like.shape, device=like.device).to(like.dtype).mul_(2).sub_(1)
    if kind == "gaussian":
        return torch.randn(like.shape, dtype=like.dtype, device=like.device)
    raise ValueError(f"unknown noise {kind!r}")


def hutchinson_divergence(
    f: Tensor, z: Tensor, noise: Tensor, create_graph: bool, frobenius: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""Unbiased :math:`\epsilon^\top (\partial f/\partial z)\,\epsilon` from one vector-Jacobian product.

    Returns ``(divergence, frobenius)`` of shape ``z.shape[:-1]``; ``frobenius`` is ``None``
    unless asked for.

    Example::

        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> div, _ = hutchinson_divergence(2 * z, z, torch.ones(4, 3), create_graph=False)
        >>> div
        tensor([6., 6., 6., 6.])
    """
    (vjp,) = torch.autograd.grad(f, z, noise, create_graph=create_graph)
    return (vjp * noise).sum(-1), (vjp.pow(2).mean(-1) if frobenius else None)


def exact_divergence(
    f: Tensor, z: Tensor, create_graph: bool, frobenius: bool = False
) -> Tuple[Tensor, Optional[Tensor]]:
    r"""Exact trace from the D vector-Jacobian products :math:`e_i^\top \partial f/\partial z`,
    batched into one backward pass with :func:`torch.vmap` (``is_grads_batched``).

    Returns ``(divergence, frobenius)`` of shape ``z.shape[:-1]``; ``frobenius`` is ``None``
    unless asked for.

    Example::

        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> exact_divergence(z * torch.tensor([1., 2., 3.]), z, create_graph=False)[0]
        tensor([6., 6., 6., 6.])
    """
    dim = z.shape[-1]
    basis = torch.eye(dim, dtype=z.dtype, device=z.device)
    basis = basis.reshape(dim, *([1] * (z.dim() - 1)), dim).expand(dim, *z.shape)
    (rows,) = torch.autograd.grad(f, z, basis, create_graph=create_graph, is_grads_batched=True)
    # rows[i, ..., j] = d f_i / d z_j
    divergence = rows.diagonal(dim1=0, dim2=-1).sum(-1)
    return divergence, (rows.pow(2).sum(0).mean(-1) if frobenius else None)
