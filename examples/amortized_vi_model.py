"""Model, guides and score of ``examples/amortized_vi.py``: the linear-Gaussian model whose
posterior is known for every x, the amortized guides (a ``ConditionalFFJORD`` conditioned on an
encoder's output, and two Gaussians), the held-out expected KL and the picture."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import DenseNN
from torch import nn

from pyro_ffjord import ConditionalFFJORD

FLOW_GUIDES = ("concat", "lowrank", "bias")
ALL_GUIDES = FLOW_GUIDES + ("gaussian", "diagonal")


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


def plot(results: list, model: LinearGaussian, x_eval: torch.Tensor, path, diag_floor: float, title: str) -> None:
    """The expected-KL curves and, for d = 2, each flow guide's q(z|x) samples against the truth."""
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
    fig.suptitle(title, fontsize=10)  # says "resumed" (and each segment's seconds) for a resumed run
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
