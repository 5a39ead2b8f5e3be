r"""Amortized variational inference with :class:`~pyro_ffjord.ConditionalFFJORD` as
:math:`q(z \mid x)`, on a model whose posterior is known exactly for every :math:`x`.

The model is linear-Gaussian,

.. math::

    z \sim \mathcal N(0, I_d), \qquad x \mid z \sim \mathcal N(A z, \sigma^2 I_n),

so :math:`p(z \mid x) = \mathcal N(\mu(x), \Sigma)` with
:math:`\Sigma = (I + A^\top A / \sigma^2)^{-1}` and :math:`\mu(x) = \Sigma A^\top x / \sigma^2`.
``A = U diag(s) V^T`` with a rotated ``V`` and spread singular values ``s``, so the posterior
is non-isotropic and correlated (d = 2 by default: posterior standard deviations 0.45 and
0.89 along axes rotated by 30 degrees, correlation -0.52).

Every guide reads :math:`x` through the same small encoder (an MLP) and is trained by SVI on
the same minibatches of a fixed training set. The guides:

- ``concat`` / ``lowrank`` / ``bias``: a standard normal pushed through a
  ``ConditionalFFJORD`` whose vector field is conditioned on the encoder's output (the
  *context*) in one of the three ways the library offers.
- ``gaussian``: the amortized full-covariance Gaussian (encoder -> mean and Cholesky factor).
  For this model it contains the exact posterior, so it is the scale to compare with, not a
  weaker rival.
- ``diagonal``: the amortized mean-field Gaussian (encoder -> mean and standard deviations).
  It cannot represent the correlation; its best possible expected KL is known in closed form
  (``diag_floor`` in the JSON) and any guide below it has learned the correlation.

The score is the expected KL divergence :math:`E_{x}[\mathrm{KL}(q(\cdot \mid x) \,\|\,
p(\cdot \mid x))]` over held-out :math:`x`, estimated by Monte Carlo as the mean of
:math:`\log q(z \mid x) - \log p(z \mid x)` for :math:`z \sim q(\cdot \mid x)`, with the flows
in eval mode (exact trace, adaptive dopri5): an honest density, not the training estimate.
It is reported at several points of training; the PNG shows the curves and samples.

The VAE recipe (an encoder feeding the context)
-----------------------------------------------

The flow never sees :math:`x` itself, only ``context = encoder(x)``; the gradient of the ELBO
reaches the encoder through the context. Register both modules in the guide::

    encoder = nn.Sequential(nn.Linear(x_dim, 64), nn.ELU(), nn.Linear(64, context_dim))
    flow = ConditionalFFJORD(z_dim, context_dim, conditioning="lowrank", preset="fast")

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("flow", flow)
        context = encoder(x)                                   # (batch, context_dim)
        base = dist.Normal(x.new_zeros(len(x), z_dim), 1.0).to_event(1)
        q = dist.ConditionalTransformedDistribution(base, [flow]).condition(context)
        with pyro.plate("data", len(x)):
            pyro.sample("z", q)                                # one solve: sample + log q

In a VAE the model holds the decoder (``pyro.module("decoder", decoder)``) and the same plate;
nothing else changes. Variants: ``"concat"`` feeds the context to the first layer of the
vector field, ``"lowrank"`` (the FFJORD paper's VAE amortization) adds per-sample rank-``r``
weights and biases to every layer, ``"bias"`` per-sample biases only. A Gaussian base whose
mean and scale also come from the encoder (``dist.Normal(loc(x), scale(x))``), refined by the
flow, works the same way. Call ``flow.eval()`` before scoring held-out data so that the log-
density uses the exact trace and the eval solver.

Run::

    python examples/amortized_vi.py                 # all guides, about 8 minutes on one CPU thread
    python examples/amortized_vi.py --quick         # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from torch import nn
from tqdm.auto import tqdm

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyro_ffjord import ConditionalFFJORD

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_info import machine_info  # noqa: E402

FLOW_GUIDES = ("concat", "lowrank", "bias")
GAUSSIAN_GUIDES = ("gaussian", "diagonal")
ALL_GUIDES = FLOW_GUIDES + GAUSSIAN_GUIDES


# --- the model and its exact posterior -------------------------------------------------------
class LinearGaussian:
    """``z ~ N(0, I_d)``, ``x | z ~ N(A z, sigma^2 I_n)`` with a correlated posterior."""

    def __init__(self, dim: int = 2, obs_dim: int = 3, sigma: float = 1.0, device="cpu") -> None:
        g = torch.Generator().manual_seed(1234)  # the model is fixed; --seed moves the rest
        self.dim, self.obs_dim, self.sigma = dim, obs_dim, sigma
        # A = U diag(s) V^T: s spread over [2, 0.5] (posterior variances 1/(1+s^2)), V a
        # rotation mixing every pair of axes, U any orthonormal columns.
        s = torch.logspace(math.log10(2.0), math.log10(0.5), dim) * sigma
        V = _rotation(dim, math.pi / 6)
        U, _ = torch.linalg.qr(torch.randn(obs_dim, dim, generator=g))
        self.A = (U * s) @ V.T
        precision = torch.eye(dim) + self.A.T @ self.A / sigma**2
        self.post_cov = torch.linalg.inv(precision)
        self.post_cov = 0.5 * (self.post_cov + self.post_cov.T)
        self.post_precision = precision
        self.post_scale_tril = torch.linalg.cholesky(self.post_cov)
        self.gain = self.post_cov @ self.A.T / sigma**2  # mu(x) = gain @ x
        for name in ("A", "post_cov", "post_precision", "post_scale_tril", "gain"):
            setattr(self, name, getattr(self, name).to(device))

    def __call__(self, x: torch.Tensor) -> None:
        """The Pyro model, for a batch of observations ``x`` of shape (N, n)."""
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.A.T, self.sigma).to_event(1), obs=x)

    def sample_x(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, self.dim, generator=generator)
        x = z @ self.A.T.cpu() + self.sigma * torch.randn(n, self.obs_dim, generator=generator)
        return x.to(self.A.device)

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        return dist.MultivariateNormal(x @ self.gain.T, scale_tril=self.post_scale_tril)

    def diagonal_floor(self) -> float:
        """The smallest KL(q || p(.|x)) over diagonal Gaussians q (the same for every x):
        q's variances are 1 / diag(precision), KL = (sum log diag(P) - log det P) / 2."""
        P = self.post_precision
        return float(0.5 * (P.diagonal().log().sum() - torch.logdet(P)))

    def summary(self) -> dict:
        cov = self.post_cov
        std = cov.diagonal().sqrt()
        eig = torch.linalg.eigvalsh(cov).sqrt()
        return {
            "dim": self.dim,
            "obs_dim": self.obs_dim,
            "sigma": self.sigma,
            "A": self.A.tolist(),
            "posterior_cov": cov.tolist(),
            "posterior_std": std.tolist(),
            "posterior_principal_std": eig.tolist(),
            "posterior_corr": (cov / std[:, None] / std[None, :]).tolist(),
            "diag_floor": self.diagonal_floor(),
        }


