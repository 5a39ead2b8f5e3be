"""Posterior flows of ``examples/vae.py``, all amortized on the encoder's output ``h``: Pyro's
conditional planar, IAF and Householder flows, Householder-Sylvester flows (van den Berg et al.)
and ``pyro_ffjord.ConditionalFFJORD`` in the paper's or our lean configuration; with the
command-line options that choose and size them (:func:`add_flow_args`, :func:`build_flows`)."""

from __future__ import annotations

import argparse

import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import (
    conditional_affine_autoregressive,
    conditional_householder,
    conditional_planar,
)
from torch import nn
from torch.distributions import Transform, constraints

from pyro_ffjord import ConditionalFFJORD, runs
from pyro_ffjord.config import is_adaptive

FLOWS = ("none", "planar", "iaf", "sylvester", "householder", "ffjord")

# The paper's amortized low-rank CNF posteriors, per data set (rank, hidden dims, blocks,
# nonlinearity) as in the FFJORD reference code's README; "concat" time embedding, T = 0.5,
# dopri5 at 1e-5, Hutchinson's trace with Rademacher probes while training.
PAPER_FFJORD = {
    "mnist": dict(rank=64, hidden_dims=[1024, 1024], blocks=2, activation="softplus"),
    "omniglot": dict(rank=20, hidden_dims=[512, 512], blocks=5, activation="softplus"),
    "freyfaces": dict(rank=20, hidden_dims=[512, 512], blocks=2, activation="softplus"),
    "caltech": dict(rank=20, hidden_dims=[2048], blocks=1, activation="tanh"),
}
# Ours for CPU budgets: one block whose field sees h through its first layer ("concat"
# conditioning: a per-sample bias W_c h), trained with 4 fixed rk4 steps (backprop through
# the solver) and scored with adaptive dopri5 and the exact trace.
LEAN_FFJORD = dict(
    conditioning="concat", rank=1, hidden_dims=[256, 256], blocks=1, activation="softplus",
    solver="rk4", steps=4,
)


# --- Householder-Sylvester flows amortized on h --------------------------------------------------
class ConditionedSylvester(Transform):
    r"""``z' = z + Q R tanh(S Q^T z + b)`` for per-sample parameters, with ``Q`` a product of
    Householder reflections and ``R``, ``S`` upper triangular; the log-det is
    :math:`\sum_i \log|1 + R_{ii} S_{ii} \tanh'(\cdot)_i|`."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, Q, R, S, b):
        super().__init__(cache_size=1)
        self.Q, self.R, self.S, self.b = Q, R, S, b  # (..., D, D) x3, (..., D)
        self._ladj = None

    def _call(self, z):
        # Row vectors: pre = z Q S^T + b, z' = z + tanh(pre) R^T Q^T.
        qz = (z.unsqueeze(-2) @ self.Q).squeeze(-2)
        pre = (qz.unsqueeze(-2) @ self.S.transpose(-1, -2)).squeeze(-2) + self.b
        act = torch.tanh(pre)
        y = z + ((act.unsqueeze(-2) @ self.R.transpose(-1, -2)) @ self.Q.transpose(-1, -2)).squeeze(-2)
        diag = self.R.diagonal(dim1=-2, dim2=-1) * self.S.diagonal(dim1=-2, dim2=-1)
        self._ladj = (z, y, torch.log(torch.abs(1 + diag * (1 - act.pow(2)))).sum(-1))
        return y

    def _inverse(self, y):
        raise NotImplementedError("Sylvester flows have no closed-form inverse; score samples of rsample()")

    def log_abs_det_jacobian(self, x, y):
        if self._ladj is None or self._ladj[0] is not x or self._ladj[1] is not y:
            self._call(x)
        return self._ladj[2]


class ConditionalSylvester(ConditionalTransformModule):
    """Householder-Sylvester flows (van den Berg et al. 2018, "H-SNF") whose parameters are
    linear functions of the context, as in their amortized VAE: per flow, one D x D matrix
    whose upper triangle is R's and whose lower triangle (transposed) is S's, diagonals
    ``tanh``-squashed, a bias and ``num_householder`` reflection vectors.

    (Pyro's non-conditional ``Sylvester`` computes ``z + tanh(z S Q^T + b) Q R`` but the
    log-det of ``z + Q R tanh(S Q^T z + b)``; the two differ once ``Q`` is not the identity.)
    """

    def __init__(self, input_dim, context_dim, num_householder=8):
        super().__init__()
        D = input_dim
        self.input_dim, self.num_householder = D, num_householder
        self.dense = nn.Linear(context_dim, D * D)
        self.diag1 = nn.Linear(context_dim, D)
        self.diag2 = nn.Linear(context_dim, D)
        self.bias = nn.Linear(context_dim, D)
        self.house = nn.Linear(context_dim, num_householder * D)
        self.register_buffer("triu", torch.triu(torch.ones(D, D), diagonal=1))
        for m in (self.dense, self.diag1, self.diag2, self.bias):
            nn.init.uniform_(m.weight, -0.01, 0.01)
            nn.init.uniform_(m.bias, -0.01, 0.01)

    def condition(self, context):
        D = self.input_dim
        batch = context.shape[:-1]
        full = self.dense(context).reshape(*batch, D, D)
        eye = torch.eye(D, dtype=context.dtype, device=context.device)
        R = full * self.triu + torch.diag_embed(torch.tanh(self.diag1(context)))
        S = full.transpose(-1, -2) * self.triu + torch.diag_embed(torch.tanh(self.diag2(context)))
        v = self.house(context).reshape(*batch, self.num_householder, D)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        Q = eye.expand(*batch, D, D)
        for k in range(self.num_householder):
            vk = v[..., k, :]
            Q = Q - 2 * (Q @ vk.unsqueeze(-1)) @ vk.unsqueeze(-2)  # Q H_k
        return ConditionedSylvester(Q, R, S, self.bias(context))


# --- options ----------------------------------------------------------------------------------
def add_flow_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--flow`` and the options that size each kind of flow (``None``: a default that
    ``examples/vae.py`` fills in, for a full run or ``--quick``)."""
    count, rate, weight = runs.positive_int, runs.positive_float, runs.nonnegative_float
    g = parser.add_argument_group("posterior flows")
    g.add_argument("--flow", choices=FLOWS, default="ffjord")
    g.add_argument("--num-flows", type=count, help="planar / iaf / sylvester flows in sequence (default 4)")
    g.add_argument("--hypernet-hidden", type=count, nargs="+",
                   help="hidden widths of Pyro's DenseNN hypernets (planar, householder; default 256)")
    g.add_argument("--iaf-hidden", type=count, help="hidden width of each IAF's conditional MADE (default 640)")
    g.add_argument("--num-householder", type=count, help="reflections per Sylvester flow (default 8)")
    g.add_argument("--ffjord-config", choices=("paper", "lean"), default="lean")
    g.add_argument("--ffjord-rank", type=count)
    g.add_argument("--ffjord-hidden-dims", type=count, nargs="+")
    g.add_argument("--ffjord-blocks", type=count)
    g.add_argument("--ffjord-activation")
    g.add_argument("--ffjord-conditioning", choices=("concat", "lowrank", "bias"))
    g.add_argument("--ffjord-solver", help="training solver (paper: dopri5; lean: rk4)")
    g.add_argument("--ffjord-steps", type=count,
                   help="steps of a fixed-grid training solver (lean: 4); adaptive solvers ignore it")
    g.add_argument("--ffjord-tol", type=rate, help="atol = rtol of dopri5 (default 1e-5)")
    g.add_argument("--ffjord-T", type=rate, default=0.5)
    g.add_argument("--adjoint", action="store_true", help="adjoint gradients (the reference code's)")
    g.add_argument("--kinetic", type=weight, default=0.0, help="RNODE kinetic-energy weight")
    g.add_argument("--jacobian", type=weight, default=0.0, help="RNODE Jacobian-norm weight")
    return parser


