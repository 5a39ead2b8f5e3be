r"""NeuTra HMC (Hoffman et al., 2019) with an FFJORD guide on Neal's funnel.

The target is the 10-D funnel (``--dim 10``: one scale variable and nine coordinates)

.. math::

    v \sim \mathcal N(0, 3^2), \qquad x_i \mid v \sim \mathcal N(0, e^{v}), \quad i = 1..9,

(standard deviation :math:`e^{v/2}`), whose neck (:math:`v \ll 0`) defeats plain NUTS: one step
size cannot suit both the neck and the mouth. NeuTra first fits a guide :math:`q = T_\# \mathcal
N(0, I)` by SVI, then runs NUTS on :math:`w` with the potential

.. math::

    U(w) = -\log p(T(w)) - \log\left|\det \frac{\partial T}{\partial w}\right|,

where the flow has made the geometry nearly isotropic, and maps the samples back with
:math:`T`. Here :math:`T` is one :class:`~pyro_ffjord.FFJORD` flow via
:class:`~pyro_ffjord.AutoFFJORD` (``preset="fast"``: exact trace, backprop through three rk4
steps).

HMC needs a *deterministic* potential. ``guide.eval()`` puts the flow in eval mode: the
log-det is the exact trace (no Hutchinson noise), and the solve uses ``eval_solver``. This
example sets ``eval_solver="rk4"`` (``--hmc-solver``) with the training step size, so HMC uses
exactly the map that was trained, each gradient is a fixed cost (3 rk4 steps = 12 evaluations)
and the potential is a smooth function of :math:`w`; an adaptive solver (``--hmc-solver
dopri5``) is deterministic too but costs more per gradient and its step-size decisions make
the potential only piecewise smooth. The script checks that the potential and its gradient
are bitwise repeatable, and measures how far the solver's integrated log-det is from the
log-determinant of the Jacobian of the map actually computed (autograd, ``slogdet``): that
gap is the only bias NeuTra adds.

Plain NUTS and NeuTra NUTS draw the same number of samples after the same warmup. Reported:
effective sample size (``pyro.ops.stats.effective_sample_size``, one chain) of :math:`v` and
:math:`x_1`, per second of sampling and per second of everything (NeuTra: guide training +
warmup + sampling), divergences, potential evaluations, and the marginals of :math:`v`
(truth: mean 0, std 3) and :math:`x_1` (mean 0, std :math:`e^{9/4} \approx 9.49`).

Run::

    python examples/neutra.py            # about 10 minutes on one CPU thread
    python examples/neutra.py --quick    # seconds, for tests
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import torch
from tqdm.auto import tqdm

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from pyro_ffjord import AutoFFJORD

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_info import machine_info  # noqa: E402

V_SCALE = 3.0


class Funnel:
    """Neal's funnel in ``dim`` dimensions, counting its evaluations."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        v = pyro.sample("v", dist.Normal(0.0, V_SCALE))
        scale = (v / 2).exp()[..., None]
        pyro.sample("x", dist.Normal(scale.new_zeros(self.dim - 1), scale).to_event(1))

    def log_density(self, v: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        """The exact marginal density of (v, x_1)."""
        return dist.Normal(0.0, V_SCALE).log_prob(v) + dist.Normal(0.0, (v / 2).exp()).log_prob(x1)


def train_guide(model: Funnel, args) -> dict:
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    options = {"preset": "fast", "eval_solver": args.hmc_solver, "T": args.end_time,
               "activation": args.activation}
    if args.step_size:
        options["step_size"] = args.step_size
    guide = AutoFFJORD(model, hidden_dims=args.hidden_dims, **options)
    elbo = Trace_ELBO(num_particles=args.particles, vectorize_particles=True)
    lrd = args.lr_decay ** (1.0 / max(1, args.guide_steps))  # lr * lr_decay at the end
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": args.lr, "lrd": lrd}), elbo)
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(args.guide_steps), desc="guide", disable=args.no_progress, leave=False)
    for step in bar:
        losses.append(svi.step())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.3f}")
    seconds = time.perf_counter() - start
    return {"guide": guide, "seconds": seconds, "losses": losses}


