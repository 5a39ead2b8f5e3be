"""Model, checks and picture of ``examples/neutra.py``: Neal's funnel (counting its evaluations),
the guide's own quality, the checks of NeuTra's potential (determinism, log-det gap, cost per
gradient), the summary of a chain (ESS per second, marginals) and the picture."""

from __future__ import annotations

import copy
import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

V_SCALE = 3.0


class Funnel:
    """Neal's funnel in ``dim`` dimensions, counting its evaluations."""

    def __init__(self, dim: int) -> None:
        self.dim, self.calls = dim, 0

    def __call__(self) -> None:
        self.calls += 1
        v = pyro.sample("v", dist.Normal(0.0, V_SCALE))
        scale = (v / 2).exp()[..., None]
        pyro.sample("x", dist.Normal(scale.new_zeros(self.dim - 1), scale).to_event(1))


def marginals(v: torch.Tensor, x1: torch.Tensor) -> dict:
    return {"v_mean": float(v.mean()), "v_std": float(v.std()), "x1_mean": float(x1.mean()),
            "x1_std": float(x1.std()), "v_q05": float(v.quantile(0.05)), "v_q95": float(v.quantile(0.95))}


@torch.no_grad()
def guide_quality(guide, model: Funnel, n: int):
    """ELBO (eval mode: exact trace) and the guide's own marginals of v and x_1; its samples."""
    guide.eval()
    loss = Trace_ELBO(num_particles=n, vectorize_particles=True).loss(model, guide)
    samples = guide.get_posterior().sample((n,))  # (n, dim): [v, x_1..]
    return {"elbo": -loss, **marginals(samples[:, 0], samples[:, 1])}, samples


def check_neutra(guide, neutra_model, dim: int, n_points: int, n_timing: int) -> dict:
    """Determinism of NUTS's potential and of its gradient, the log-det gap, time per gradient."""
    name = next(n for n in poutine.trace(neutra_model).get_trace().nodes if n.endswith("_shared_latent"))

    def potential(w):
        return -poutine.trace(poutine.condition(neutra_model, {name: w})).get_trace().log_prob_sum()

    points = torch.randn(n_points, dim, generator=torch.Generator().manual_seed(4321))
    max_diff = max_grad_diff = 0.0
    for w in points:
        w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
        u1, u2 = potential(w1), potential(w2)
        (g1,), (g2,) = torch.autograd.grad(u1, w1), torch.autograd.grad(u2, w2)
        max_diff = max(max_diff, float((u1 - u2).detach().abs()))
        max_grad_diff = max(max_grad_diff, float((g1 - g2).abs().max()))
    # The solver's log-det vs slogdet of the Jacobian of the computed map (float64).
    transform = copy.deepcopy(guide.get_transform()).double()
    gaps = []
    for w in points.double():
        with torch.no_grad():
            ladj = transform.log_abs_det_jacobian(w, transform(w))
        J = torch.autograd.functional.jacobian(lambda u: transform(u), w)
        gaps.append(float((ladj - torch.linalg.slogdet(J)[1]).abs()))
    start = time.perf_counter()
    for w in points[:1].repeat(n_timing, 1):
        w = w.clone().requires_grad_()
        torch.autograd.grad(potential(w), w)
    return {"potential_max_abs_diff": max_diff, "grad_max_abs_diff": max_grad_diff,
            "deterministic": max_diff == 0.0 and max_grad_diff == 0.0,
            "logdet_gap_max": max(gaps), "logdet_gap_mean": sum(gaps) / len(gaps),
            "ms_per_gradient": 1000 * (time.perf_counter() - start) / n_timing}


def summarize(label: str, v: torch.Tensor, x1: torch.Tensor, run: dict, extra_seconds=0.0) -> dict:
    """ESS of v and x_1 (one chain) per second of sampling and in all, and marginal statistics."""
    ess_v, ess_x = (float(effective_sample_size(t[None, :, None])[0]) for t in (v, x1))
    total, sampling = run["total_seconds"] + extra_seconds, run["sample_seconds"]
    return {"method": label, "num_samples": int(v.numel()), "ess_v": ess_v, "ess_x1": ess_x,
            "split_rhat_v": float(split_gelman_rubin(v[None, :, None])[0]),
            "sample_seconds": sampling, "total_seconds": total,
            "ess_v_per_s": ess_v / sampling, "ess_x1_per_s": ess_x / sampling,
            "ess_v_per_total_s": ess_v / total, "ess_x1_per_total_s": ess_x / total,
            **{k: run[k] for k in ("divergences", "acceptance", "step_size", "potential_evals")},
            **marginals(v, x1), "finite": bool(torch.isfinite(v).all() and torch.isfinite(x1).all())}


def plot(panels, path: str, title: str) -> None:
    """Each panel's samples of (x_1, v) over the exact marginal density."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    vv, xx = torch.meshgrid(torch.linspace(-10, 10, 200), torch.linspace(-30, 30, 200), indexing="ij")
    logp = dist.Normal(0.0, V_SCALE).log_prob(vv) + dist.Normal(0.0, (vv / 2).exp()).log_prob(xx)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=90, sharey=True)
    for ax, (name, v, x1) in zip(axes, panels):
        ax.contour(xx, vv, logp, levels=torch.linspace(-12, -2, 6).tolist(), colors="gray", linewidths=0.6)
        ax.scatter(x1, v, s=2, alpha=0.4)
        ax.set(xlim=(-30, 30), ylim=(-10, 10), xlabel="x_1")
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel("v")
    fig.suptitle(title, fontsize=9)  # "resumed" and each segment's seconds for a resumed run
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
