r"""NeuTra HMC (Hoffman et al., 2019) with an FFJORD guide on Neal's funnel.

The funnel, :math:`v \sim \mathcal N(0, 3^2)` and :math:`x_{1..d-1} \mid v \sim \mathcal N(0, e^v)`
(``--dim d``), has a neck (:math:`v \ll 0`) that defeats plain NUTS: no one step size suits both
the neck and the mouth. NeuTra fits a guide :math:`q = T_\# \mathcal N(0, I)` by SVI (one FFJORD
flow, ``AutoFFJORD`` with ``preset="fast"``), runs NUTS on :math:`w` with the potential
:math:`U(w) = -\log p(T(w)) - \log|\det \partial T / \partial w|`, where the flow has made the
geometry nearly isotropic, and maps the samples back with :math:`T`.

HMC needs a *deterministic* potential: in eval mode the log-det is the exact trace and the solve
uses ``eval_solver``, here rk4 with the training steps (``--hmc-solver``, ``--solver-steps``), so
HMC sees exactly the trained map, smooth in :math:`w`, at a fixed cost per gradient (dopri5 is
deterministic too, but dearer and only piecewise smooth). The script checks that the potential
and its gradient are bitwise repeatable and measures the gap between the solver's log-det and
``slogdet`` of the autograd Jacobian of the computed map, the only bias NeuTra adds. Plain and
NeuTra NUTS then draw as many samples after as much warmup; ESS per second and the marginals
(truth: :math:`v` sd 3, :math:`x_1` sd :math:`e^{9/4}`) go to ``neutra.json`` and ``neutra.png``.

Run::

    python examples/neutra.py            # about 10 minutes on one CPU thread
    python examples/neutra.py --quick    # seconds, for tests (out/neutra-quick)
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from tqdm.auto import tqdm

from pyro_ffjord import FFJORD, AutoFFJORD, runs

V_SCALE = 3.0
FULL = dict(guide_steps=3000, particles=32, hidden_dims=[128, 128], num_samples=1000, warmup=500,
            max_tree_depth=10)
QUICK = dict(guide_steps=40, particles=8, hidden_dims=[32, 32], num_samples=30, warmup=30, max_tree_depth=5)


class Funnel:
    """Neal's funnel in ``dim`` dimensions, counting its evaluations."""

    def __init__(self, dim: int) -> None:
        self.dim, self.calls = dim, 0

    def __call__(self) -> None:
        self.calls += 1
        v = pyro.sample("v", dist.Normal(0.0, V_SCALE))
        scale = (v / 2).exp()[..., None]
        pyro.sample("x", dist.Normal(scale.new_zeros(self.dim - 1), scale).to_event(1))


def train_guide(model: Funnel, args):
    """The FFJORD guide (in eval mode it solves with ``--hmc-solver``), fitted by SVI."""
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    steps = {} if args.solver_steps is None else {"steps": args.solver_steps}  # default: the preset's
    guide = AutoFFJORD(model, hidden_dims=args.hidden_dims, preset="fast", eval_solver=args.hmc_solver,
                       T=args.end_time, activation=args.activation, **steps)
    lrd = args.lr_decay ** (1.0 / max(1, args.guide_steps))  # lr * lr_decay at the end
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": args.lr, "lrd": lrd}),
              Trace_ELBO(num_particles=args.particles, vectorize_particles=True))
    losses, start = [], time.perf_counter()
    bar = tqdm(range(args.guide_steps), desc="guide", disable=args.no_progress, leave=False)
    for step in bar:
        losses.append(svi.step())
        if step % 100 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.3f}")
    return guide, time.perf_counter() - start, losses


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


def run_nuts(model, args, counted: Funnel, flows=()) -> dict:
    """NUTS with a timer that splits warmup from sampling, counting evaluations and solves."""
    calls, solves = counted.calls, sum(f.stats.solves for f in flows)
    pyro.set_rng_seed(args.seed + 1)
    marks = {}

    def hook(kernel, params, stage, i):  # after each iteration: the first sample counts as warmup
        if stage == "Sample" and "sample" not in marks:
            marks["sample"] = time.perf_counter()

    kernel = NUTS(model, max_tree_depth=args.max_tree_depth, target_accept_prob=args.target_accept)
    mcmc = MCMC(kernel, num_samples=args.num_samples, warmup_steps=args.warmup, hook_fn=hook,
                disable_progbar=args.no_progress)
    start = time.perf_counter()
    mcmc.run()
    end = time.perf_counter()
    diag = mcmc.diagnostics()
    return {"samples": mcmc.get_samples(), "total_seconds": end - start,
            "sample_seconds": end - marks.get("sample", start),
            "divergences": len(diag.get("divergences", {}).get("chain 0", [])),
            "acceptance": float(diag.get("acceptance rate", {}).get("chain 0", float("nan"))),
            "step_size": float(kernel.step_size), "potential_evals": counted.calls - calls,
            "ffjord_solves": sum(f.stats.solves for f in flows) - solves}


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