@torch.no_grad()
def guide_quality(guide, model: Funnel, n: int) -> dict:
    """ELBO (eval mode: exact trace) and the guide's own marginals of v and x_1."""
    guide.eval()
    elbo = Trace_ELBO(num_particles=n, vectorize_particles=True)
    loss = elbo.loss(model, guide)
    samples = guide.get_posterior().sample((n,))  # (n, dim): [v, x_1..]
    v, x1 = samples[:, 0], samples[:, 1]
    return {"elbo": -loss, "v_mean": float(v.mean()), "v_std": float(v.std()),
            "x1_mean": float(x1.mean()), "x1_std": float(x1.std()),
            "v_q05": float(v.quantile(0.05)), "v_q95": float(v.quantile(0.95)),
            "samples": samples}


def neutra_potential(neutra_model):
    """The potential energy NUTS sees in the warped space, as a function of w."""
    trace = poutine.trace(neutra_model).get_trace()
    name = next(n for n in trace.nodes if n.endswith("_shared_latent"))

    def potential(w):
        tr = poutine.trace(poutine.condition(neutra_model, {name: w})).get_trace()
        return -tr.log_prob_sum()

    return potential, name


def check_neutra(guide, neutra_model, dim: int, n_points: int, n_timing: int) -> dict:
    """Determinism of the potential and its gradient, the log-det gap, time per gradient."""
    potential, _ = neutra_potential(neutra_model)
    g = torch.Generator().manual_seed(4321)
    points = torch.randn(n_points, dim, generator=g)
    max_diff = max_grad_diff = 0.0
    for w in points:
        w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
        u1, u2 = potential(w1), potential(w2)
        g1, = torch.autograd.grad(u1, w1)
        g2, = torch.autograd.grad(u2, w2)
        max_diff = max(max_diff, float((u1 - u2).detach().abs()))
        max_grad_diff = max(max_grad_diff, float((g1 - g2).abs().max()))
    # The solver's log-det vs slogdet of the Jacobian of the computed map (float64).
    transform = copy.deepcopy(guide.get_transform()).double()
    gaps = []
    for w in points.double():
        with torch.no_grad():
            y = transform(w)
            ladj = transform.log_abs_det_jacobian(w, y)
        J = torch.autograd.functional.jacobian(lambda u: transform(u), w)
        gaps.append(float((ladj - torch.linalg.slogdet(J)[1]).abs()))
    start = time.perf_counter()
    for w in points[:1].repeat(n_timing, 1):
        w = w.clone().requires_grad_()
        torch.autograd.grad(potential(w), w)
    per_grad = (time.perf_counter() - start) / n_timing
    return {
        "potential_max_abs_diff": max_diff,
        "grad_max_abs_diff": max_grad_diff,
        "deterministic": max_diff == 0.0 and max_grad_diff == 0.0,
        "logdet_gap_max": max(gaps),
        "logdet_gap_mean": sum(gaps) / len(gaps),
        "ms_per_gradient": 1000 * per_grad,
    }


def run_nuts(model, args, label: str) -> dict:
    """NUTS with a timer that splits warmup from sampling."""
    pyro.set_rng_seed(args.seed + 1)
    marks = {}

    def hook(kernel, params, stage, i):
        if stage == "Sample" and "sample_start" not in marks:
            # Called after the first sampling iteration: back-date by nothing; the first
            # sample's cost is counted as warmup (negligible against hundreds).
            marks["sample_start"] = time.perf_counter()

    kernel = NUTS(model, max_tree_depth=args.max_tree_depth, target_accept_prob=args.target_accept)
    mcmc = MCMC(kernel, num_samples=args.num_samples, warmup_steps=args.warmup,
                hook_fn=hook, disable_progbar=args.no_progress)
    start = time.perf_counter()
    mcmc.run()
    end = time.perf_counter()
    diag = mcmc.diagnostics()
    divergences = len(diag.get("divergences", {}).get("chain 0", []))
    return {
        "label": label,
        "mcmc": mcmc,
        "total_seconds": end - start,
        "sample_seconds": end - marks.get("sample_start", start),
        "divergences": divergences,
        "step_size": float(kernel.step_size),
        "acceptance": float(diag.get("acceptance rate", {}).get("chain 0", float("nan"))),
    }