def ffjord_settings(args) -> dict:
    """The FFJORD blocks' configuration: the chosen base config with command-line overrides."""
    if args.ffjord_config == "paper":
        cfg = dict(PAPER_FFJORD[args.dataset], conditioning="lowrank", solver="dopri5", steps=None)
    else:
        cfg = dict(LEAN_FFJORD)
    for key in ("rank", "hidden_dims", "blocks", "activation", "conditioning", "solver", "steps"):
        value = getattr(args, "ffjord_" + key)
        if value is not None:
            cfg[key] = value
    cfg.update(
        time_embedding="concat", T=args.ffjord_T, atol=args.ffjord_tol, rtol=args.ffjord_tol,
        trace="hutchinson", noise="rademacher", eval_trace="exact", eval_solver="dopri5",
        adjoint=args.adjoint, kinetic=args.kinetic, jacobian=args.jacobian,
    )
    if is_adaptive(cfg["solver"]):  # the library refuses steps that no solver would use
        cfg["steps"] = None
    return cfg


def build_flows(args, latent_dim: int, context_dim: int = 256) -> nn.ModuleList:
    """The posterior flows ``args.flow`` of ``latent_dim`` numbers, amortized on a context of
    ``context_dim`` (the encoder's ``h``)."""
    K, flow = args.num_flows, args.flow
    hyper = list(args.hypernet_hidden)
    if flow == "none":
        return nn.ModuleList()
    if flow == "planar":
        return nn.ModuleList(conditional_planar(latent_dim, context_dim, hidden_dims=hyper) for _ in range(K))
    if flow == "iaf":
        hidden = [args.iaf_hidden]
        return nn.ModuleList(conditional_affine_autoregressive(latent_dim, context_dim, hidden) for _ in range(K))
    if flow == "sylvester":
        return nn.ModuleList(ConditionalSylvester(latent_dim, context_dim, args.num_householder) for _ in range(K))
    if flow == "householder":
        count = args.num_householder
        return nn.ModuleList([conditional_householder(latent_dim, context_dim, hyper, count_transforms=count)])
    if flow == "ffjord":
        cfg = ffjord_settings(args)
        blocks = cfg.pop("blocks")
        return nn.ModuleList(ConditionalFFJORD(latent_dim, context_dim, **cfg) for _ in range(blocks))
    raise ValueError(f"unknown flow {flow!r}; choose one of {FLOWS}")


def nfe_total(module: nn.Module) -> int:
    """Forward evaluations of the FFJORD fields inside ``module`` so far."""
    return sum(m.stats.nfe_forward_total for m in module.modules() if isinstance(m, ConditionalFFJORD))
