r"""FFJORD as an SVI guide against the guides a Pyro user would pick instead.

Three posteriors, each written as a Pyro model with a single vector-valued latent site so that
every guide sees the same latent vector:

- ``funnel``: Neal's funnel in 10-D, :math:`v \sim \mathcal N(0, 3^2)`,
  :math:`x_{1..9} \mid v \sim \mathcal N(0, e^{v})` (standard deviation :math:`e^{v/2}`). No
  observations, so the model's density is the normalized target and
  :math:`\mathrm{KL}(q\,\|\,p) = -\mathrm{ELBO}`.
- ``banana``: 2-D, :math:`x_1 \sim \mathcal N(0, 2^2)`,
  :math:`x_2 \mid x_1 \sim \mathcal N(\tfrac12(x_1^2 - 4), 1)`; normalized as well.
- ``logistic``: Bayesian logistic regression on scikit-learn's breast-cancer data (569 rows,
  30 standardized features, plus a bias), :math:`w \sim \mathcal N(0, I)` in 31-D, the
  likelihood inside ``pyro.plate("data", 569)``. The truth is a seeded NUTS run computed here;
  the guides are scored by their marginal quantile errors against it.

Guides, all trained with the same optimizer (``ClippedAdam``, ``--lr`` decayed to a tenth over
the run), the same number of steps and the same vectorized particles
(``Trace_ELBO(num_particles=--particles, vectorize_particles=True)``):

- ``FFJORD``: ``AutoNormalizingFlow(model, partial(iterated, k, ffjord, **options))`` (the same
  as :class:`pyro_ffjord.AutoFFJORD`), options per target in :data:`FFJORD_OPTIONS`;
- ``FFJORD + RNODE``: the same guide with kinetic and Jacobian weights, trained on
  ``Trace_ELBO(...).differentiable_loss(model, guide) + pyro_ffjord.regularization(guide)``
  (a custom loss callable handed to :class:`~pyro.infer.SVI`);
- ``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal`` (Pyro's autoguides);
- ``zuko NSF``: ``zuko.flows.NSF`` sampled through ``pyro.contrib.zuko.ZukoToPyro`` in a
  three-line custom guide.

Reported per guide: the final ELBO with ``--eval-particles`` samples (FFJORD in eval mode:
exact trace, adaptive dopri5), for the normalized targets :math:`\mathrm{KL}(q\|p)` and the
forward :math:`\mathrm{KL}(p\|q) = E_p[\log p - \log q]` on exact samples of the truth (for
FFJORD, :math:`\log q` of such a sample costs one reverse solve), for ``logistic`` the marginal
quantile errors vs NUTS (in units of the NUTS posterior standard deviation; the NUTS run's own
half-vs-half error is given as the Monte Carlo floor), the time per training step and its
ratios to AutoNormal and to zuko's NSF. For FFJORD rows trained with fixed rk4 steps the
ELBO is also computed with the training solver (``elbo_train_solver``): the gap to the dopri5
ELBO shows how faithful the fixed steps are. ``--sweep`` adds FFJORD variants (end time,
steps, solver, capacity) as extra rows.

Outputs in ``--out`` (default ``out/svi_guide``): ``<target>.json`` (machine, arguments, one
row per guide, training curves) and ``<target>.png`` (each guide's samples over the true
density; funnel: the :math:`(v, x_1)` plane; logistic: the two most correlated weights over a
density estimate of the NUTS samples).

Run::

    python examples/svi_guide.py --target all      # about 20 minutes on one CPU thread
    python examples/svi_guide.py --target funnel --sweep
    python examples/svi_guide.py --target all --quick   # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from functools import partial

import torch
from tqdm.auto import tqdm

import pyro
import pyro.distributions as dist
from pyro.distributions.transforms import iterated
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)

from pyro_ffjord import FFJORD, ffjord, regularization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run_info import machine_info  # noqa: E402
from svi_targets import TARGETS, make_target, plot, quantile_errors, run_nuts  # noqa: E402

# --guides key -> row label
GUIDES = {
    "ffjord": "FFJORD",
    "rnode": "FFJORD + RNODE",
    "normal": "AutoNormal",
    "mvn": "AutoMultivariateNormal",
    "iaf": "AutoIAFNormal",
    "nsf": "zuko NSF",
}


# FFJORD options per target (measured: see docs/svi_guides.md and ``--sweep``). ``flows`` is
# the k of ``partial(iterated, k, ffjord)``; the rest are FFJORD keywords. A swish field with
# T = 1 beat the toy-density default (tanh 64-64-64, T = 0.5) on all three targets: a tanh
# field saturates, and the funnel and the regression posterior need large scale changes.
SWISH = dict(flows=1, preset="fast", T=1.0, hidden_dims=[128, 128], activation="swish")
FFJORD_OPTIONS = {"funnel": SWISH, "banana": SWISH, "logistic": SWISH}
# SVI steps per target when --steps is not given (the same for every guide of a target).
DEFAULT_STEPS = {"funnel": 2000, "banana": 2000, "logistic": 1000}
RNODE_WEIGHTS = dict(kinetic=0.01, jacobian=0.01)
# Extra FFJORD rows for ``--sweep``: (label, options replacing FFJORD_OPTIONS[target]); "fast"
# alone is the tanh 64-64-64 field of the toy demo.
SWEEP = {
    "funnel": [
        ("FFJORD fast T=0.5 (3 rk4)", dict(flows=1, preset="fast")),
        ("FFJORD fast T=1 (6 rk4)", dict(flows=1, preset="fast", T=1.0, step_size=1.0 / 6)),
        ("FFJORD fast T=2 (12 rk4)", dict(flows=1, preset="fast", T=2.0, step_size=1.0 / 6)),
        ("FFJORD fast T=1 (3 rk4)", dict(flows=1, preset="fast", T=1.0, step_size=1.0 / 3)),
        ("FFJORD fast x2 T=0.5", dict(flows=2, preset="fast")),
        ("FFJORD fast T=1 128x3", dict(flows=1, preset="fast", T=1.0, step_size=1.0 / 6,
                                       hidden_dims=[128, 128, 128])),
        ("FFJORD dopri5 1e-3 exact T=1", dict(flows=1, trace="exact", atol=1e-3, rtol=1e-3,
                                              T=1.0)),
        ("FFJORD dopri5 1e-3 Hutchinson T=1", dict(flows=1, atol=1e-3, rtol=1e-3, T=1.0)),
        ("zuko NSF coupling (passes=2)", dict(passes=2)),
    ],
    "banana": [
        ("FFJORD fast T=0.5 (3 rk4)", dict(flows=1, preset="fast")),
        ("FFJORD fast T=1 (6 rk4)", dict(flows=1, preset="fast", T=1.0, step_size=1.0 / 6)),
        ("FFJORD dopri5 1e-3 T=0.5", dict(flows=1, atol=1e-3, rtol=1e-3)),
    ],
    "logistic": [
        ("FFJORD fast T=0.5 (3 rk4)", dict(flows=1, preset="fast")),
        ("FFJORD fast T=1 (6 rk4)", dict(flows=1, preset="fast", T=1.0, step_size=1.0 / 6)),
        ("FFJORD fast Hutchinson T=0.5", dict(flows=1, preset="fast", trace="hutchinson")),
        ("FFJORD fast Hutchinson 64x3", dict(flows=1, preset="fast", trace="hutchinson",
                                             hidden_dims=[64, 64, 64])),
        ("zuko NSF coupling (passes=2)", dict(passes=2)),
    ],
}


# ---------------------------------------------------------------------------------------------
# Guides
# ---------------------------------------------------------------------------------------------
class ZukoGuide(torch.nn.Module):
    """A custom guide sampling the model's one vector site from a zuko flow."""

    def __init__(self, site: str, flow: torch.nn.Module) -> None:
        super().__init__()
        self.site, self.flow = site, flow

    def forward(self, *args, **kwargs):
        from pyro.contrib.zuko import ZukoToPyro

        pyro.module("zuko_flow", self.flow)
        return pyro.sample(self.site, ZukoToPyro(self.flow()))

    def distribution(self):
        return self.flow()