def _rotation(dim: int, angle: float) -> torch.Tensor:
    """A product of Givens rotations by ``angle`` in every plane (i, i+1)."""
    R = torch.eye(dim)
    for i in range(dim - 1):
        G = torch.eye(dim)
        c, s = math.cos(angle), math.sin(angle)
        G[i, i], G[i, i + 1], G[i + 1, i], G[i + 1, i + 1] = c, -s, s, c
        R = R @ G
    return R


# --- guides ------------------------------------------------------------------------------------
def make_encoder(obs_dim: int, out_dim: int, hidden: int = 64) -> nn.Module:
    return nn.Sequential(
        nn.Linear(obs_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, out_dim)
    )


class FlowGuide(nn.Module):
    """q(z | x): N(0, I) pushed through a ConditionalFFJORD conditioned on encoder(x)."""

    def __init__(self, dim, obs_dim, conditioning, context_dim=16, hidden_dims=(64, 64, 64), **options):
        super().__init__()
        self.dim = dim
        self.encoder = make_encoder(obs_dim, context_dim)
        self.flow = ConditionalFFJORD(
            dim, context_dim, hidden_dims=list(hidden_dims), conditioning=conditioning, **options
        )

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        context = self.encoder(x)
        base = dist.Normal(x.new_zeros(x.shape[0], self.dim), 1.0).to_event(1)
        return dist.ConditionalTransformedDistribution(base, [self.flow]).condition(context)

    def __call__(self, x: torch.Tensor) -> None:  # the Pyro guide
        pyro.module("guide", self)
        q = self.distribution(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q)

    def nfe(self) -> int:
        return self.flow.stats.nfe_forward_total


