r"""FFJORD as a Pyro :class:`~pyro.distributions.torch_transform.TransformModule`."""

from __future__ import annotations

import itertools
import math
from typing import Callable, List, NamedTuple, Optional, Sequence

import torch
from pyro.distributions.torch_transform import TransformModule
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from .checks import check_tensor
from .config import ARCH_DEFAULTS, EXACT_TRACE_MAX_DIM, FFJORDConfig, apply_preset, default_hidden_dims, is_adaptive
from . import drift
from .divergence import sample_noise
from .nets import LayerConditioning, ODENet
from .ode import AugmentedDynamics, solve
from .stats import HasSolveStats, SolveStats

class SolveSetup(NamedTuple):
    """Everything one solve needs, gathered from the module that owns the parameters."""

    net: ODENet
    cond: Optional[List[LayerConditioning]]
    T: Tensor
    config: FFJORDConfig
    training: bool
    stats: SolveStats


class _Latest(NamedTuple):
    """The latest solve: its two ends, log-det, which end it produced, the parameter state
    it was computed with and whether it built a graph."""

    x: Tensor
    y: Tensor
    ladj: Tensor
    produced: str
    key: tuple
    grad: bool


class ConditionedFFJORD(HasSolveStats, Transform):
    r"""The FFJORD bijection for fixed parameters (and, if conditional, a fixed context).

    Maps :math:`x = z(0)` to :math:`y = z(T)` with :math:`dz/dt = f(z, t)` and

    .. math::

        \log\left|\det \frac{\partial y}{\partial x}\right|
        = \int_0^T \mathrm{tr}\left(\frac{\partial f}{\partial z(t)}\right) dt,

    integrated in the same solve as :math:`y`.

    Caching. A solve is expensive, so the result of the latest one is kept, but reused only for
    the end that solve *produced* (a sample from ``rsample`` scored by ``log_prob``: one solve,
    not two), and only while the parameters, buffers and mode are those it was computed with:
    a tensor you pass in again (a fixed data batch) is always solved afresh, so a training loop
    on one tensor and an evaluation after ``load_state_dict`` or an optimizer step are right.

    :param setup_fn: returns a :class:`SolveSetup` at the start of each solve.
    :param stats: where function-evaluation counts and the RNODE penalty are recorded.
    :param state_key_fn: identifies the current parameter values (see ``_FFJORDParams``).
    :param context_shape: batch shape of the context; it broadcasts against the input's.
    :param int cache_size: 0 or 1, as for any :class:`~torch.distributions.Transform`.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self,
        setup_fn: Callable[[], SolveSetup],
        stats: SolveStats,
        state_key_fn: Callable[[], tuple],
        context_shape: torch.Size = torch.Size(),
        cache_size: int = 1,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self._setup_fn = setup_fn
        self._stats = stats
        self._state_key_fn = state_key_fn
        self._context_shape = torch.Size(context_shape)
        self._latest: Optional[_Latest] = None

    __hash__ = object.__hash__

    # -- caching --------------------------------------------------------------------------
    def with_cache(self, cache_size: int = 1) -> Transform:
        if cache_size == self._cache_size:
            return self
        return ConditionedFFJORD(self._setup_fn, self._stats, self._state_key_fn, self._context_shape, cache_size)

    def clear_cache(self) -> None:
        self._latest = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_latest"] = None  # holds a graph; never pickled
        return state

    def _remember(self, x: Tensor, y: Tensor, ladj: Tensor, produced: str) -> None:
        self._latest = _Latest(x, y, ladj, produced, self._state_key_fn(), torch.is_grad_enabled())

    def _reusable(self) -> Optional["_Latest"]:
        latest = self._latest
        if latest is None or latest.key != self._state_key_fn():
            return None
        if torch.is_grad_enabled() and not latest.grad:  # computed without a graph
            return None
        return latest

    # -- shapes -----------------------------------------------------------------------------
    def forward_shape(self, shape: torch.Size) -> torch.Size:
        """The shape of the output for an input of ``shape``: its batch shape broadcast with the
        context's (a conditioned flow is a batch of bijections), e.g. ``(1, D)`` for ``(D,)``
        and a context of shape ``(1, context_dim)``. Pyro's conditional transforms return
        ``shape`` unchanged instead, so Pyro's generic ``TransformTests._test_shape`` rejects
        this on purpose (docs/pyro_generic_checks.md)."""
        return torch.broadcast_shapes(shape[:-1], self._context_shape) + shape[-1:]

    inverse_shape = forward_shape

    # -- the bijection --------------------------------------------------------------------
    def __call__(self, x: Tensor) -> Tensor:
        latest = self._reusable() if self._cache_size else None
        if latest is not None and latest.produced == "x" and latest.x is x:
            return latest.y
        return self._call(x)

    def _inv_call(self, y: Tensor) -> Tensor:
        latest = self._reusable() if self._cache_size else None
        if latest is not None and latest.produced == "y" and latest.y is y:
            return latest.x
        return self._inverse(y)

    def _call(self, x: Tensor) -> Tensor:
        y, ladj = self._solve(x, reverse=False)
        self._remember(x, y, ladj, produced="y")
        return y

    def _inverse(self, y: Tensor) -> Tensor:
        x, ladj = self._solve(y, reverse=True)
        self._remember(x, y, ladj, produced="x")
        return x

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        # The pair of the latest solve, whichever end it started from (cache_size 0 too: torch
        # asks for the log-det of the pair it has just computed).
        latest = self._reusable()
        if latest is not None and latest.x is x and latest.y is y:
            return latest.ladj
        return self._solve(x, reverse=False)[1]

    def _solve(self, x: Tensor, reverse: bool):
        setup = self._setup_fn()
        net, config = setup.net, setup.config
        check_tensor(x, "y" if reverse else "x", net.input_dim, "input_dim", next(net.parameters()))
        try:
            batch = torch.broadcast_shapes(x.shape[:-1], self._context_shape)
        except RuntimeError:
            raise ValueError(
                f"input batch shape {tuple(x.shape[:-1])} does not broadcast against the context's "
                f"batch shape {tuple(self._context_shape)}"
            ) from None
        x = x.expand(batch + x.shape[-1:])
        trace = config.trace if setup.training else config.eval_trace
        solver = config.solver if setup.training else config.eval_method
        if is_adaptive(solver) and torch.finfo(x.dtype).eps > config.rtol:
            raise ValueError(
                f"{solver!r} cannot meet rtol={config.rtol:g} in {x.dtype} (its resolution is "
                f"{torch.finfo(x.dtype).eps:.1e}): the step size would underflow. Use float32 or float64 "
                "(flow.float()), or a fixed-step solver (solver='rk4', steps=8)"
            )
        regularize = setup.training and config.regularized and torch.is_grad_enabled()
        noise = sample_noise(x, config.noise) if trace == "hutchinson" else None
        dynamics = AugmentedDynamics(
            net,
            T=setup.T,
            stats=setup.stats,
            cond=setup.cond,
            trace=trace,
            noise=noise,
            kinetic=config.kinetic if regularize else 0.0,
            jacobian=config.jacobian if regularize else 0.0,
            max_nfe=config.max_nfe,
            max_memory_gb=config.max_memory_gb,
        )
        setup.stats.regularization = None
        # Only tensors the dynamics use directly: an adjoint parameter that is also an ancestor
        # of another (the context head of the conditioning terms) would be counted twice.
        adjoint_params = [*net.field_parameters(), setup.T]
        for c in setup.cond or ():
            adjoint_params.extend(t for t in c if t is not None)
        z, logdet = solve(dynamics, x, reverse=reverse, config=config, solver=solver, adjoint=config.adjoint,
                          adjoint_params=adjoint_params)
        if setup.training and not is_adaptive(solver) and torch.is_grad_enabled():
            drift.guard(dynamics, x, z, logdet, reverse=reverse, config=config, stats=setup.stats)
        return z, logdet


class _FFJORDParams:
    """Parameter ownership shared by :class:`FFJORD` and :class:`ConditionalFFJORD`."""

    net: ODENet
    config: FFJORDConfig
    _stats: SolveStats

    def _init_params(self, input_dim: int, preset: Optional[str], options: dict,
                     net_factory: Optional[Callable[..., nn.Module]] = None, **net_kwargs) -> None:
        # net_factory(input_dim, hidden, **architecture, **net_kwargs) builds another field with
        # ODENet's interface (the image flows' ConvODENet); default ODENet.
        if not (isinstance(input_dim, int) and not isinstance(input_dim, bool) and input_dim > 0):
            raise ValueError(f"input_dim must be a positive int, got {input_dim!r}")
        options = apply_preset(preset, {k: v for k, v in options.items() if v is not None})
        options.setdefault("trace", "exact" if input_dim <= EXACT_TRACE_MAX_DIM else "hutchinson")
        hidden = options.pop("hidden_dims", default_hidden_dims(input_dim))  # ODENet checks it
        arch = {k: options.pop(k) for k in ARCH_DEFAULTS if k in options}
        self.config = FFJORDConfig.from_options(options)
        self.net = (net_factory or ODENet)(input_dim, hidden, **{**ARCH_DEFAULTS, **arch}, **net_kwargs)
        log_T = torch.tensor(math.log(self.config.T))
        if self.config.train_T:
            self.log_T = nn.Parameter(log_T)
        else:
            self.register_buffer("log_T", log_T)
        self.register_load_state_dict_post_hook(_FFJORDParams._loaded)

    @staticmethod
    def _loaded(module: "_FFJORDParams", incompatible) -> None:
        # log_T is the one source of truth for T: config.T follows what was loaded.
        module.config.T = float(module.log_T.detach().exp())

    def get_extra_state(self) -> dict:
        # The fixed grid the drift check may have refined belongs to the trained flow.
        return {"steps": self.config.steps, "step_size": self.config.step_size}

    def set_extra_state(self, state: dict) -> None:
        if not is_adaptive(self.config.solver) and state.get("steps") is not None:
            self.config.steps, self.config.step_size = state["steps"], None

    def _state_key(self) -> tuple:
        """Identifies the current values of every parameter and buffer, and the mode: in-place
        updates (optimizer steps, load_state_dict) bump a tensor's version counter."""
        tensors = itertools.chain(self.parameters(), self.buffers())
        return (self.training, *((id(t), t._version) for t in tensors))

    @property
    def input_dim(self) -> int:
        return self.net.input_dim

    @property
    def end_time(self) -> Tensor:
        """The end time :math:`T` as a tensor (differentiable when ``train_T``)."""
        return self.log_T.exp()

    def flow_matching_loss(self, x1: Tensor, context: Optional[Tensor] = None, **kwargs) -> Tensor:
        """The flow-matching loss of this flow on a batch: see
        :func:`pyro_ffjord.flow_matching.flow_matching_loss` (same arguments after ``flow``)."""
        from .flow_matching import flow_matching_loss

        return flow_matching_loss(self, x1, context, **kwargs)

    def _setup(self, context: Optional[Tensor] = None) -> SolveSetup:
        cond = self.net.condition(context)
        return SolveSetup(self.net, cond, self.end_time, self.config, self.training, self._stats)


