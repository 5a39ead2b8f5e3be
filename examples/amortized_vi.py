r"""Amortized variational inference with :class:`~pyro_ffjord.ConditionalFFJORD` as
:math:`q(z \mid x)`, on a model whose posterior is known exactly for every :math:`x`.

The model is linear-Gaussian, :math:`z \sim \mathcal N(0, I_d)`, :math:`x \mid z \sim
\mathcal N(A z, \sigma^2 I_n)`, so :math:`p(z \mid x) = \mathcal N(\mu(x), \Sigma)` with
:math:`\Sigma = (I + A^\top A / \sigma^2)^{-1}` and :math:`\mu(x) = \Sigma A^\top x / \sigma^2`,
non-isotropic and correlated (d = 2 by default: standard deviations 0.45 and 0.89 along axes
rotated by 30 degrees, correlation -0.54).

Every guide reads :math:`x` through the same small MLP encoder and is trained by SVI on the same
minibatches: ``concat`` / ``lowrank`` / ``bias``, a standard normal pushed through a
``ConditionalFFJORD`` conditioned on the encoder's output (the *context*) in one of the library's
three ways (:class:`FlowGuide` is the recipe for a VAE); ``gaussian``, the amortized
full-covariance Gaussian, which contains the exact posterior (the scale to compare with);
``diagonal``, the mean-field Gaussian, whose best expected KL is known in closed form
(``diag_floor`` in the JSON): a guide below it has learned the correlation.

The score is the expected KL :math:`E_{x}[\mathrm{KL}(q(\cdot \mid x) \,\|\, p(\cdot \mid x))]`
over held-out :math:`x`, the Monte Carlo mean of :math:`\log q(z \mid x) - \log p(z \mid x)`,
:math:`z \sim q(\cdot \mid x)`, with the flows in eval mode (exact trace, adaptive dopri5): an
honest density, not the training estimate, reported at several points of training and drawn in
the PNG with samples. Results and discussion: docs/amortized_and_neutra.md. Run::

    python examples/amortized_vi.py                 # all guides, about 8 minutes on one CPU thread
    python examples/amortized_vi.py --quick         # seconds, for tests (out/amortized_vi-quick)
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import DenseNN
from pyro.optim import Adam

from pyro_ffjord import ConditionalFFJORD, runs

FLOW_GUIDES = ("concat", "lowrank", "bias")
ALL_GUIDES = FLOW_GUIDES + ("gaussian", "diagonal")
FULL = dict(steps=2000, n_train=2048, n_eval=256, eval_samples=32, evals=10, batch_size=128, hidden_dims=[64] * 3)
QUICK = dict(steps=30, n_train=256, n_eval=32, eval_samples=8, evals=2, batch_size=32, hidden_dims=[32, 32])


class LinearGaussian:
    """``z ~ N(0, I_d)``, ``x | z ~ N(A z, sigma^2 I_n)``: a correlated posterior known for every x."""

    def __init__(self, dim: int = 2, obs_dim: int = 3, sigma: float = 1.0, device="cpu") -> None:
        g = torch.Generator().manual_seed(1234)  # the model is fixed; --seed moves the rest
        self.dim, self.obs_dim, self.sigma = dim, obs_dim, sigma
        # A = U diag(s) V^T: s spread over [2, 0.5] (posterior variances 1/(1+s^2)), V a product of
        # Givens rotations by 30 degrees in every plane (i, i+1), U any orthonormal columns.
        s = torch.logspace(math.log10(2.0), math.log10(0.5), dim) * sigma
        V, c, sn = torch.eye(dim), math.cos(math.pi / 6), math.sin(math.pi / 6)
        for i in range(dim - 1):
            G = torch.eye(dim)
            G[i, i], G[i, i + 1], G[i + 1, i], G[i + 1, i + 1] = c, -sn, sn, c
            V = V @ G
        U, _ = torch.linalg.qr(torch.randn(obs_dim, dim, generator=g))
        A = (U * s) @ V.T
        P = torch.eye(dim) + A.T @ A / sigma**2  # the posterior precision
        cov = torch.linalg.inv(P)
        cov = 0.5 * (cov + cov.T)
        self.A, self.post_precision, self.post_cov = A.to(device), P.to(device), cov.to(device)
        self.post_scale_tril = torch.linalg.cholesky(cov).to(device)
        self.gain = (cov @ A.T / sigma**2).to(device)  # mu(x) = gain @ x

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
        """min KL(q || p(.|x)) over diagonal Gaussians q (any x): (sum log diag(P) - log det P) / 2."""
        P = self.post_precision
        return float(0.5 * (P.diagonal().log().sum() - torch.logdet(P)))

    def summary(self) -> dict:
        cov, std = self.post_cov, self.post_cov.diagonal().sqrt()
        return {"dim": self.dim, "obs_dim": self.obs_dim, "sigma": self.sigma, "A": self.A.tolist(),
                "posterior_cov": cov.tolist(), "posterior_std": std.tolist(),
                "posterior_principal_std": torch.linalg.eigvalsh(cov).sqrt().tolist(),
                "posterior_corr": (cov / std[:, None] / std[None, :]).tolist(), "diag_floor": self.diagonal_floor()}


class FlowGuide(nn.Module):
    """q(z | x): N(0, I) pushed through a ConditionalFFJORD whose context is encoder(x). The flow
    never sees x itself; the ELBO's gradient reaches the encoder through the context."""

    def __init__(self, dim, obs_dim, conditioning, context_dim=16, hidden_dims=(64, 64, 64), **options):
        super().__init__()
        self.dim, self.encoder = dim, DenseNN(obs_dim, [64, 64], [context_dim], nonlinearity=nn.ELU())
        self.flow = ConditionalFFJORD(dim, context_dim, hidden_dims=list(hidden_dims), conditioning=conditioning,
                                      **options)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        base = dist.Normal(x.new_zeros(x.shape[0], self.dim), 1.0).to_event(1)
        return dist.ConditionalTransformedDistribution(base, [self.flow]).condition(self.encoder(x))

    def __call__(self, x: torch.Tensor) -> None:  # the Pyro guide: registers the encoder and the flow
        pyro.module("guide", self)
        q = self.distribution(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", q)  # one solve: the sample and its log q


class GaussianGuide(FlowGuide):
    """q(z | x) = N(mu(x), L(x) L(x)^T) (``full``) or N(mu(x), diag(s(x))^2)."""

    def __init__(self, dim, obs_dim, full: bool = True):
        nn.Module.__init__(self)
        self.dim, self.full, self.flow = dim, full, None
        n_out = dim + (dim * (dim + 1) // 2 if full else dim)  # the mean, then L's lower triangle or s
        self.encoder = DenseNN(obs_dim, [64, 64], [n_out], nonlinearity=nn.ELU())  # the flow guides' encoder shape
        self._tril = torch.tril_indices(dim, dim)

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        out = self.encoder(x)
        loc, raw = out[..., : self.dim], out[..., self.dim :]
        if not self.full:
            return dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1)
        L = x.new_zeros(x.shape[0], self.dim, self.dim)
        L[:, self._tril[0], self._tril[1]] = raw
        L = L.tril(-1) + torch.diag_embed(nn.functional.softplus(L.diagonal(dim1=-2, dim2=-1)) + 1e-4)
        return dist.MultivariateNormal(loc, scale_tril=L)


def make_guide(name: str, model: LinearGaussian, args) -> FlowGuide:
    if name not in FLOW_GUIDES:
        return GaussianGuide(model.dim, model.obs_dim, full=(name == "gaussian"))
    options = {"preset": args.preset} if args.preset else {}
    return FlowGuide(model.dim, model.obs_dim, name, context_dim=args.context_dim, hidden_dims=args.hidden_dims,
                     rank=args.rank if name == "lowrank" else 1, **options)


@torch.no_grad()
def expected_kl(guide: FlowGuide, model: LinearGaussian, x: torch.Tensor, num_samples: int) -> dict:
    """Monte Carlo E_x KL(q(.|x) || p(.|x)) = mean of log q(z|x) - log p(z|x), z ~ q(.|x), with the
    guide in eval mode (flows: exact trace, eval solver); the standard error is over the x's."""
    was_training = guide.training
    guide.eval()
    q = guide.distribution(x)
    z = q.rsample((num_samples,))  # (S, N, d)
    diff = q.log_prob(z) - model.posterior(x).log_prob(z)  # log q: the cached solve, no second one
    guide.train(was_training)
    per_x = diff.mean(0)  # the S samples of each x averaged first
    return {"kl": float(per_x.mean()), "se": float(per_x.std() / math.sqrt(per_x.numel())),
            "finite": bool(torch.isfinite(diff).all())}


def train(name, model, x_train, x_eval, args, eval_at) -> dict:
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    guide = make_guide(name, model, args).to(args.device)
    svi = SVI(model, guide, Adam({"lr": args.lr}), Trace_ELBO())
    g = torch.Generator().manual_seed(args.seed + 7)  # same minibatches for every guide
    curve, losses, train_seconds = [], [], 0.0

    def evaluate(step):
        pyro.set_rng_seed(args.seed + 99)  # the same eval noise at every evaluation
        curve.append(dict(expected_kl(guide, model, x_eval, args.eval_samples), step=step,
                          train_seconds=train_seconds))
        return curve[-1]

    if 0 in eval_at:
        evaluate(0)
    bar = tqdm(range(1, args.steps + 1), desc=f"{name:>8}", disable=args.no_progress, leave=False)
    pyro.set_rng_seed(args.seed + 1)
    for step in bar:
        idx = torch.randint(0, x_train.shape[0], (args.batch_size,), generator=g)
        start = time.perf_counter()
        losses.append(svi.step(x_train[idx.to(x_train.device)]) / args.batch_size)
        train_seconds += time.perf_counter() - start
        if step in eval_at:
            state = torch.get_rng_state()  # evaluating leaves the training noise as it was
            bar.set_postfix(kl=f"{evaluate(step)['kl']:.4f}")
            torch.set_rng_state(state)
    nfe = guide.flow.stats.nfe_forward_total / max(1, args.steps) if guide.flow is not None else None
    return {"guide": name, "params": sum(p.numel() for p in guide.parameters()), "steps": args.steps,
            "train_seconds": train_seconds, "it_per_s": args.steps / train_seconds if train_seconds else None,
            "nfe_forward_per_step": nfe, "final_kl": curve[-1]["kl"], "final_kl_se": curve[-1]["se"],
            "loss_last100": sum(losses[-100:]) / max(1, len(losses[-100:])), "curve": curve, "_guide": guide}


def plot(results, model, x_eval, path, diag_floor):
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    flows = [r for r in results if r["guide"] in FLOW_GUIDES]
    fig, axes = plt.subplots(1, 1 + len(flows), figsize=(4.2 * (1 + len(flows)), 3.8), dpi=90, squeeze=False)
    ax = axes[0][0]
    for r in results:
        ax.plot([c["step"] for c in r["curve"]], [max(c["kl"], 1e-4) for c in r["curve"]], marker="o", ms=3,
                label=r["guide"])
    ax.axhline(diag_floor, color="gray", ls="--", lw=1, label="best diagonal")
    ax.set(yscale="log", xlabel="SVI step", ylabel="E_x KL(q(z|x) || p(z|x))", title="held-out expected KL")
    ax.legend(fontsize=7)
    if model.dim == 2:  # q(z|x) samples of three held-out x against the true posterior's 1- and 2-sd ellipses
        xs, theta = x_eval[:3], torch.linspace(0, 2 * math.pi, 200)
        post, circle = model.posterior(xs), torch.stack([theta.cos(), theta.sin()], -1)
        for ax, r in zip(axes[0][1:], flows):
            pyro.set_rng_seed(0)
            z = r["_guide"].eval().distribution(xs).sample((300,)).cpu()  # sample(): no gradients
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
    count, rate = runs.positive_int, runs.positive_float
    p.add_argument("--steps", type=count, help="SVI steps per guide (2000; quick: 30)")
    p.add_argument("--guides", nargs="+", default=list(ALL_GUIDES), choices=ALL_GUIDES)
    p.add_argument("--dim", type=runs.int_at_least(2), default=2, help="latent dimension d (at least 2)")
    p.add_argument("--obs-dim", type=count, default=3, help="observation dimension n")
    p.add_argument("--sigma", type=rate, default=1.0, help="observation noise")
    p.add_argument("--n-train", type=count, help="training observations (2048; quick: 256)")
    p.add_argument("--n-eval", type=count, help="held-out observations (256; quick: 32)")
    p.add_argument("--eval-samples", type=count, help="q samples per held-out x (32; quick: 8)")
    p.add_argument("--evals", type=count, help="evaluations during training (10; quick: 2)")
    p.add_argument("--batch-size", type=count, help="(128; quick: 32)")
    p.add_argument("--lr", type=rate, default=3e-3)
    p.add_argument("--context-dim", type=count, default=16)
    p.add_argument("--hidden-dims", type=count, nargs="+", help="the flows' vector field (64 64 64; quick: 32 32)")
    p.add_argument("--rank", type=count, default=2, help="rank for lowrank conditioning")
    p.add_argument("--preset", default="fast", help="FFJORD preset ('' for the defaults)")
    # one thread: 2-D latents, 64-wide fields (the documented run too)
    runs.add_run_args(p, out="out/amortized_vi", threads=1, threads_note="2-D latents and 64-wide fields")
    return runs.parse(p, argv)


def main(args) -> dict:
    runs.fill_defaults(args, FULL, QUICK)
    out = runs.start(args)
    model = LinearGaussian(args.dim, args.obs_dim, args.sigma, device=args.device)
    x_train = model.sample_x(args.n_train, torch.Generator().manual_seed(args.seed))
    x_eval = model.sample_x(args.n_eval, torch.Generator().manual_seed(args.seed + 10_000))
    eval_at = sorted({0, args.steps, *(round(args.steps * k / args.evals) for k in range(1, args.evals))})
    info = model.summary()
    print(f"posterior std {[round(s, 3) for s in info['posterior_std']]}, "
          f"corr {info['posterior_corr'][0][1]:.3f}, best diagonal KL {info['diag_floor']:.4f}")
    results = []
    for name in args.guides:
        r = train(name, model, x_train, x_eval, args, eval_at)
        results.append(r)
        print(f"{name:>8}: KL {r['curve'][0]['kl']:.4f} -> {r['final_kl']:.4f} +- {r['final_kl_se']:.4f} "
              f"({r['train_seconds']:.1f} s, {r['it_per_s']:.1f} it/s)")
    plot(results, model, x_eval, out / "amortized_vi.png", info["diag_floor"])
    return runs.write_results(args, "amortized_vi", {
        "model": info,
        "eval": {"n_eval_x": args.n_eval, "samples_per_x": args.eval_samples, "eval_at": eval_at},
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
    })


if __name__ == "__main__":
    runs.cli(main, parse_args)