class GaussianGuide(FlowGuide):
    """q(z | x) = N(mu(x), L(x) L(x)^T) (``full``) or N(mu(x), diag(s(x))^2)."""

    def __init__(self, dim, obs_dim, full: bool = True):
        nn.Module.__init__(self)
        self.dim, self.full = dim, full
        n_scale = dim * (dim + 1) // 2 if full else dim
        self.encoder = make_encoder(obs_dim, dim + n_scale)
        self._tril = torch.tril_indices(dim, dim)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        out = self.encoder(x)
        loc, raw = out[..., : self.dim], out[..., self.dim :]
        if not self.full:
            return dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1)
        L = x.new_zeros(x.shape[0], self.dim, self.dim)
        L[:, self._tril[0], self._tril[1]] = raw
        diag = nn.functional.softplus(L.diagonal(dim1=-2, dim2=-1)) + 1e-4
        L = L.tril(-1) + torch.diag_embed(diag)
        return dist.MultivariateNormal(loc, scale_tril=L)

    def nfe(self) -> int:
        return 0


def make_guide(name: str, model: LinearGaussian, args) -> FlowGuide:
    if name in FLOW_GUIDES:
        options = {"preset": args.preset} if args.preset else {}
        return FlowGuide(
            model.dim, model.obs_dim, name, context_dim=args.context_dim,
            hidden_dims=args.hidden_dims, rank=args.rank if name == "lowrank" else 1, **options,
        )
    return GaussianGuide(model.dim, model.obs_dim, full=(name == "gaussian"))


# --- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def expected_kl(guide: FlowGuide, model: LinearGaussian, x: torch.Tensor, num_samples: int) -> dict:
    """Monte Carlo E_x KL(q(.|x) || p(.|x)) = mean of log q(z|x) - log p(z|x), z ~ q(.|x),
    with the guide in eval mode (flows: exact trace, eval solver)."""
    was_training = guide.training
    guide.eval()
    try:
        q = guide.distribution(x)
        z = q.rsample((num_samples,))  # (S, N, d)
        log_q = q.log_prob(z)  # the cached solve: no second solve
        log_p = model.posterior(x).log_prob(z)
        diff = log_q - log_p  # (S, N)
        per_x = diff.mean(0)
        kl = per_x.mean()
        # Standard error over held-out x's (the S samples of each x are averaged first).
        se = per_x.std() / math.sqrt(per_x.numel())
        ok = bool(torch.isfinite(diff).all())
    finally:
        guide.train(was_training)
    return {"kl": float(kl), "se": float(se), "finite": ok}


# --- training -------------------------------------------------------------------------------------
def train(name, model, x_train, x_eval, args, eval_at, progress=True) -> dict:
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    guide = make_guide(name, model, args).to(args.device)
    svi = SVI(model, guide, Adam({"lr": args.lr}), Trace_ELBO())
    g = torch.Generator().manual_seed(args.seed + 7)  # same minibatches for every guide
    curve, losses, train_seconds = [], [], 0.0

    def evaluate(step):
        pyro.set_rng_seed(args.seed + 99)  # the same eval noise at every evaluation
        res = expected_kl(guide, model, x_eval, args.eval_samples)
        res.update(step=step, train_seconds=train_seconds)
        curve.append(res)
        return res

    if 0 in eval_at:
        evaluate(0)
    bar = tqdm(range(1, args.steps + 1), desc=f"{name:>8}", disable=not progress, leave=False)
    pyro.set_rng_seed(args.seed + 1)
    for step in bar:
        idx = torch.randint(0, x_train.shape[0], (args.batch_size,), generator=g)
        start = time.perf_counter()
        loss = svi.step(x_train[idx.to(x_train.device)]) / args.batch_size
        train_seconds += time.perf_counter() - start
        losses.append(loss)
        if step in eval_at:
            state = torch.get_rng_state()
            res = evaluate(step)
            torch.set_rng_state(state)
            bar.set_postfix(kl=f"{res['kl']:.4f}")
    n_params = sum(p.numel() for p in guide.parameters())
    return {
        "guide": name,
        "params": n_params,
        "steps": args.steps,
        "train_seconds": train_seconds,
        "it_per_s": args.steps / train_seconds if train_seconds else None,
        "nfe_forward_per_step": guide.nfe() / max(1, args.steps) if name in FLOW_GUIDES else None,
        "final_kl": curve[-1]["kl"],
        "final_kl_se": curve[-1]["se"],
        "loss_last100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "curve": curve,
        "_guide": guide,
    }