def summarize(label: str, v: torch.Tensor, x1: torch.Tensor, run: dict, extra_seconds=0.0) -> dict:
    """ESS of v and x_1 (one chain) and marginal statistics."""
    ess_v = float(effective_sample_size(v[None, :, None])[0])
    ess_x = float(effective_sample_size(x1[None, :, None])[0])
    rhat_v = float(split_gelman_rubin(v[None, :, None])[0])
    total = run["total_seconds"] + extra_seconds
    return {
        "method": label,
        "num_samples": int(v.numel()),
        "ess_v": ess_v,
        "ess_x1": ess_x,
        "split_rhat_v": rhat_v,
        "sample_seconds": run["sample_seconds"],
        "total_seconds": total,
        "ess_v_per_s": ess_v / run["sample_seconds"],
        "ess_x1_per_s": ess_x / run["sample_seconds"],
        "ess_v_per_total_s": ess_v / total,
        "ess_x1_per_total_s": ess_x / total,
        "divergences": run["divergences"],
        "acceptance": run["acceptance"],
        "step_size": run["step_size"],
        "v_mean": float(v.mean()),
        "v_std": float(v.std()),
        "v_q05": float(v.quantile(0.05)),
        "v_q95": float(v.quantile(0.95)),
        "x1_mean": float(x1.mean()),
        "x1_std": float(x1.std()),
    }