class FFJORD(ConditionedFFJORD, _FFJORDParams, TransformModule):
    r"""Free-form continuous dynamics (FFJORD) as a learnable bijection of
    :math:`\mathbb{R}^D` (Grathwohl, Chen et al., 2019).

    A sample :math:`x` of the base distribution is mapped to :math:`y = z(T)` by solving

    .. math::

        \frac{dz}{dt} = f(z, t), \qquad z(0) = x, \qquad
        \log\left|\det\frac{\partial y}{\partial x}\right| = \int_0^T
        \mathrm{tr}\left(\frac{\partial f}{\partial z(t)}\right)dt,

    with :math:`f` an unrestricted MLP (:class:`~pyro_ffjord.nets.ODENet`). By default, training
    backpropagates through three fixed rk4 steps (checked against an adaptive solve every 50
    solves, see :mod:`pyro_ffjord.drift`) with the exact trace up to :math:`D = 4` and above it
    Hutchinson's unbiased estimate :math:`\epsilon^\top (\partial f/\partial z)\,\epsilon`
    (one vector-Jacobian product per evaluation, :math:`\epsilon` drawn once per solve); eval
    mode solves adaptively (dopri5) with the exact trace, so reported likelihoods are exact. ``rsample`` followed by ``log_prob`` of that sample costs one solve; the
    log-density of any other value costs one reverse solve.

    Example::

        >>> import pyro.distributions as dist
        >>> flow = FFJORD(2, hidden_dims=[16, 16])
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.).to_event(1), [flow])
        >>> y = d.rsample((5,))
        >>> d.log_prob(y).shape
        torch.Size([5])

    :param int input_dim: dimension :math:`D`.
    :param hidden_dims: hidden widths of the vector field (default
        :func:`~pyro_ffjord.config.default_hidden_dims`: three layers of ``max(64, 4D)``).
    :param str preset: a named set of options from :data:`pyro_ffjord.config.PRESETS`
        (``"fast"``: exact trace, backprop through 3 fixed rk4 steps, dopri5 in eval mode;
        ``"reference"``: the reference code's toy defaults); explicit keywords override it.

    Architecture keywords: ``activation`` (``"tanh"`` default, ``"softplus"``, ``"elu"``,
    ``"swish"`` or a module), ``time_embedding`` (``"concatsquash"`` default or ``"concat"``),
    ``zero_init`` (default False; True starts as the identity map with the last layer zero, as
    RNODE does, which learned 2-D densities more slowly in benchmarks/toy_race.py).

    Options (keywords): ``trace`` (``"hutchinson"`` | ``"exact"``, training mode; default exact
    for ``input_dim <= 4``, where it learns faster per second, else Hutchinson),
    ``eval_trace`` (default ``"exact"``), ``noise`` (``"rademacher"`` | ``"gaussian"``),
    ``solver`` (a torchdiffeq method used in training mode, default ``"rk4"``), ``eval_solver``
    (eval mode; default ``solver`` if it is adaptive, else ``"dopri5"``, so that a reported
    likelihood never depends on a coarse grid), ``atol``/``rtol`` (1e-5, adaptive solvers),
    ``steps`` (fixed steps over [0, T] of a fixed-grid solver; default 3) or ``step_size`` (in
    units of t), ``drift_check``/``drift_tol`` (every 50 fixed-grid training solves, compare with
    the adaptive solve and double ``steps`` when the log-det drifts more than 0.05 nats; see
    :mod:`pyro_ffjord.drift`), ``adjoint`` (memory-light gradients; default False: backprop through the
    solver is faster), ``T`` (end time, 0.5), ``train_T`` (learn T), ``kinetic``/``jacobian``
    (RNODE weights; see :attr:`regularization`), ``error_norm`` (``"batch"`` RMS or worst
    ``"sample"``), ``max_nfe`` (step budget per solve; exceeding it raises
    :class:`~pyro_ffjord.ode.SolverError`, and a fixed grid that cannot fit is refused before
    it starts) and ``max_memory_gb`` (what the graph of one training solve may hold when
    backpropagating through the solver; default half the free memory). The defaults are
    defined in :mod:`pyro_ffjord.config`; every option is checked when the flow is built.

    The state_dict holds the end time (``log_T``: loading it sets ``config.T``) and a record
    of the architecture, so loading into a flow with another activation or time embedding is
    refused. An empty batch (an empty plate) maps to an empty result without a solve.

    References:

    [1] Will Grathwohl, Ricky T. Q. Chen, Jesse Bettencourt, Ilya Sutskever, David Duvenaud.
    FFJORD: Free-form Continuous Dynamics for Scalable Reversible Generative Models. ICLR 2019.

    [2] Chris Finlay, Jörn-Henrik Jacobsen, Levon Nurbekyan, Adam M. Oberman. How to train your
    neural ODE: the world of Jacobian and kinetic regularization. ICML 2020.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dims: Optional[Sequence[int]] = None,
        preset: Optional[str] = None,
        **options,
    ) -> None:
        super().__init__(self._setup, SolveStats(), self._state_key)
        self._init_params(input_dim, preset, dict(options, hidden_dims=hidden_dims))

    def train(self, mode: bool = True) -> "FFJORD":
        # The cache key holds the mode already; this frees the graph the cache holds.
        self.clear_cache()
        return super().train(mode)


def ffjord(input_dim: int, hidden_dims: Optional[Sequence[int]] = None, **options) -> FFJORD:
    """A helper in Pyro's style that builds an :class:`FFJORD`; works as
    ``partial(pyro.distributions.transforms.iterated, 2, ffjord)`` for
    :class:`~pyro.infer.autoguide.AutoNormalizingFlow`.

    Example::

        >>> ffjord(3).input_dim
        3
    """
    return FFJORD(input_dim, hidden_dims=hidden_dims, **options)
