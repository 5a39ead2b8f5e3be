"""The posteriors of ``svi_guide.py`` and how guides are scored against them.

``funnel`` and ``banana`` are normalized densities written as models with no observations
(their exact samples are the truth); ``logistic`` is Bayesian logistic regression on
scikit-learn's breast-cancer data, whose truth is a seeded NUTS run (:func:`run_nuts`).
:func:`quantile_errors` scores samples against such a reference, :func:`sample_and_log_q`,
:func:`log_q` and :func:`mean_se` give the Monte Carlo ELBO and KLs with which :func:`evaluate`
scores a trained guide (:func:`report`: its line), :func:`plot` draws each guide's samples over
the true density.
"""

from __future__ import annotations

import math
import time

import torch

import pyro
import pyro.distributions as dist
from pyro.distributions import constraints
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal

TARGETS = ("funnel", "banana", "logistic")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
class FunnelDistribution(dist.TorchDistribution):
    """Neal's funnel over ``z = (v, x_1, ..., x_{dim-1})`` as one vector-valued distribution."""

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, dim: int = 10, v_scale: float = 3.0, validate_args=None) -> None:
        self.dim, self.v_scale = dim, v_scale
        super().__init__(torch.Size(), torch.Size([dim]), validate_args=False)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        v = torch.randn(shape[:-1]) * self.v_scale
        x = torch.randn(shape[:-1] + (self.dim - 1,)) * (v / 2).exp().unsqueeze(-1)
        return torch.cat([v.unsqueeze(-1), x], -1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        v, x = z[..., 0], z[..., 1:]
        lp_v = dist.Normal(0.0, self.v_scale).log_prob(v)
        return lp_v + dist.Normal(0.0, (v / 2).exp().unsqueeze(-1)).log_prob(x).sum(-1)


class BananaDistribution(dist.TorchDistribution):
    """``x1 ~ N(0, s^2)``, ``x2 | x1 ~ N(b (x1^2 - s^2), 1)``: a normalized banana."""

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, scale: float = 2.0, bend: float = 0.5, validate_args=None) -> None:
        self.scale, self.bend = scale, bend
        super().__init__(torch.Size(), torch.Size([2]), validate_args=False)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        x1 = torch.randn(shape[:-1]) * self.scale
        x2 = torch.randn(shape[:-1]) + self.bend * (x1**2 - self.scale**2)
        return torch.stack([x1, x2], -1)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        x1, x2 = z[..., 0], z[..., 1]
        lp1 = dist.Normal(0.0, self.scale).log_prob(x1)
        return lp1 + dist.Normal(self.bend * (x1**2 - self.scale**2), 1.0).log_prob(x2)


class DensityModel:
    """A model with no observations whose one latent site ``z`` has a known density."""

    site = "z"

    def __init__(self, name: str, truth: dist.TorchDistribution) -> None:
        self.name, self.truth = name, truth
        self.dim = truth.event_shape[0]
        self.normalized = True

    def __call__(self) -> None:
        pyro.sample(self.site, self.truth)

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        return self.truth.log_prob(z)


class LogisticRegression:
    """Bayesian logistic regression, one vector site ``w`` (30 weights and a bias)."""

    site = "w"

    def __init__(self, prior_scale: float = 1.0) -> None:
        from sklearn.datasets import load_breast_cancer

        data = load_breast_cancer()
        X = torch.tensor(data.data, dtype=torch.get_default_dtype())
        X = (X - X.mean(0)) / X.std(0)
        self.X, self.y = X, torch.tensor(data.target, dtype=X.dtype)
        self.name, self.dim, self.normalized, self.truth = "logistic", X.shape[1] + 1, False, None
        self.prior_scale = prior_scale
        self.feature_names = list(data.feature_names) + ["bias"]

    def prior(self) -> dist.TorchDistribution:
        return dist.Normal(self.X.new_zeros(self.dim), self.prior_scale).to_event(1)

    def __call__(self) -> None:
        w = pyro.sample(self.site, self.prior())
        with pyro.plate("data", len(self.y)):
            # w's batch dimensions end with the data plate's (size 1 there): broadcast the
            # features against them, not a matmul (which would append a new data dimension
            # and, under vectorized particles, silently pair every particle with every other).
            logits = (w[..., :-1] * self.X).sum(-1) + w[..., -1]
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=self.y)

    def log_joint(self, w: torch.Tensor) -> torch.Tensor:
        """log p(w, y) for a batch of weight vectors of shape (n, 31)."""
        logits = w[..., :-1] @ self.X.T + w[..., -1:]
        ll = dist.Bernoulli(logits=logits).log_prob(self.y).sum(-1)
        return self.prior().log_prob(w) + ll


