r"""Conditional flow matching: a simulation-free objective for the vector field of an FFJORD flow.

An :class:`~pyro_ffjord.FFJORD` maps a base sample :math:`x_0 = z(0)` to :math:`x_1 = z(T)` by
:math:`dz/dt = f(t, z)` (``flow.net``) on :math:`t \in [0, T]`: base at :math:`t = 0`, data at
:math:`t = T`, whatever :math:`T` is. Flow matching (Lipman et al. 2023) regresses :math:`f`
on the velocity of a probability path from the base to the data, without any ODE solve. With
:math:`\tau = t/T \sim U[0, 1]`, the Gaussian path of width :math:`\sigma_{\min}` and a
coupling :math:`(x_0, x_1)` of base and data,

.. math::

    x_t = \bigl(1 - (1 - \sigma_{\min})\tau\bigr)\,x_0 + \tau\,x_1, \qquad
    u = \frac{x_1 - (1 - \sigma_{\min})\,x_0}{T}, \qquad
    \mathcal{L} = \mathbb{E}\,\bigl\lVert f(t, x_t; c) - u \bigr\rVert^2 ,

the expectation taken over :math:`\tau`, the coupling and, for a
:class:`~pyro_ffjord.ConditionalFFJORD`, the context :math:`c` that comes with each data point.
:math:`u` is the velocity in real time (:math:`dx_t/dt`), so the minimiser of
:math:`\mathcal{L}` is the field whose flow carries the base to the data distribution at
:math:`t = T`: after training, the very same object gives ``log_prob`` by the integrated trace,
``rsample``, maximum-likelihood fine-tuning, and serves as a prior or a guide, unchanged.

Couplings: ``"independent"`` (:math:`x_0 \sim` base independently of :math:`x_1`), or ``"ot"``,
minibatch optimal transport (Tong et al. 2023; Pooladian et al. 2023): the base samples of a batch
are re-paired with its data points by an exact assignment on squared Euclidean costs
(:func:`scipy.optimize.linear_sum_assignment`), which straightens the learned trajectories
(fewer solver steps at evaluation), in the spirit of rectified flow (Liu et al. 2023).

Example::

    >>> import torch
    >>> from pyro_ffjord import FFJORD, flow_matching_loss
    >>> flow = FFJORD(2, hidden_dims=[16])
    >>> x1 = torch.randn(64, 2) + 3.0
    >>> loss = flow_matching_loss(flow, x1, coupling="ot", generator=torch.Generator().manual_seed(0))
    >>> loss.shape, bool(loss > 0)
    (torch.Size([]), True)
    >>> loss.backward()                      # then an optimizer step on flow.parameters()

References:

[1] Yaron Lipman, Ricky T. Q. Chen, Heli Ben-Hamu, Maximilian Nickel, Matt Le. Flow Matching
for Generative Modeling. ICLR 2023.

[2] Alexander Tong, Nikolay Malkin, Guillaume Huguet, Yanlei Zhang, Jarrid Rector-Brooks,
Kilian Fatras, Guy Wolf, Yoshua Bengio. Improving and generalizing flow-based generative models
with minibatch optimal transport. TMLR 2024 (arXiv:2302.00482, 2023).

[3] Xingchao Liu, Chengyue Gong, Qiang Liu. Flow Straight and Fast: Learning to Generate and
Transfer Data with Rectified Flow. ICLR 2023.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .checks import check_tensor
from .conditional import ConditionalFFJORD
from .ffjord import _FFJORDParams

COUPLINGS = ("independent", "ot")


def _ot_permutation(x0: Tensor, x1: Tensor) -> Tensor:
    """The permutation ``p`` minimising ``sum_i ||x0[p[i]] - x1[i]||^2`` (exact, by scipy)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError(
            "coupling='ot' needs scipy (scipy.optimize.linear_sum_assignment): pip install scipy, "
            "or use coupling='independent'"
        ) from None
    cost = torch.cdist(x1.detach().double(), x0.detach().double()).pow(2).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)  # rows == arange(N): one base point per data point
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm.to(x0.device)


