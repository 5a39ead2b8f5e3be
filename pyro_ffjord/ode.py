r"""The augmented ODE of a continuous normalizing flow and its solve.

Time is rescaled to :math:`s \in [0, 1]`, :math:`t = sT`, so that the end time :math:`T` is an
ordinary tensor inside the dynamics and gets exact gradients (directly, or through the adjoint
as one of its parameters). The state is

.. math::

    \frac{d}{ds}\begin{pmatrix} z \\ \ell \\ k \\ j \end{pmatrix}
    = \begin{pmatrix} T f(z, sT) \\ T\,\mathrm{tr}(\partial f/\partial z) \\
      \tfrac{T}{2D}\lVert f\rVert^2 \\ \tfrac{T}{D}\lVert \epsilon^\top \partial f/\partial z\rVert^2
      \end{pmatrix},

with :math:`\ell(1) = \log|\det \partial z(1)/\partial z(0)|`; the RNODE states :math:`k, j`
exist only while regularizing and never drive step-size control.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchdiffeq import odeint, odeint_adjoint

from .config import FFJORDConfig, is_adaptive
from .divergence import exact_divergence, hutchinson_divergence
from .nets import LayerConditioning
from .stats import SolveStats

_ADVICE = (
    "Try looser tolerances (atol/rtol), RNODE regularization (kinetic=0.01, jacobian=0.01), "
    "a fixed-step solver (solver='rk4', steps=8), or a larger max_nfe if the dynamics "
    "are merely hard."
)


class SolverError(ValueError):
    """The ODE solve failed: step budget exceeded, step-size underflow or non-finite state."""


class AugmentedDynamics:
    """The right-hand side of one solve: it holds that solve's noise, context terms and T, so
    the adjoint pass reuses exactly them even if other solves happen in between.

    ``kinetic`` and ``jacobian`` are the RNODE weights of this solve (0 adds no state);
    ``noise`` holds Hutchinson's probe vectors when ``trace="hutchinson"``. ``max_nfe`` bounds
    the evaluations of each solve and, when backpropagating through the solver,
    ``max_memory_gb`` the memory its graph holds (``None``: half of what is free)."""

    def __init__(
        self,
        net: Callable,
        *,
        T: Tensor,
        stats: SolveStats,
        cond: Optional[List[LayerConditioning]] = None,
        trace: str = "exact",
        noise: Optional[Tensor] = None,
        kinetic: float = 0.0,
        jacobian: float = 0.0,
        max_nfe: int = 20_000,
        max_memory_gb: Optional[float] = None,
    ) -> None:
        self.net, self.cond, self.T = net, cond, T
        self.trace, self.noise = trace, noise
        self.kinetic, self.jacobian = kinetic, jacobian
        self.max_nfe, self.stats = max_nfe, stats
        self.max_memory_gb = max_memory_gb
        self.nfe_forward = self.nfe_backward = 0
        self.solving = False
        self.graph_bytes_per_eval = 0  # measured on the first evaluation that builds a graph
        self.memory_budget: Optional[float] = None

    def _count(self) -> None:
        if self.solving:
            self.nfe_forward += 1
            n, where = self.nfe_forward, "forward"
        else:  # only the adjoint pass calls us outside the forward solve
            self.nfe_backward += 1
            self.stats.nfe_backward_total += 1
            n, where = self.nfe_backward, "adjoint (backward)"
        if n > self.max_nfe:
            raise SolverError(
                f"the {where} solve exceeded its step budget of max_nfe={self.max_nfe} function "
                f"evaluations: the dynamics are stiff or diverging. {_ADVICE}"
            )
        if self.graph_bytes_per_eval and self.solving:
            self._check_memory(n * self.graph_bytes_per_eval)

    def _check_memory(self, held: float) -> None:
        # Direct backprop keeps every evaluation's activations until backward: a stiff solve
        # would exhaust memory long before max_nfe. Free memory is read once, when it matters.
        if self.memory_budget is None:
            if self.max_memory_gb is not None:
                self.memory_budget = self.max_memory_gb * 2**30
            elif held > _MEMORY_CHECK_FROM:
                self.memory_budget = held + 0.5 * free_memory(self.T.device)
        if self.memory_budget is not None and held > self.memory_budget:
            per_eval = self.graph_bytes_per_eval / 2**20
            raise SolverError(
                f"the graph of this training solve would hold more than {self.memory_budget / 2**30:.2f} GiB "
                f"({self.nfe_forward} evaluations of {per_eval:.1f} MiB; budget max_memory_gb="
                f"{self.max_memory_gb if self.max_memory_gb is not None else 'None: half the free memory'}): "
                "the dynamics are stiff or diverging. adjoint=True needs memory independent of the number "
                f"of steps; a smaller batch or a set max_memory_gb also help. {_ADVICE}"
            )

    def __call__(self, s: Tensor, state: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        self._count()
        z = state[0]
        graph = torch.is_grad_enabled()
        # The trace needs autograd even under torch.inference_mode(): leave it locally, with
        # a normal copy of the state (inference tensors cannot enter a graph).
        inference = torch.is_inference_mode_enabled()
        with torch.inference_mode(False) if inference else contextlib.nullcontext(), torch.enable_grad():
            T, cond = self.T, self.cond
            if inference:
                z, s, T = z.clone(), s.clone(), T.clone()
                cond = cond and [type(c)(*(t if t is None else t.clone() for t in c)) for c in cond]
            if not (graph and z.requires_grad):
                # Without a graph to extend (e.g. the adjoint's no-grad forward solve) start a
                # fresh leaf: a view made under no_grad cannot be differentiated against.
                z = z.detach().requires_grad_()
            if graph and self.solving and not self.graph_bytes_per_eval:
                saved = _SavedBytes()
                with saved:
                    f, div, frob = self._field(s, z, graph, T, cond)
                self.graph_bytes_per_eval = max(saved.nbytes, 1)
                self._check_memory(self.graph_bytes_per_eval)
            else:
                f, div, frob = self._field(s, z, graph, T, cond)
        out = [f, div]
        if self.kinetic or self.jacobian:
            out.append(0.5 * f.pow(2).mean(-1) / self.T if self.kinetic else torch.zeros_like(div))
            out.append(frob / self.T if self.jacobian else torch.zeros_like(div))
        if not graph:
            out = [o.detach() for o in out]
        return tuple(out)

    def _field(self, s: Tensor, z: Tensor, graph: bool, T: Tensor, cond):
        f = T * self.net(s * T, z, cond)
        if self.trace == "exact":
            div, frob = exact_divergence(f, z, graph, self.jacobian)
        else:
            div, frob = hutchinson_divergence(f, z, self.noise, graph, self.jacobian)
        return f, div, frob


_MEMORY_CHECK_FROM = 256 * 2**20  # below this a graph is never the problem: skip reading free memory


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd saves for backward (each storage once) while active."""

    def __init__(self) -> None:
        self.nbytes, self._seen = 0, set()

        def pack(t: Tensor) -> Tensor:
            try:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key not in self._seen:
                    self._seen.add(key)
                    self.nbytes += storage.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. a batched tensor inside vmap
                self.nbytes += t.numel() * t.element_size()
            return t

        super().__init__(pack, lambda t: t)


