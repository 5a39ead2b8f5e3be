"""Networks and posteriors of ``examples/vae.py``: the Sylvester-flows gated convolutional
encoder and decoder, Householder-Sylvester flows amortized on the encoder's output, and the
VAE (model and guide) whose posterior flows are chosen by ``--flow``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Transform, constraints

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import (
    conditional_affine_autoregressive,
    conditional_householder,
    conditional_planar,
)

from pyro_ffjord import ConditionalFFJORD
from pyro_ffjord.config import is_adaptive

FLOWS = ("none", "planar", "iaf", "sylvester", "householder", "ffjord")
H_DIM = 256  # encoder output h, the context of every amortized flow

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


# --- encoder and decoder ------------------------------------------------------------------------
class GatedConv2d(nn.Module):
    """``conv_a(x) * sigmoid(conv_g(x))``."""

    def __init__(self, cin, cout, kernel, stride, padding):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, kernel, stride, padding)
        self.g = nn.Conv2d(cin, cout, kernel, stride, padding)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.g(x))


class GatedConvTranspose2d(nn.Module):
    """``convT_a(x) * sigmoid(convT_g(x))``."""

    def __init__(self, cin, cout, kernel, stride, padding, output_padding=0):
        super().__init__()
        self.a = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding)
        self.g = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.g(x))


def _ch(n: int, width: float) -> int:
    return max(2, int(round(n * width)))


class Encoder(nn.Module):
    """The Sylvester-flows encoder: six gated convolutions to ``h`` (256), then linear heads
    for the mean and (softplus) variance of the base Gaussian. ``width`` scales the channels
    (32, 64) of the hidden layers; ``h`` stays 256."""

    def __init__(self, image_shape, latent_dim, width=1.0, categorical=False):
        super().__init__()
        c, H, W = image_shape
        c32, c64 = _ch(32, width), _ch(64, width)
        last = (H // 4, W // 4)  # 7x7 for 28x28, 7x5 for Frey's 28x20
        self.net = nn.Sequential(
            GatedConv2d(c, c32, 5, 1, 2),
            GatedConv2d(c32, c32, 5, 2, 2),
            GatedConv2d(c32, c64, 5, 1, 2),
            GatedConv2d(c64, c64, 5, 2, 2),
            GatedConv2d(c64, c64, 5, 1, 2),
            GatedConv2d(c64, H_DIM, last, 1, 0),
        )
        self.loc = nn.Linear(H_DIM, latent_dim)
        self.var = nn.Linear(H_DIM, latent_dim)
        self.categorical = categorical
        self.scale_input = 1.0 / 255 if categorical else 1.0

    def forward(self, x):
        h = self.net(x * self.scale_input).flatten(1)
        var = F.softplus(self.var(h))
        # Multinomial (Frey) data: the reference clamps the variance to [0.01, 7].
        var = var.clamp(0.01, 7.0) if self.categorical else var + 1e-8
        return h, self.loc(h), var.sqrt()


class Decoder(nn.Module):
    """Gated transposed convolutions from ``z`` to per-pixel logits: (N, C, H, W) Bernoulli
    logits, or (N, C, H, W, 256) categorical logits."""

    def __init__(self, image_shape, latent_dim, width=1.0, categorical=False):
        super().__init__()
        c, H, W = image_shape
        c32, c64 = _ch(32, width), _ch(64, width)
        last = (H // 4, W // 4)
        self.net = nn.Sequential(
            GatedConvTranspose2d(latent_dim, c64, last, 1, 0),
            GatedConvTranspose2d(c64, c64, 5, 1, 2),
            GatedConvTranspose2d(c64, c32, 5, 2, 2, 1),
            GatedConvTranspose2d(c32, c32, 5, 1, 2),
            GatedConvTranspose2d(c32, c32, 5, 2, 2, 1),
            GatedConvTranspose2d(c32, c32, 5, 1, 2),
        )
        self.categorical = categorical
        self.image_shape = tuple(image_shape)
        if categorical:
            self.out = nn.Sequential(nn.Conv2d(c32, _ch(256, width), 5, 1, 2), nn.Conv2d(_ch(256, width), c * 256, 1))
        else:
            self.out = nn.Conv2d(c32, c, 1)

    def forward(self, z):
        batch = z.shape[:-1]
        y = self.out(self.net(z.reshape(-1, z.shape[-1], 1, 1)))
        if self.categorical:
            c, H, W = self.image_shape
            y = y.reshape(-1, c, 256, H, W).permute(0, 1, 3, 4, 2)
        return y.reshape(*batch, *y.shape[1:])


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


# --- the VAE --------------------------------------------------------------------------------------
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
    return cfg


def build_flows(args, latent_dim: int) -> nn.ModuleList:
    K, flow = args.num_flows, args.flow
    hyper = list(args.hypernet_hidden)
    if flow == "none":
        return nn.ModuleList()
    if flow == "planar":
        return nn.ModuleList(conditional_planar(latent_dim, H_DIM, hidden_dims=hyper) for _ in range(K))
    if flow == "iaf":
        return nn.ModuleList(
            conditional_affine_autoregressive(latent_dim, H_DIM, hidden_dims=[args.iaf_hidden]) for _ in range(K)
        )
    if flow == "sylvester":
        return nn.ModuleList(ConditionalSylvester(latent_dim, H_DIM, args.num_householder) for _ in range(K))
    if flow == "householder":
        return nn.ModuleList(
            [conditional_householder(latent_dim, H_DIM, hidden_dims=hyper, count_transforms=args.num_householder)]
        )
    if flow == "ffjord":
        cfg = ffjord_settings(args)
        blocks, steps = cfg.pop("blocks"), cfg.pop("steps")
        if not is_adaptive(cfg["solver"]):
            cfg["step_size"] = cfg["T"] / (steps or 4)
        return nn.ModuleList(ConditionalFFJORD(latent_dim, H_DIM, **cfg) for _ in range(blocks))
    raise ValueError(f"unknown flow {flow!r}; choose one of {FLOWS}")


class VAE(nn.Module):
    def __init__(self, image_shape, likelihood, latent_dim, width, flows: nn.ModuleList):
        super().__init__()
        categorical = likelihood == "categorical"
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.encoder = Encoder(image_shape, latent_dim, width, categorical)
        self.decoder = Decoder(image_shape, latent_dim, width, categorical)
        self.flows = flows

    # The three distributions, shared by the Pyro model/guide and the evaluation.
    def prior(self, batch: int, like: torch.Tensor):
        return dist.Normal(like.new_zeros(batch, self.latent_dim), 1.0).to_event(1)

    def observation(self, z):
        logits = self.decoder(z)
        if self.likelihood == "categorical":
            return dist.Categorical(logits=logits).to_event(3)
        return dist.Bernoulli(logits=logits).to_event(3)

    def posterior(self, x):
        h, loc, scale = self.encoder(x)
        base = dist.Normal(loc, scale).to_event(1)
        if len(self.flows) == 0:
            return base
        return dist.ConditionalTransformedDistribution(base, list(self.flows)).condition(h)

    def model(self, x, beta=1.0):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):  # beta * log p(z): the prior half of the KL term
                z = pyro.sample("z", self.prior(x.shape[0], x))
            obs = x.long() if self.likelihood == "categorical" else x
            pyro.sample("x", self.observation(z), obs=obs)

    def guide(self, x, beta=1.0):
        pyro.module("encoder", self.encoder)
        pyro.module("flows", self.flows)
        q = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):  # beta * log q(z|x): the posterior half
                pyro.sample("z", q)

    @torch.no_grad()
    def log_weights(self, x) -> torch.Tensor:
        """``log p(x, z) - log q(z | x)`` for one ``z ~ q(. | x)`` per row of ``x``."""
        q = self.posterior(x)
        z = q.rsample()
        log_q = q.log_prob(z)  # cached: no second solve
        obs = x.long() if self.likelihood == "categorical" else x
        return self.observation(z).log_prob(obs) + self.prior(x.shape[0], x).log_prob(z) - log_q


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def nfe_total(vae: VAE) -> int:
    return sum(m.stats.nfe_forward_total for m in vae.flows if isinstance(m, ConditionalFFJORD))