def plot(model: Funnel, panels, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vv, xx = torch.meshgrid(torch.linspace(-10, 10, 200), torch.linspace(-30, 30, 200), indexing="ij")
    logp = model.log_density(vv, xx)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=90, sharey=True)
    for ax, (title, v, x1) in zip(axes, panels):
        ax.contour(xx, vv, logp, levels=torch.linspace(-12, -2, 6).tolist(), colors="gray",
                   linewidths=0.6)
        ax.scatter(x1, v, s=2, alpha=0.4)
        ax.set_xlim(-30, 30)
        ax.set_ylim(-10, 10)
        ax.set_xlabel("x_1")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("v")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", "--guide-steps", dest="guide_steps", type=int, default=3000,
                   help="SVI steps for the FFJORD guide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="only 'cpu' is supported (MCMC is sequential)")
    p.add_argument("--out", default="out/neutra", help="output folder (JSON, PNG)")
    p.add_argument("--quick", action="store_true", help="tiny budget for tests (seconds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--dim", type=int, default=10, help="funnel dimension (v plus dim-1 x's)")
    p.add_argument("--particles", type=int, default=32, help="ELBO particles (vectorized)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-decay", type=float, default=0.1, help="lr factor reached at the end")
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[128, 128])
    p.add_argument("--activation", default="swish", help="vector field activation")
    p.add_argument("--end-time", type=float, default=1.0, help="the flow's end time T")
    p.add_argument("--hmc-solver", default="rk4", choices=["rk4", "dopri5"],
                   help="the flow's eval_solver, used inside HMC")
    p.add_argument("--step-size", type=float, default=None,
                   help="rk4 step in units of t (default: the fast preset's T/3)")
    p.add_argument("--num-samples", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--max-tree-depth", type=int, default=10)
    p.add_argument("--target-accept", type=float, default=0.8)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(args) -> dict:
    if args.device != "cpu":
        raise ValueError("this example runs on the CPU (NUTS is sequential and the solves are tiny)")
    if args.quick:
        args.guide_steps = min(args.guide_steps, 40)
        args.num_samples, args.warmup = min(args.num_samples, 30), min(args.warmup, 30)
        args.max_tree_depth = min(args.max_tree_depth, 5)
        args.hidden_dims = [32, 32]
        args.particles = 8
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model = Funnel(args.dim)

    # 1. The guide.
    trained = train_guide(model, args)
    guide = trained["guide"]
    quality = guide_quality(guide, model, 4000 if not args.quick else 200)
    q_samples = quality.pop("samples")
    print(f"guide: {args.guide_steps} steps in {trained['seconds']:.1f} s, ELBO {quality['elbo']:.3f} "
          f"(log Z = 0), q's v: mean {quality['v_mean']:.2f} std {quality['v_std']:.2f}")

    # 2. NeuTra: deterministic potential, log-det gap, cost per gradient.
    guide.eval()
    guide.requires_grad_(False)
    neutra = NeuTraReparam(guide)
    neutra_model = neutra.reparam(model)
    checks = check_neutra(guide, neutra_model, args.dim, n_points=4 if args.quick else 8,
                          n_timing=5 if args.quick else 50)
    print(f"NeuTra potential deterministic: {checks['deterministic']}; log-det gap "
          f"{checks['logdet_gap_max']:.2e}; {checks['ms_per_gradient']:.1f} ms per gradient")

    # 3. NUTS with and without NeuTra, same samples and warmup.
    flow = guide.transform  # ComposeTransformModule of FFJORD parts
    flows = [m for m in flow.modules() if hasattr(m, "stats") and hasattr(m, "config")]
    solves0 = sum(f.stats.solves for f in flows)
    calls0 = model.calls
    run_neutra = run_nuts(neutra_model, args, "NeuTra NUTS (FFJORD)")
    neutra_calls = model.calls - calls0
    neutra_solves = sum(f.stats.solves for f in flows) - solves0
    w = run_neutra["mcmc"].get_samples()
    name = next(iter(w))
    with torch.no_grad():
        z = neutra.transform_sample(w[name])
    v_n, x1_n = z["v"].reshape(-1), z["x"][..., 0].reshape(-1)

    calls0 = model.calls
    run_plain = run_nuts(model, args, "NUTS")
    plain_calls = model.calls - calls0
    s = run_plain["mcmc"].get_samples()
    v_p, x1_p = s["v"].reshape(-1), s["x"][..., 0].reshape(-1)

    rows = [
        summarize("NUTS", v_p, x1_p, run_plain),
        summarize("NeuTra NUTS (FFJORD)", v_n, x1_n, run_neutra, extra_seconds=trained["seconds"]),
    ]
    rows[0]["potential_evals"] = plain_calls
    rows[1]["potential_evals"] = neutra_calls
    rows[1]["ffjord_solves"] = neutra_solves
    rows[1]["guide_seconds"] = trained["seconds"]
    for r in rows:
        r["finite"] = True
    rows[0]["finite"] = bool(torch.isfinite(v_p).all() and torch.isfinite(x1_p).all())
    rows[1]["finite"] = bool(torch.isfinite(v_n).all() and torch.isfinite(x1_n).all())
    for r in rows:
        print(f"{r['method']:>22}: ESS v {r['ess_v']:7.1f}  x1 {r['ess_x1']:7.1f} | ESS/s (sampling) "
              f"v {r['ess_v_per_s']:6.2f} x1 {r['ess_x1_per_s']:6.2f} | {r['sample_seconds']:6.1f} s "
              f"| div {r['divergences']} | v mean {r['v_mean']:+.2f} std {r['v_std']:.2f}")

    png = os.path.join(args.out, "neutra.png")
    plot(model, [
        (f"plain NUTS ({len(v_p)} samples)", v_p, x1_p),
        (f"NeuTra NUTS, FFJORD ({len(v_n)} samples)", v_n, x1_n),
        ("FFJORD guide q alone", q_samples[: len(v_n), 0], q_samples[: len(v_n), 1]),
    ], png)
    payload = {
        "example": "neutra",
        "machine": machine_info(args.device),
        "args": vars(args),
        "target": {"name": "Neal's funnel", "dim": args.dim, "v_std": V_SCALE,
                   "x1_std": math.exp(V_SCALE**2 / 4)},
        "guide": {"steps": args.guide_steps, "seconds": trained["seconds"],
                  "loss_last100": sum(trained["losses"][-100:]) / len(trained["losses"][-100:]),
                  **quality},
        "checks": checks,
        "results": rows,
    }
    path = os.path.join(args.out, "neutra.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print(f"wrote {path} and {png}")
    return payload


if __name__ == "__main__":
    main(parse_args())