def ffjord_guide(model, options: dict, quick: bool) -> AutoNormalizingFlow:
    options = dict(options)
    flows = options.pop("flows", 1)
    if quick:
        options["hidden_dims"] = [16, 16]
    return AutoNormalizingFlow(model, partial(iterated, flows, ffjord, **options))


def make_guide(name: str, model, args, options: dict):
    """A fresh guide; ``options`` are FFJORD's (with ``flows``) or zuko's (``passes``)."""
    if name == "FFJORD":
        return ffjord_guide(model, options, args.quick)
    if name == "AutoNormal":
        return AutoNormal(model)
    if name == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model)
    if name == "AutoIAFNormal":
        hidden = [max(8, model.dim)] if args.quick else None
        return AutoIAFNormal(model, hidden_dim=hidden, num_transforms=2)
    if name == "zuko NSF":
        import zuko

        passes = options.get("passes", args.zuko_passes)
        size = dict(transforms=1, hidden_features=(16, 16)) if args.quick else dict(
            transforms=3, hidden_features=(64, 64))
        flow = zuko.flows.NSF(model.dim, passes=passes, **size)
        return ZukoGuide(model.site, flow)
    raise ValueError(f"unknown guide {name!r}")


def posterior_distribution(guide, model) -> torch.distributions.Distribution:
    """q over the model's latent vector (identity unconstraining: the site is real_vector)."""
    if isinstance(guide, ZukoGuide):
        return guide.distribution()
    if isinstance(guide, AutoNormal):
        loc, scale = guide._get_loc_and_scale(model.site)
        return dist.Normal(loc, scale).to_event(1)
    return guide.get_posterior()