def _base_samples(base, n: int, dim: int, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    if base is None:
        return torch.randn(n, dim, dtype=like.dtype, device=like.device, generator=generator)
    if not isinstance(base, torch.distributions.Distribution):
        raise TypeError(f"base must be a torch Distribution (or None for N(0, I)), got {type(base).__name__}")
    x0 = base.sample((n,))
    shape = x0.shape[1:]
    x0 = x0.reshape(n, -1) if x0.dim() > 2 else x0
    if x0.shape != (n, dim):
        raise ValueError(
            f"base samples have shape {tuple(shape)} but the flow's event has {dim} values: "
            "give a base with event shape (input_dim,) (or the image shape) and an empty batch shape"
        )
    if x0.dtype != like.dtype or x0.device != like.device:
        raise ValueError(
            f"base samples are {x0.dtype} on {x0.device} but the data are {like.dtype} on {like.device}; "
            "build the base with matching tensors"
        )
    return x0


def flow_matching_loss(
    flow,
    x1: Tensor,
    context: Optional[Tensor] = None,
    *,
    sigma_min: float = 1e-4,
    coupling: str = "independent",
    base=None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""The conditional flow-matching loss of ``flow``'s vector field on a batch of data ``x1``.

    :param flow: an :class:`~pyro_ffjord.FFJORD`, :class:`~pyro_ffjord.ConditionalFFJORD`,
        :class:`~pyro_ffjord.ImageFFJORD` or :class:`~pyro_ffjord.ConditionalImageFFJORD`.
    :param Tensor x1: data of shape ``(..., input_dim)`` (image flows: ``(..., C, H, W)``), at
        least one point, finite, with the dtype and device of the flow's parameters; all batch
        dimensions are flattened into one.
    :param Tensor context: ``(..., context_dim)``, the context of each data point (broadcast
        against ``x1``'s batch shape); required for a conditional flow, refused otherwise.
    :param float sigma_min: width of the Gaussian path at the data end, in ``[0, 1)``.
    :param str coupling: ``"independent"`` or ``"ot"`` (minibatch optimal transport; needs scipy;
        it permutes the base samples only, so each context stays with its data point).
    :param base: a :class:`torch.distributions.Distribution` to draw :math:`x_0` from, with event
        shape ``(input_dim,)`` and no batch shape (e.g. the base of the
        ``TransformedDistribution``); default ``None``, the standard normal :math:`N(0, I)`.
    :param generator: a :class:`torch.Generator` for the times and for the default base's
        samples (a ``base`` distribution draws from the global generator).
    :returns: a scalar: the squared error summed over the event's dimensions and averaged over
        the batch, in real-time units (velocities scale as :math:`1/T`, so the loss as
        :math:`1/T^2`). Its minimum is not zero: what remains is the conditional variance of
        :math:`u` given :math:`x_t`.

    :math:`T` is the flow's current end time, detached: flow matching cannot identify it (any
    :math:`T` has a matching field), so a learned ``T`` (``train_T=True``) gets no gradient from
    this loss and keeps its value; it can still be fine-tuned by maximum likelihood. Image fields
    take one time per call, so image flows draw one :math:`\tau` per batch (still unbiased).

    With a conditional flow and ``coupling="ot"`` the pairing ignores the context, so within a
    batch of mixed contexts the base points given a context are no longer :math:`N(0, I)`: the
    learned conditional flows are then only approximately right. Prefer ``"independent"``
    there, or batches that share one context.
    """
    if not isinstance(flow, _FFJORDParams):
        raise TypeError(
            f"flow_matching_loss takes an FFJORD or ConditionalFFJORD (or their image versions), "
            f"got {type(flow).__name__}"
        )
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling={coupling!r}; choose one of {COUPLINGS}")
    if not (isinstance(sigma_min, (int, float)) and not isinstance(sigma_min, bool)
            and math.isfinite(sigma_min) and 0 <= sigma_min < 1):
        raise ValueError(f"sigma_min must be a number in [0, 1), got {sigma_min!r}")
    net = flow.net
    like = next(net.parameters())
    dim = flow.input_dim
    conditional = isinstance(flow, ConditionalFFJORD)
    image_shape = getattr(flow, "_image_shape", None)

    if image_shape is not None:
        if not isinstance(x1, Tensor):
            raise TypeError(f"x1 must be a tensor, got {type(x1).__name__}")
        if x1.dim() < 3 or tuple(x1.shape[-3:]) != tuple(image_shape):
            raise ValueError(f"x1 has shape {tuple(x1.shape)} but the image flow expects (..., C, H, W) = "
                             f"(..., {', '.join(map(str, image_shape))})")
        x1 = x1.reshape(x1.shape[:-3] + (dim,))  # as the flow flattens around its solve
    check_tensor(x1, "x1", dim, "input_dim", like)
    batch = x1.shape[:-1]
    x1 = x1.reshape(-1, dim)
    n = x1.shape[0]
    if n == 0:
        raise ValueError(f"x1 has shape {tuple(batch) + (dim,)}: flow matching needs at least one data point")

    cond = None
    if conditional:
        if context is None:
            raise TypeError(
                f"{type(flow).__name__} is conditional: flow_matching_loss(flow, x1, context) needs the "
                "context of each data point"
            )
        check_tensor(context, "context", flow.context_dim, "context_dim", like)
        try:
            context = context.expand(batch + context.shape[-1:])
        except RuntimeError:
            raise ValueError(
                f"context has batch shape {tuple(context.shape[:-1])}, which does not broadcast to x1's "
                f"batch shape {tuple(batch)}"
            ) from None
        cond = net.condition(context.reshape(n, -1))
    elif context is not None:
        raise ValueError(f"{type(flow).__name__} is unconditional: it takes no context")

    x0 = _base_samples(base, n, dim, x1, generator)
    if coupling == "ot":
        x0 = x0[_ot_permutation(x0, x1)]  # x1 (and its context) stay in place
    T = flow.end_time.detach().to(x1.dtype)
    if image_shape is not None:
        tau = torch.rand((), dtype=x1.dtype, device=x1.device, generator=generator).expand(n, 1)
    else:
        tau = torch.rand(n, 1, dtype=x1.dtype, device=x1.device, generator=generator)
    xt = (1 - (1 - sigma_min) * tau) * x0 + tau * x1
    u = (x1 - (1 - sigma_min) * x0) / T
    t = tau * T
    v = net(t[0, 0] if image_shape is not None else t, xt, cond)
    return (v - u).pow(2).sum(-1).mean()