def free_memory(device: torch.device) -> float:
    """Bytes free on ``device`` (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) if hasattr(os, "sysconf") else 8 * 2**30


def batch_rms(state: Sequence[Tensor]) -> Tensor:
    """Step-size control norm of ``error_norm="batch"``: the larger of the RMS of z and of the
    log-det over the whole batch (torchdiffeq's default, without the RNODE states).

    Detached: step sizes are the solver's choice, not a function of the parameters. Their
    gradient is meaningless and, where the field saturates (f1 == f0), it is 0 * inf = NaN."""
    z, logdet = state[0].detach(), state[1].detach()
    return torch.max(z.pow(2).mean().sqrt(), logdet.pow(2).mean().sqrt())


def worst_sample_rms(state: Sequence[Tensor]) -> Tensor:
    """Step-size control norm of ``error_norm="sample"``: the worst sample's RMS over
    (z, log-det), so that one sample's error cannot hide in the batch."""
    z, logdet = state[0].detach(), state[1].detach()  # no gradient through step sizes
    per_sample = (z.pow(2).sum(-1) + logdet.pow(2)) / (z.shape[-1] + 1)
    return per_sample.max().sqrt()


def solve(
    dynamics: AugmentedDynamics,
    x: Tensor,
    *,
    reverse: bool,
    config: FFJORDConfig,
    solver: str,
    adjoint: bool,
    adjoint_params: Sequence[Tensor],
) -> Tuple[Tensor, Tensor]:
    """Integrate from ``x`` (s: 0 -> 1, or 1 -> 0 if ``reverse``).

    Returns the end point and :math:`\\log|\\det J|` of the *forward* map (so the same
    quantity in both directions), and stores the RNODE penalty in ``dynamics.stats``. An empty
    batch (an empty plate) maps to itself with log-det 0, without a solve.
    """
    regularize = dynamics.kinetic or dynamics.jacobian
    params = tuple(p for p in adjoint_params if p.requires_grad)
    if x.shape[:-1].numel() == 0:
        return _empty_solve(dynamics, x, params, regularize)
    zeros = x.new_zeros(x.shape[:-1])
    state = (x, zeros, zeros, zeros) if regularize else (x, zeros)
    grid = [1.0, 0.0] if reverse else [0.0, 1.0]
    s = torch.tensor(grid, dtype=x.dtype, device=x.device)
    kwargs: dict = {"method": solver, "rtol": config.rtol, "atol": config.atol}
    if is_adaptive(solver):
        kwargs["options"] = {"norm": worst_sample_rms if config.error_norm == "sample" else batch_rms}
    else:
        T = float(dynamics.T.detach())
        if not math.isfinite(T) or T <= 0:
            raise SolverError(diagnose(dynamics, x) or f"the end time T is {T}")
        config.check_step_budget(solver, T)  # T may have been learned or loaded since construction
        kwargs["options"] = {"step_size": 1.0 / config.fixed_steps(T)}
    dynamics.stats.solves += 1
    dynamics.stats.last = dynamics
    dynamics.solving = True
    try:
        if adjoint:
            if is_adaptive(solver):
                # Seminorm: the parameter adjoints need no error control (Kidger et al., 2021).
                kwargs["adjoint_options"] = {"norm": "seminorm"}

            def run(x0: Tensor) -> Tuple[Tensor, ...]:
                start = (x0, *state[1:])
                return tuple(odeint_adjoint(dynamics, start, s, adjoint_params=params, **kwargs))

            out = _GuardedAdjoint.apply(run, solver, x, *params)
        else:
            out = odeint(dynamics, state, s, **kwargs)
    except AssertionError as e:  # torchdiffeq signals underflow and step limits by assert
        raise SolverError(diagnose(dynamics, x) or f"ODE solver {solver!r} failed ({e}). {_ADVICE}") from e
    finally:
        dynamics.solving = False
        dynamics.stats.nfe_forward_total += dynamics.nfe_forward
    end = [o[-1] for o in out]
    z, logdet = end[0], end[1]
    if not bool(torch.isfinite(z).all() and torch.isfinite(logdet).all()):
        raise SolverError(diagnose(dynamics, x) or f"the ODE solution is not finite (diverging dynamics). {_ADVICE}")
    if reverse:
        logdet = -logdet
    if regularize:
        kinetic, jacobian = (-e if reverse else e for e in end[2:])
        dynamics.stats.regularization = dynamics.kinetic * kinetic.mean() + dynamics.jacobian * jacobian.mean()
    return z, logdet


def _empty_solve(dynamics: AugmentedDynamics, x: Tensor, params: Sequence[Tensor], regularize) -> Tuple[Tensor, Tensor]:
    # Zero times the parameters keeps the result in the graph, so that a loss over an empty
    # plate still backpropagates (zero gradients) like any other.
    anchor = sum((p.sum() * 0 for p in params), x.new_zeros(()))
    logdet = x.new_zeros(x.shape[:-1]) + anchor
    if regularize:
        dynamics.stats.regularization = anchor
    return x.clone(), logdet


def diagnose(dynamics: AugmentedDynamics, x: Tensor) -> Optional[str]:
    """A cause of a failed solve other than hard dynamics, if there is one: the advice for
    stiffness would send a user after the wrong problem."""
    for name, p in dynamics.net.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return (f"the vector field's parameter {name!r} holds NaN or infinite values, so every solve "
                    "fails: a diverged optimizer step or a bad state_dict. Restore a good checkpoint; "
                    "lower the learning rate or clip gradients")
    T = dynamics.T.detach()
    if not bool(torch.isfinite(T).all()):
        return (f"the end time T is {float(T)} (log_T is not finite): the flow was corrupted "
                "(e.g. by a NaN step with train_T=True or a bad state_dict); restore a good checkpoint")
    for c in dynamics.cond or ():
        if any(t is not None and not bool(torch.isfinite(t).all()) for t in c):
            return ("the conditioning terms computed from the context are not finite: the context "
                    "head's parameters hold NaN or infinite values")
    return None


class _GuardedAdjoint(torch.autograd.Function):
    """``odeint_adjoint`` whose backward solve reports failure as :class:`SolverError`.

    torchdiffeq signals a step-size underflow by ``assert``, and in the adjoint pass that
    assert fires inside ``loss.backward()``, out of reach of :func:`solve`. So the adjoint
    solve runs as an inner graph and this backward differentiates it, catching the failure
    (the pattern of reentrant checkpointing)."""

    @staticmethod
    def forward(ctx, run: Callable, solver: str, x: Tensor, *params: Tensor):
        with torch.enable_grad():
            x0 = x.detach().requires_grad_(x.requires_grad)
            out = run(x0)
        ctx.inner, ctx.solver = (x0, out, params), solver
        return tuple(o.detach() for o in out)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        x0, out, params = ctx.inner
        wanted = [t for t in (x0, *params) if t.requires_grad]
        used = [(o, g if g is not None else torch.zeros_like(o)) for o, g in zip(out, grads) if o.requires_grad]
        try:
            got = iter(torch.autograd.grad([o for o, _ in used], wanted, [g for _, g in used], allow_unused=True))
        except AssertionError as e:
            raise SolverError(
                f"the adjoint (backward) solve with {ctx.solver!r} failed ({e}): the backward dynamics are "
                f"stiffer than the forward ones. {_ADVICE} Or use adjoint=False (backprop through the "
                "solver replays the forward steps and cannot fail this way)."
            ) from e
        finally:
            ctx.inner = None
        return (None, None, *(next(got) if t.requires_grad else None for t in (x0, *params)))