def ffjord_modules(guide):
    return [m for m in guide.modules() if isinstance(m, FFJORD)] if isinstance(
        guide, torch.nn.Module) else []


def sample_and_log_q(q, n: int, chunk: int = 1000):
    zs, lqs = [], []
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        if hasattr(q, "rsample_and_log_prob"):  # zuko: one pass
            z, lq = q.rsample_and_log_prob((m,))
        else:
            z = q.rsample((m,))
            lq = q.log_prob(z)  # FFJORD: the solve that produced z is cached
        zs.append(z)
        lqs.append(lq)
    return torch.cat(zs), torch.cat(lqs)


def log_q_of(q, z: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    return torch.cat([q.log_prob(z[i:i + chunk]) for i in range(0, len(z), chunk)])


def mean_se(x: torch.Tensor):
    x = x[torch.isfinite(x)] if not bool(torch.isfinite(x).all()) else x
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


# ---------------------------------------------------------------------------------------------
# Fit and evaluate one guide
# ---------------------------------------------------------------------------------------------
def guide_kind(label: str) -> str:
    """'FFJORD' for every FFJORD row (plain, RNODE, sweep variants), 'zuko NSF' likewise."""
    for kind in ("FFJORD", "zuko NSF"):
        if label.startswith(kind):
            return kind
    return label


def fit(label: str, model, args, options: dict, rnode: bool, progress: bool) -> dict:
    """Train one guide with the shared optimizer, budget and particles."""
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    options = dict(options, **RNODE_WEIGHTS) if rnode else dict(options)
    kind = guide_kind(label)
    guide = make_guide(kind, model, args, options)
    elbo = Trace_ELBO(num_particles=args.particles, vectorize_particles=True,
                      max_plate_nesting=1)
    if rnode:
        # The documented recipe: the differentiable ELBO loss plus the flows' RNODE penalty
        # of the solve that sampled the particles, as a custom SVI loss.
        def loss(model_, guide_, *a, **k):
            return elbo.differentiable_loss(model_, guide_, *a, **k) + regularization(guide_)
    else:
        loss = elbo
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1.0 / max(1, args.steps)),
                                    "clip_norm": 100.0})
    svi = SVI(model, guide, optim, loss)
    losses = []
    bar = tqdm(range(args.steps), desc=f"{model.name}: {label}", disable=not progress,
               leave=False)
    start = time.perf_counter()
    for step in bar:
        losses.append(float(svi.step()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    seconds = time.perf_counter() - start
    flows = ffjord_modules(guide)
    row = {
        "guide": label,
        "kind": kind,
        "options": options if kind == "FFJORD" else (
            {"passes": options.get("passes", args.zuko_passes)} if kind == "zuko NSF" else None),
        "params": sum(p.numel() for p in guide.parameters()) if isinstance(
            guide, torch.nn.Module) else None,
        "steps": args.steps,
        "train_seconds": seconds,
        "ms_per_step": 1000 * seconds / max(1, args.steps),
        "loss_last100": sum(losses[-100:]) / len(losses[-100:]) if losses else None,
        "nfe_per_step": sum(f.stats.nfe_forward_total for f in flows) / max(1, args.steps)
        if flows else None,
    }
    return {"row": row, "guide": guide, "losses": losses}


@torch.no_grad()
def evaluate(fitted: dict, model, args, truth_samples, nuts_samples) -> dict:
    guide, row = fitted["guide"], fitted["row"]
    flows = ffjord_modules(guide)
    if isinstance(guide, torch.nn.Module):
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
        lq_truth = log_q_of(q, truth_samples)
        row["eval_reverse_seconds"] = time.perf_counter() - start
        if flows:
            row["eval_nfe_reverse"] = sum(f.nfe_forward for f in flows)
        row["kl_p_q"], row["kl_p_q_se"] = mean_se(model.log_joint(truth_samples) - lq_truth)
    if nuts_samples is not None:
        row.update(quantile_errors(z, nuts_samples))
    # The map the guide was trained with, when it is deterministic (exact trace, fixed steps).
    if flows and all(f.config.trace == "exact" and f.config.step_size is not None
                     for f in flows):
        for f in flows:
            f.train()
        pyro.set_rng_seed(args.seed + 1)
        z_t, lq_t = sample_and_log_q(posterior_distribution(guide, model), args.eval_particles)
        row["elbo_train_solver"] = mean_se(model.log_joint(z_t) - lq_t)[0]
        for f in flows:
            f.eval()
    return {"samples": z[: args.plot_samples].clone(), "row": row}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
def run_target(target: str, args) -> dict:
    args = argparse.Namespace(**vars(args))
    if args.steps is None:
        args.steps = 30 if args.quick else DEFAULT_STEPS[target]
    model = make_target(target)
    pyro.set_rng_seed(args.seed + 12345)
    truth_samples = model.truth.sample((args.eval_particles,)) if model.normalized else None
    nuts = None
    if target == "logistic":
        nuts = run_nuts(model, args)
        print(f"logistic: NUTS {nuts['num_samples']} samples after {nuts['warmup']} warmup in "
              f"{nuts['seconds']:.1f} s; half-vs-half quantile error "
              f"{nuts['floor_quantile_err_mean']:.3f} sd (Monte Carlo floor)")
    guides = [GUIDES[k] for k in GUIDES if k in args.guides]
    base_options = FFJORD_OPTIONS[target]
    jobs = [(g, base_options if g.startswith("FFJORD") else {}, g == "FFJORD + RNODE")
            for g in guides]
    if args.sweep:
        jobs += [(label, opts, False) for label, opts in SWEEP[target]]
    rows, curves, panels = [], {}, []
    if truth_samples is not None:
        panels.append(("truth (exact samples)", truth_samples[: args.plot_samples]))
    elif nuts is not None:
        panels.append((f"NUTS ({nuts['num_samples']} samples)", nuts["samples"]))
    for label, options, rnode in jobs:
        fitted = fit(label, model, args, options, rnode, args.progress)
        out = evaluate(fitted, model, args, truth_samples,
                       None if nuts is None else nuts["samples"])
        row = out["row"]
        rows.append(row)
        curves[label] = fitted["losses"][:: max(1, args.steps // 200)]
        if label in guides:
            panels.append((f"{label}: ELBO {row['elbo']:.2f}", out["samples"]))
        msg = (f"{target}: {label:<34} {row['ms_per_step']:7.1f} ms/step  "
               f"ELBO {row['elbo']:9.3f} ± {row['elbo_se']:.3f}")
        if "kl_p_q" in row:
            msg += f"  KL(p||q) {row['kl_p_q']:8.3f} ± {row['kl_p_q_se']:.3f}"
        if "quantile_err_mean" in row:
            msg += (f"  q-err {row['quantile_err_mean']:.3f} (max {row['quantile_err_max']:.3f})"
                    f"  sd ratio {row['sd_ratio_mean']:.2f}")
        if "elbo_train_solver" in row:
            msg += f"  [ELBO train solver {row['elbo_train_solver']:.3f}]"
        print(msg)
    ref = {r["guide"]: r["ms_per_step"] for r in rows}
    for row in rows:
        for name, key in (("AutoNormal", "x_autonormal"), ("zuko NSF", "x_zuko")):
            row[key] = row["ms_per_step"] / ref[name] if name in ref else None
    png = os.path.join(args.out, f"{target}.png")
    plot(target, model, panels, png, None if nuts is None else nuts["samples"])
    payload = {
        "example": "svi_guide",
        "target": target,
        "machine": machine_info(args.device),
        "args": vars(args),
        "ffjord_options": base_options,
        "rnode_weights": RNODE_WEIGHTS,
        "results": rows,
        "curves": curves,
    }
    if nuts is not None:
        payload["nuts"] = {k: v for k, v in nuts.items() if k != "samples"}
    path = os.path.join(args.out, f"{target}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    print(f"wrote {path} and {png}")
    return payload


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="all", choices=TARGETS + ("all",))
    p.add_argument("--steps", type=int, default=None,
                   help="SVI steps, the same for every guide (default per target: "
                   f"{DEFAULT_STEPS}; --quick: 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--out", default="out/svi_guide", help="output folder (JSON, PNG)")
    p.add_argument("--quick", action="store_true", help="tiny budget for tests (seconds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES),
                   help="which guides to fit: " + ", ".join(f"{k} ({v})" for k, v in GUIDES.items()))
    p.add_argument("--sweep", action="store_true", help="also fit the FFJORD variants of SWEEP")
    p.add_argument("--zuko-passes", type=int, default=None,
                   help="zuko NSF passes (default: fully autoregressive, zuko's default; 2: "
                   "coupling)")
    p.add_argument("--particles", type=int, default=16, help="training particles (vectorized)")
    p.add_argument("--lr", type=float, default=3e-3, help="initial learning rate (ClippedAdam, "
                   "decayed to a tenth over the run)")
    p.add_argument("--eval-particles", type=int, default=1000,
                   help="samples for the final ELBO and the forward KL")
    p.add_argument("--plot-samples", type=int, default=1000)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-tree-depth", type=int, default=8)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p.parse_args(argv)


def main(args) -> dict:
    if args.quick:
        args.steps = None if args.steps is None else min(args.steps, 30)
        args.particles = min(args.particles, 4)
        args.eval_particles = min(args.eval_particles, 128)
        args.plot_samples = min(args.plot_samples, 128)
        args.nuts_samples, args.nuts_warmup = min(args.nuts_samples, 40), min(args.nuts_warmup, 30)
        args.nuts_tree_depth = min(args.nuts_tree_depth, 4)
    torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.set_default_device(args.device)
    os.makedirs(args.out, exist_ok=True)
    targets = TARGETS if args.target == "all" else (args.target,)
    return {t: run_target(t, args) for t in targets}


if __name__ == "__main__":
    main(parse_args())