# --- output ----------------------------------------------------------------------------------------
def plot(results, model, x_eval, path, diag_floor):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flows = [r for r in results if r["guide"] in FLOW_GUIDES]
    fig, axes = plt.subplots(1, 1 + len(flows), figsize=(4.2 * (1 + len(flows)), 3.8), dpi=90)
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    ax = axes[0]
    for r in results:
        steps = [c["step"] for c in r["curve"]]
        kls = [max(c["kl"], 1e-4) for c in r["curve"]]
        ax.plot(steps, kls, marker="o", ms=3, label=r["guide"])
    ax.axhline(diag_floor, color="gray", ls="--", lw=1, label="best diagonal")
    ax.set_yscale("log")
    ax.set_xlabel("SVI step")
    ax.set_ylabel("E_x KL(q(z|x) || p(z|x))")
    ax.set_title("held-out expected KL")
    ax.legend(fontsize=7)
    if model.dim == 2 and flows:
        xs = x_eval[:3]
        post = model.posterior(xs)
        theta = torch.linspace(0, 2 * math.pi, 200)
        circle = torch.stack([theta.cos(), theta.sin()], -1)
        for ax, r in zip(axes[1:], flows):
            guide = r["_guide"].eval()
            with torch.no_grad():
                pyro.set_rng_seed(0)
                z = guide.distribution(xs).sample((300,)).cpu()
            for i in range(xs.shape[0]):
                ax.scatter(z[:, i, 0], z[:, i, 1], s=2, alpha=0.4, color=f"C{i}")
                for k in (1, 2):
                    ell = post.loc[i].cpu() + k * circle @ model.post_scale_tril.cpu().T
                    ax.plot(ell[:, 0], ell[:, 1], color="k", lw=0.8)
            ax.set_title(f"{r['guide']}: q(z|x) samples vs truth", fontsize=9)
            ax.set_aspect("equal", "datalim")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000, help="SVI steps per guide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/amortized_vi", help="output folder (JSON, PNG)")
    p.add_argument("--quick", action="store_true", help="tiny budget for tests (seconds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--guides", nargs="+", default=list(ALL_GUIDES), choices=ALL_GUIDES)
    p.add_argument("--dim", type=int, default=2, help="latent dimension d")
    p.add_argument("--obs-dim", type=int, default=3, help="observation dimension n")
    p.add_argument("--sigma", type=float, default=1.0, help="observation noise")
    p.add_argument("--n-train", type=int, default=2048, help="training observations")
    p.add_argument("--n-eval", type=int, default=256, help="held-out observations")
    p.add_argument("--eval-samples", type=int, default=32, help="q samples per held-out x")
    p.add_argument("--evals", type=int, default=10, help="evaluations during training")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--context-dim", type=int, default=16)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--rank", type=int, default=2, help="rank for lowrank conditioning")
    p.add_argument("--preset", default="fast", help="FFJORD preset ('' for the defaults)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(args) -> dict:
    if args.quick:
        args.steps = min(args.steps, 30)
        args.n_train, args.n_eval, args.eval_samples = 256, 32, 8
        args.batch_size, args.evals = 32, 2
        args.hidden_dims = [32, 32]
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model = LinearGaussian(args.dim, args.obs_dim, args.sigma, device=args.device)
    x_train = model.sample_x(args.n_train, torch.Generator().manual_seed(args.seed))
    x_eval = model.sample_x(args.n_eval, torch.Generator().manual_seed(args.seed + 10_000))
    eval_at = sorted({0, args.steps, *(round(args.steps * k / args.evals) for k in range(1, args.evals))})
    info = model.summary()
    print(f"posterior std {[round(s, 3) for s in info['posterior_std']]}, "
          f"corr {info['posterior_corr'][0][1]:.3f}, best diagonal KL {info['diag_floor']:.4f}")
    results = []
    for name in args.guides:
        r = train(name, model, x_train, x_eval, args, eval_at, progress=not args.no_progress)
        results.append(r)
        print(f"{name:>8}: KL {r['curve'][0]['kl']:.4f} -> {r['final_kl']:.4f} +- {r['final_kl_se']:.4f} "
              f"({r['train_seconds']:.1f} s, {r['it_per_s']:.1f} it/s)")
    png = os.path.join(args.out, "amortized_vi.png")
    plot(results, model, x_eval, png, info["diag_floor"])
    payload = {
        "example": "amortized_vi",
        "machine": machine_info(args.device),
        "args": {k: v for k, v in vars(args).items()},
        "model": info,
        "eval": {"n_eval_x": args.n_eval, "samples_per_x": args.eval_samples, "eval_at": eval_at},
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
    }
    path = os.path.join(args.out, "amortized_vi.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print(f"wrote {path} and {png}")
    return payload


if __name__ == "__main__":
    main(parse_args())