def plot(panels, path: str) -> None:
    """Each panel's samples of (x_1, v) over the exact marginal density."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    vv, xx = torch.meshgrid(torch.linspace(-10, 10, 200), torch.linspace(-30, 30, 200), indexing="ij")
    logp = dist.Normal(0.0, V_SCALE).log_prob(vv) + dist.Normal(0.0, (vv / 2).exp()).log_prob(xx)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=90, sharey=True)
    for ax, (title, v, x1) in zip(axes, panels):
        ax.contour(xx, vv, logp, levels=torch.linspace(-12, -2, 6).tolist(), colors="gray", linewidths=0.6)
        ax.scatter(x1, v, s=2, alpha=0.4)
        ax.set(xlim=(-30, 30), ylim=(-10, 10), xlabel="x_1")
        ax.set_title(title, fontsize=9)
    axes[0].set_ylabel("v")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"defaults: {FULL}; with --quick: {QUICK}")
    count, rate = runs.positive_int, runs.positive_float
    p.add_argument("--steps", "--guide-steps", dest="guide_steps", type=count, help="SVI steps for the guide")
    p.add_argument("--dim", type=runs.int_at_least(2), default=10, help="funnel dimension (v plus dim-1 x's)")
    p.add_argument("--particles", type=count, help="ELBO particles (vectorized)")
    p.add_argument("--lr", type=rate, default=3e-3)
    p.add_argument("--lr-decay", type=rate, default=0.1, help="lr factor reached at the end")
    p.add_argument("--hidden-dims", type=count, nargs="+")
    p.add_argument("--activation", default="swish", help="vector field activation")
    p.add_argument("--end-time", type=rate, default=1.0, help="the flow's end time T")
    p.add_argument("--hmc-solver", default="rk4", choices=["rk4", "dopri5"], help="the eval_solver, in HMC")
    p.add_argument("--solver-steps", type=count, help="rk4 steps over [0, T] (default: the fast preset's 3)")
    for name in ("--num-samples", "--warmup", "--max-tree-depth"):  # NUTS's, the same for both runs
        p.add_argument(name, type=runs.nonnegative_int if name == "--warmup" else count)
    p.add_argument("--target-accept", type=runs.unit_interval, default=0.8)
    # one thread: a 10-D funnel, and NUTS is sequential (the docs' times too)
    runs.add_run_args(p, out="out/neutra", threads=1, threads_note="a 10-D funnel and sequential NUTS")
    args = runs.parse(p, argv)
    if args.device != "cpu":  # refused before any folder is made
        p.error("argument --device: this example runs on the CPU (NUTS is sequential and the solves are tiny)")
    return args


def main(args) -> dict:
    if args.device != "cpu":
        raise runs.RunError("this example runs on the CPU (NUTS is sequential and the solves are tiny)")
    runs.fill_defaults(args, full=FULL, quick=QUICK)
    runs.start(args)
    model = Funnel(args.dim)

    # 1. The guide.
    guide, seconds, losses = train_guide(model, args)
    quality, q_samples = guide_quality(guide, model, 200 if args.quick else 4000)
    print(f"guide: {args.guide_steps} steps in {seconds:.1f} s, ELBO {quality['elbo']:.3f} "
          f"(log Z = 0), q's v: mean {quality['v_mean']:.2f} std {quality['v_std']:.2f}")
    # 2. NeuTra: deterministic potential, log-det gap, cost per gradient.
    guide.eval().requires_grad_(False)
    neutra = NeuTraReparam(guide)
    neutra_model = neutra.reparam(model)
    checks = check_neutra(guide, neutra_model, args.dim, *((4, 5) if args.quick else (8, 50)))
    print(f"NeuTra potential deterministic: {checks['deterministic']}; log-det gap "
          f"{checks['logdet_gap_max']:.2e}; {checks['ms_per_gradient']:.1f} ms per gradient")
    # 3. NUTS with and without NeuTra, same samples and warmup.
    run_neutra = run_nuts(neutra_model, args, model, [m for m in guide.modules() if isinstance(m, FFJORD)])
    with torch.no_grad():  # NeuTra's samples of w, mapped back by the flow
        z = neutra.transform_sample(next(iter(run_neutra["samples"].values())))
    run_plain = run_nuts(model, args, model)
    (v_n, x1_n), (v_p, x1_p) = [(d["v"].reshape(-1), d["x"][..., 0].reshape(-1))
                                for d in (z, run_plain["samples"])]
    rows = [summarize("NUTS", v_p, x1_p, run_plain),
            dict(summarize("NeuTra NUTS (FFJORD)", v_n, x1_n, run_neutra, seconds),
                 ffjord_solves=run_neutra["ffjord_solves"], guide_seconds=seconds)]
    for r in rows:
        print(f"{r['method']:>22}: ESS v {r['ess_v']:7.1f}  x1 {r['ess_x1']:7.1f} | ESS/s (sampling) "
              f"v {r['ess_v_per_s']:6.2f} x1 {r['ess_x1_per_s']:6.2f} | {r['sample_seconds']:6.1f} s "
              f"| div {r['divergences']} | v mean {r['v_mean']:+.2f} std {r['v_std']:.2f}")
    plot([(f"plain NUTS ({len(v_p)} samples)", v_p, x1_p),
          (f"NeuTra NUTS, FFJORD ({len(v_n)} samples)", v_n, x1_n),
          ("FFJORD guide q alone", *q_samples[: len(v_n), :2].T)], f"{args.out}/neutra.png")
    target = {"name": "Neal's funnel", "dim": args.dim, "v_std": V_SCALE, "x1_std": math.exp(V_SCALE**2 / 4)}
    last = losses[-100:]
    fit = {"steps": args.guide_steps, "seconds": seconds, "loss_last100": sum(last) / len(last)}
    payload = {"target": target, "guide": {**fit, **quality}, "checks": checks, "results": rows}
    return runs.write_results(args, "neutra", payload)


if __name__ == "__main__":
    runs.cli(main, parse_args)