def make_target(name: str):
    if name == "funnel":
        return DensityModel("funnel", FunnelDistribution(10))
    if name == "banana":
        return DensityModel("banana", BananaDistribution())
    if name == "logistic":
        return LogisticRegression()
    raise ValueError(f"unknown target {name!r}; choose one of {TARGETS}")


def quantile_errors(z: torch.Tensor, ref: torch.Tensor) -> dict:
    """Marginal quantile errors in units of the reference's marginal standard deviation."""
    q = torch.tensor(QUANTILES, dtype=z.dtype)
    sd = ref.std(0)
    err = ((z.quantile(q, dim=0) - ref.quantile(q, dim=0)).abs() / sd)
    return {
        "quantile_err_mean": float(err.mean()),
        "quantile_err_max": float(err.max()),
        "mean_err_mean": float(((z.mean(0) - ref.mean(0)).abs() / sd).mean()),
        "sd_ratio_mean": float((z.std(0) / sd).mean()),
        "sd_ratio_min": float((z.std(0) / sd).min()),
    }


def sample_and_log_q(q, n: int, chunk: int = 1000):
    """``n`` samples of ``q`` and their log densities, in chunks."""
    zs, lqs = [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if hasattr(q, "rsample_and_log_prob"):  # zuko: one pass
            z, lq = q.rsample_and_log_prob((m,))
        else:  # FFJORD: log_prob reuses the cached solve that produced z
            z = q.rsample((m,))
            lq = q.log_prob(z)
        zs.append(z)
        lqs.append(lq)
    return torch.cat(zs), torch.cat(lqs)


def log_q(q, z: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """``q.log_prob`` of given points (for FFJORD: reverse solves), in chunks."""
    return torch.cat([q.log_prob(z[i:i + chunk]) for i in range(0, len(z), chunk)])


def mean_se(x: torch.Tensor):
    """Mean and standard error of the finite entries."""
    x = x[torch.isfinite(x)]
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


def run_nuts(model, args) -> dict:
    """The reference posterior of a target without exact samples: one seeded NUTS chain."""
    pyro.set_rng_seed(args.seed)
    kernel = NUTS(model, max_tree_depth=args.nuts_tree_depth)
    mcmc = MCMC(kernel, num_samples=args.nuts_samples, warmup_steps=args.nuts_warmup,
                disable_progbar=args.no_progress)
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    w = mcmc.get_samples()[model.site].detach()
    half = len(w) // 2
    floor = quantile_errors(w[:half], w[half:])
    print(f"{model.name}: NUTS {len(w)} samples after {args.nuts_warmup} warmup in {seconds:.1f} s; half-vs-half "
          f"quantile error {floor['quantile_err_mean']:.3f} sd (Monte Carlo floor)")
    return {"samples": w, "seconds": seconds, "num_samples": len(w), "warmup": args.nuts_warmup,
            "floor_quantile_err_mean": floor["quantile_err_mean"],
            "floor_quantile_err_max": floor["quantile_err_max"]}


def posterior_distribution(guide, model) -> torch.distributions.Distribution:
    """q over the model's latent vector (identity unconstraining: the site is real_vector)."""
    if isinstance(guide, AutoNormal):
        return dist.Normal(*guide._get_loc_and_scale(model.site)).to_event(1)
    return guide.get_posterior()


@torch.no_grad()
def evaluate(fitted: dict, model, args, truth_samples, nuts_samples) -> dict:
    """The row of a trained guide (``fitted``: its ``row``, ``guide``, FFJORD ``flows``): ELBO, KLs
    or quantile errors, in eval mode; and its samples for the picture."""
    guide, row, flows = fitted["guide"], fitted["row"], fitted["flows"]
    guide.eval()  # FFJORD: exact trace, eval solver
    q = posterior_distribution(guide, model)
    pyro.set_rng_seed(args.seed + 1)
    start = time.perf_counter()
    z, lq = sample_and_log_q(q, args.eval_particles)
    row["eval_sample_seconds"] = time.perf_counter() - start
    if flows:
        row["eval_nfe_sample"] = sum(f.nfe_forward for f in flows)
    lw = model.log_joint(z) - lq
    row["elbo"], row["elbo_se"] = mean_se(lw)
    row["nonfinite_log_weights"] = int((~torch.isfinite(lw)).sum())
    if model.normalized:
        row["kl_q_p"], row["kl_q_p_se"] = -row["elbo"], row["elbo_se"]
        start = time.perf_counter()
        lq_truth = log_q(q, truth_samples)
        row["eval_reverse_seconds"] = time.perf_counter() - start
        if flows:
            row["eval_nfe_reverse"] = sum(f.nfe_forward for f in flows)
        row["kl_p_q"], row["kl_p_q_se"] = mean_se(model.log_joint(truth_samples) - lq_truth)
    if nuts_samples is not None:
        row.update(quantile_errors(z, nuts_samples))
    # The map the guide was trained with, when it is deterministic (exact trace, fixed steps).
    if flows and all(f.config.trace == "exact" and (f.config.steps or f.config.step_size) for f in flows):
        guide.train()
        pyro.set_rng_seed(args.seed + 1)
        z_t, lq_t = sample_and_log_q(posterior_distribution(guide, model), args.eval_particles)
        row["elbo_train_solver"] = mean_se(model.log_joint(z_t) - lq_t)[0]
    return {"samples": z[: args.plot_samples].clone(), "row": row}


def report(target: str, row: dict) -> str:
    parts = ["{target}: {guide:<34} {ms_per_step:7.1f} ms/step  ELBO {elbo:9.3f} ± {elbo_se:.3f}"]
    parts += [fmt for key, fmt in (
        ("kl_p_q", "KL(p||q) {kl_p_q:8.3f} ± {kl_p_q_se:.3f}"),
        ("quantile_err_mean", "q-err {quantile_err_mean:.3f} (max {quantile_err_max:.3f})  "
                              "sd ratio {sd_ratio_mean:.2f}"),
        ("elbo_train_solver", "[ELBO train solver {elbo_train_solver:.3f}]")) if key in row]
    return "  ".join(parts).format(target=target, **row)


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------
def plot(target: str, model, panels, path: str, nuts=None, title: str = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), dpi=72,
                             squeeze=False, sharex=True, sharey=True)
    if target == "funnel":
        i, j, xlim, ylim, labels = 0, 1, (-10, 10), (-25, 25), ("v", "x_1")
        gx, gy = torch.meshgrid(torch.linspace(*xlim, 200), torch.linspace(*ylim, 200),
                                indexing="ij")
        density = (dist.Normal(0.0, 3.0).log_prob(gx)
                   + dist.Normal(0.0, (gx / 2).exp()).log_prob(gy))
        levels = torch.linspace(-14, -2, 7).tolist()
    elif target == "banana":
        i, j, xlim, ylim, labels = 0, 1, (-7, 7), (-5, 20), ("x_1", "x_2")
        gx, gy = torch.meshgrid(torch.linspace(*xlim, 200), torch.linspace(*ylim, 200),
                                indexing="ij")
        density = model.truth.log_prob(torch.stack([gx, gy], -1))
        levels = torch.linspace(-12, -2, 6).tolist()
    else:
        corr = torch.corrcoef(nuts.T)
        corr.fill_diagonal_(0)
        k = int(corr.abs().argmax())
        i, j = k // corr.shape[0], k % corr.shape[0]
        names = model.feature_names
        labels = (f"w[{i}] {names[i][:18]}", f"w[{j}] {names[j][:18]}")
        lo, hi = nuts.min(0).values, nuts.max(0).values
        pad = 0.5 * (hi - lo)
        xlim = (float(lo[i] - pad[i]), float(hi[i] + pad[i]))
        ylim = (float(lo[j] - pad[j]), float(hi[j] + pad[j]))
        from scipy.stats import gaussian_kde

        gx, gy = torch.meshgrid(torch.linspace(*xlim, 120), torch.linspace(*ylim, 120),
                                indexing="ij")
        kde = gaussian_kde(nuts[:, [i, j]].T.double().numpy())
        dens = kde(torch.stack([gx.reshape(-1), gy.reshape(-1)]).double().numpy())
        density = torch.tensor(dens).reshape(gx.shape).clamp_min(1e-300).log()
        top = float(density.max())
        levels = [top - 8, top - 4.5, top - 2, top - 0.5]
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (name, z) in zip(axes.flat, panels):
        ax.contour(gx, gy, density, levels=levels, colors="gray", linewidths=0.6)
        ax.scatter(z[:, i], z[:, j], s=2, alpha=0.35, rasterized=True)
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_title(name, fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel(labels[0], fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(labels[1], fontsize=8)
    if title:  # the training time, "resumed" and each segment's for a resumed run
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


