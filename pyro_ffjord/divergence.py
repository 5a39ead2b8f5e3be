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
    r"""Exact trace from the D vector-Jacobian products :math:`e_i^\top \partial f/\partial z`.

    Two ways, chosen by what measured faster (``benchmarks/exact_eval.py``, one thread): for a
    small batch (up to :data:`BATCHED_TRACE_MAX_ELEMENTS` numbers in ``z``) the D products
    batched into one backward pass with :func:`torch.vmap` (``is_grads_batched``; one call's
    overhead instead of D: 1.9x faster for one 10-D point, as in NUTS); otherwise, and at
    D <= 2, one backward pass per coordinate over the same graph, which keeps every
    intermediate at the batch's size (the batched pass holds D copies, which fall out of cache:
    2.1x slower for a whole exact log_prob at D = 64 and 1000 points).

    Returns ``(divergence, frobenius)`` of shape ``z.shape[:-1]``; ``frobenius`` is ``None``
    unless asked for.

    Example::

        >>> z = torch.randn(4, 3, requires_grad=True)
        >>> exact_divergence(z * torch.tensor([1., 2., 3.]), z, create_graph=False)[0]
        tensor([6., 6., 6., 6.])
    """
    dim = z.shape[-1]
    if dim > 2 and z.numel() <= BATCHED_TRACE_MAX_ELEMENTS:
        basis = torch.eye(dim, dtype=z.dtype, device=z.device)
        basis = basis.reshape(dim, *([1] * (z.dim() - 1)), dim).expand(dim, *z.shape)
        (rows,) = torch.autograd.grad(f, z, basis, create_graph=create_graph, is_grads_batched=True)
        # rows[i, ..., j] = d f_i / d z_j
        divergence = rows.diagonal(dim1=0, dim2=-1).sum(-1)
        return divergence, (rows.pow(2).sum(0).mean(-1) if frobenius else None)
    divergence = squares = None
    for i in range(dim):
        e_i = torch.zeros_like(f)
        e_i[..., i] = 1
        (row,) = torch.autograd.grad(f, z, e_i, create_graph=create_graph, retain_graph=True)
        divergence = row[..., i] if divergence is None else divergence + row[..., i]
        if frobenius:
            squares = row.pow(2) if squares is None else squares + row.pow(2)
    return divergence, (squares.mean(-1) if frobenius else None)


# Up to this many numbers in z (points x D) the batched (vmap) pass measured faster than the
# loop (e.g. D = 8, 256 points, no graph: 1.5 vs 1.9 ms; D = 16, 32 points, with the graph
# of a training step: 2.9 vs 5.4 ms); from about 4096 on the loop wins (D = 16, 128 points,
# training: 7.5 vs 9.0 ms).
BATCHED_TRACE_MAX_ELEMENTS = 2048
