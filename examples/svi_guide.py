r"""FFJORD as an SVI guide against the guides a Pyro user would pick instead.

Targets (:mod:`svi_targets`): Neal's ``funnel`` (10-D) and a ``banana`` (2-D), normalized with
no observations, so KL(q||p) = -ELBO and exact samples give the forward KL(p||q); ``logistic``,
Bayesian logistic regression on the breast-cancer data (31-D), scored by marginal quantile
errors against a seeded NUTS run. Guides, all with the same optimizer (``ClippedAdam``, ``--lr``
decayed to a tenth), steps and vectorized particles: ``FFJORD``, ``AutoNormalizingFlow(model,
partial(iterated, k, ffjord, **FFJORD_OPTIONS[target]))``; ``FFJORD + RNODE``, trained on the SVI
loss ``elbo.differentiable_loss(model, guide) + pyro_ffjord.regularization(guide)``; Pyro's
AutoNormal, AutoMultivariateNormal, AutoIAFNormal; zuko's NSF through ``ZukoToPyro``. FFJORD is
scored in eval mode (exact trace, adaptive dopri5); rows trained with fixed rk4 steps also get
the ELBO under the training solver (``elbo_train_solver``): its gap shows how faithful the fixed
steps are. Writes ``<target>.json`` and ``<target>.png`` to ``--out`` (tables: docs/svi_guides.md;
scoring: ``svi_targets.evaluate``).

``checkpoint_<target>.pt`` holds the target's finished guides (rows, samples, loss curves), the
one in training (Pyro's parameter store, the optimizer's state, losses, step), the NUTS reference
and the random state, the run's options and each segment's training time. It is written after
every guide, every ``--checkpoint-minutes`` of training and on Ctrl-C (which then exits with code
130); ``--resume`` continues at the guide and step where it stopped, with the numbers of an
uninterrupted run, and refuses a checkpoint written with other options (all but --out,
--threads, --no-progress, --device, --checkpoint-minutes and --target define the run). Run::

    python examples/svi_guide.py --target all      # about 20 minutes on one CPU thread
    python examples/svi_guide.py --target all --resume   # continue it after Ctrl-C
    python examples/svi_guide.py --target funnel --sweep   # adds FFJORD variants as rows
    python examples/svi_guide.py --target all --quick   # seconds, for tests (out/svi_guide-quick)
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Optional

import pyro
import torch
from pyro.distributions.transforms import iterated
from pyro.contrib.zuko import ZukoToPyro
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal, AutoNormalizingFlow
from tqdm.auto import tqdm

from pyro_ffjord import FFJORD, ffjord, regularization, runs
from svi_targets import TARGETS, evaluate, make_target, plot, report, run_nuts

GUIDES = {"ffjord": "FFJORD", "rnode": "FFJORD + RNODE", "normal": "AutoNormal",  # --guides key: row label
          "mvn": "AutoMultivariateNormal", "iaf": "AutoIAFNormal", "nsf": "zuko NSF"}
# FFJORD options per target (flows: the k of iterated(k, ffjord); the rest: FFJORD keywords). A swish
# field with T = 1 beat the toy default (tanh 64-64-64, T = 0.5) on every target: a tanh field
# saturates, and the funnel and the regression need large scale changes (docs/svi_guides.md).
SWISH = dict(flows=1, preset="fast", T=1.0, hidden_dims=[128, 128], activation="swish")
FFJORD_OPTIONS = {"funnel": SWISH, "banana": SWISH, "logistic": SWISH}
DEFAULT_STEPS = {"funnel": 2000, "banana": 2000, "logistic": 1000}  # SVI steps without --steps
RNODE_WEIGHTS = dict(kinetic=0.01, jacobian=0.01)
FULL = dict(particles=16, eval_particles=1000, plot_samples=1000, nuts_samples=1000, nuts_warmup=500,
            nuts_tree_depth=8)
QUICK = dict(steps=30, particles=4, eval_particles=128, plot_samples=128, nuts_samples=40,
             nuts_warmup=30, nuts_tree_depth=4)
# --sweep's extra rows: (label, options replacing FFJORD_OPTIONS[target]); FAST is the toy default.
FAST, DOPRI5 = dict(flows=1, preset="fast"), dict(flows=1, atol=1e-3, rtol=1e-3)
FAST_T1 = ("FFJORD fast T=1 (6 rk4)", dict(FAST, T=1.0, steps=6))
COUPLING = ("zuko NSF coupling (passes=2)", dict(passes=2))
SWEEP = {
    "funnel": [("FFJORD fast T=0.5 (3 rk4)", FAST), FAST_T1,
               ("FFJORD fast T=2 (12 rk4)", dict(FAST, T=2.0, steps=12)),
               ("FFJORD fast T=1 (3 rk4)", dict(FAST, T=1.0, steps=3)),
               ("FFJORD fast x2 T=0.5", dict(FAST, flows=2)),
               ("FFJORD fast T=1 128x3", dict(FAST, T=1.0, steps=6, hidden_dims=[128, 128, 128])),
               ("FFJORD dopri5 1e-3 exact T=1", dict(DOPRI5, trace="exact", T=1.0)),
               ("FFJORD dopri5 1e-3 Hutchinson T=1", dict(DOPRI5, T=1.0)), COUPLING],
    "banana": [("FFJORD fast T=0.5 (3 rk4)", FAST), FAST_T1, ("FFJORD dopri5 1e-3 T=0.5", DOPRI5)],
    "logistic": [("FFJORD fast T=0.5 (3 rk4)", FAST), FAST_T1,
                 ("FFJORD fast Hutchinson T=0.5", dict(FAST, trace="hutchinson")),
                 ("FFJORD fast Hutchinson 64x3", dict(FAST, trace="hutchinson", hidden_dims=[64, 64, 64])),
                 COUPLING],
}


class ZukoGuide(torch.nn.Module):
    """A custom guide sampling the model's one vector site from a zuko flow."""

    def __init__(self, site: str, flow: torch.nn.Module) -> None:
        super().__init__()
        self.site, self.flow = site, flow

    def forward(self, *args, **kwargs):
        pyro.module("zuko_flow", self.flow)
        return pyro.sample(self.site, ZukoToPyro(self.flow()))

    def get_posterior(self) -> torch.distributions.Distribution:  # as an autoguide's, for scoring
        return self.flow()


def make_guide(kind: str, model, args, options: dict):
    """A fresh guide; ``options`` are FFJORD's (with ``flows``) or zuko's (``passes``)."""
    if kind == "FFJORD":
        options = dict(options, hidden_dims=[16, 16]) if args.quick else dict(options)
        return AutoNormalizingFlow(model, partial(iterated, options.pop("flows", 1), ffjord, **options))
    if kind == "zuko NSF":
        import zuko  # only needed for this guide
        transforms, hidden = (1, (16, 16)) if args.quick else (3, (64, 64))
        flow = zuko.flows.NSF(model.dim, passes=options.get("passes", args.zuko_passes),
                              transforms=transforms, hidden_features=hidden)
        return ZukoGuide(model.site, flow)
    if kind == "AutoIAFNormal":
        return AutoIAFNormal(model, hidden_dim=[max(8, model.dim)] if args.quick else None, num_transforms=2)
    return {"AutoNormal": AutoNormal, "AutoMultivariateNormal": AutoMultivariateNormal}[kind](model)


def fit(label: str, model, args, options: dict, rnode: bool, index: int, training: runs.Training, saved: dict,
        resume: Optional[dict] = None) -> dict:
    """Train job ``index`` of the target (one guide) with the shared optimizer, budget and particles,
    from step 0 or from ``resume`` (its state in the checkpoint, with the random state). ``saved``:
    what every checkpoint of the target also holds (the finished jobs, the NUTS reference)."""
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    options = dict(options, **RNODE_WEIGHTS) if rnode else dict(options)
    kind = next((k for k in ("FFJORD", "zuko NSF") if label.startswith(k)), label)  # sweep rows too
    guide = make_guide(kind, model, args, options)
    elbo = Trace_ELBO(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=1)

    def rnode_loss(model_, guide_, *a, **k):  # the documented recipe: ELBO loss + the solve's penalty
        return elbo.differentiable_loss(model_, guide_, *a, **k) + regularization(guide_)
    lrd = 0.1 ** (1.0 / max(1, args.steps))  # the learning rate ends at a tenth
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": lrd, "clip_norm": 100.0})
    svi = SVI(model, guide, optim, rnode_loss if rnode else elbo)
    run = dict(step=0, losses=[], clock=training.elapsed(), nfe=[])  # clock: the run's seconds at the start

    def flows() -> list:  # an autoguide builds its flows at its first call
        return [m for m in guide.modules() if isinstance(m, FFJORD)]

    def checkpoint() -> dict:
        nfe = [f.stats.nfe_forward_total for f in flows()]
        return dict(saved, current=dict(run, nfe=nfe, **runs.svi_state(optim)))

    if resume is not None:
        runs.restore_svi(svi, optim, resume)  # random draws undone below
        run.update((k, resume[k]) for k in run)
        for f, nfe in zip(flows(), run["nfe"]):
            f.stats.nfe_forward_total = nfe
        runs.set_rng_state(resume["rng"], args.device)
    bar = tqdm(range(run["step"], args.steps), initial=run["step"], total=args.steps, desc=f"{model.name}: {label}",
               disable=args.no_progress, leave=False)
    for step in bar:
        run["losses"].append(float(svi.step()))
        run["step"] = step + 1
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(run['losses'][-50:]) / len(run['losses'][-50:]):.3f}")
        training.step(index * args.steps + step + 1, checkpoint)  # by minutes, or Ctrl-C: save (and stop)
    bar.close()
    seconds, losses = training.elapsed() - run["clock"], run["losses"]
    row = {
        "guide": label, "kind": kind,
        "options": options if kind == "FFJORD" else (
            {"passes": options.get("passes", args.zuko_passes)} if kind == "zuko NSF" else None),
        "params": sum(p.numel() for p in guide.parameters()),
        "steps": args.steps, "train_seconds": seconds, "ms_per_step": 1000 * seconds / max(1, args.steps),
        "loss_last100": sum(losses[-100:]) / len(losses[-100:]) if losses else None,
        "nfe_per_step": sum(f.stats.nfe_forward_total for f in flows()) / max(1, args.steps) if flows() else None,
    }
    return {"row": row, "guide": guide, "flows": flows(), "losses": losses}


def run_target(target: str, args) -> dict:
    steps = DEFAULT_STEPS[target] if args.steps is None else args.steps
    args = argparse.Namespace(**dict(vars(args), steps=steps))
    model = make_target(target)
    # One checkpoint per target; its position counts SVI steps over the target's guides, in order.
    config = dict(runs.run_config(args, free=("target",)), target=target)
    training = runs.Training(args, Path(args.out) / f"checkpoint_{target}.pt", config, unit="step")
    ck = training.resume(missing_ok=True)  # refuses other options
    pyro.set_rng_seed(args.seed + 12345)
    truth = model.truth.sample((args.eval_particles,)) if model.normalized else None
    nuts = ck["nuts"] if ck is not None else run_nuts(model, args) if target == "logistic" else None
    panels = [("truth (exact samples)", truth[: args.plot_samples]) if nuts is None else
              (f"NUTS ({nuts['num_samples']} samples)", nuts["samples"])]
    guides = [GUIDES[k] for k in GUIDES if k in args.guides]
    jobs = [(g, FFJORD_OPTIONS[target] if g.startswith("FFJORD") else {}, g == "FFJORD + RNODE")
            for g in guides]
    jobs += [(label, opts, False) for label, opts in SWEEP[target]] if args.sweep else []
    # what every checkpoint holds besides the job in training: each finished job's row, samples and curve
    saved = {"nuts": nuts, "done": [] if ck is None else ck["done"]}
    current = None if ck is None else ck["current"]  # the job in training, if any
    start = len(saved["done"]) * args.steps + (current["step"] if current else 0)
    if ck is not None:
        print(f"{target}: resumed from {training.path} at step {start}: {len(saved['done'])} guide(s) done")
    with training.loop(start):
        for index in range(len(saved["done"]), len(jobs)):
            label, options, rnode = jobs[index]
            resume = None if current is None else dict(current, rng=ck["rng"])
            fitted = fit(label, model, args, options, rnode, index, training, saved, resume)
            current = None
            with training.paused():  # scoring is not training time
                out = evaluate(fitted, model, args, truth, None if nuts is None else nuts["samples"])
            saved["done"].append({"row": out["row"], "samples": out["samples"],
                                  "curve": fitted["losses"][:: max(1, args.steps // 200)]})
            print(report(target, out["row"]))
            training.step((index + 1) * args.steps, lambda: dict(saved, current=None), due=True)
    rows, curves = [d["row"] for d in saved["done"]], {}
    for (label, _, _), d in zip(jobs, saved["done"]):
        curves[label] = d["curve"]
        if label in guides:
            panels.append((f"{label}: ELBO {d['row']['elbo']:.2f}", d["samples"]))
    ref = {r["guide"]: r["ms_per_step"] for r in rows}
    for row in rows:
        for name, key in (("AutoNormal", "x_autonormal"), ("zuko NSF", "x_zuko")):
            row[key] = row["ms_per_step"] / ref[name] if name in ref else None
    title = f"{target}: {args.steps} SVI steps per guide, trained in {training.describe()}"
    plot(target, model, panels, f"{args.out}/{target}.png", None if nuts is None else nuts["samples"], title)
    payload = {"target": target, "ffjord_options": FFJORD_OPTIONS[target], "rnode_weights": RNODE_WEIGHTS,
               **training.summary(), "resumed_from": start if training.resumed else None, "results": rows,
               "curves": curves}
    if nuts is not None:
        payload["nuts"] = {k: v for k, v in nuts.items() if k != "samples"}
    return runs.write_results(args, "svi_guide", payload, filename=f"{target}.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=f"defaults: {FULL}; with --quick: {QUICK}")
    p.add_argument("--target", default="all", choices=TARGETS + ("all",))
    count = runs.positive_int
    p.add_argument("--steps", type=count, help=f"SVI steps of every guide (default {DEFAULT_STEPS}; quick 30)")
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES),
                   help="which guides to fit: " + ", ".join(f"{k} ({v})" for k, v in GUIDES.items()))
    p.add_argument("--sweep", action="store_true", help="also fit the FFJORD variants of SWEEP")
    p.add_argument("--zuko-passes", type=count, help="zuko NSF passes (default autoregressive; 2: coupling)")
    p.add_argument("--lr", type=runs.positive_float, default=3e-3, help="initial learning rate (decayed to a tenth)")
    for name in ("particles", "eval-particles", "plot-samples", "nuts-samples", "nuts-warmup",
                 "nuts-tree-depth"):  # defaults: FULL and QUICK (in --help)
        p.add_argument(f"--{name}", type=runs.nonnegative_int if name == "nuts-warmup" else count)
    # one thread: guides of 2-31 numbers with 128-wide fields (the docs' times and ratios too)
    runs.add_run_args(p, out="out/svi_guide", resume=True, threads=1, threads_note="2- to 31-D guides are too small for more")
    return runs.parse(p, argv)


def main(args) -> dict:
    runs.fill_defaults(args, full=FULL, quick=QUICK)
    targets = TARGETS if args.target == "all" else (args.target,)
    if args.resume and not any((Path(args.out) / f"checkpoint_{t}.pt").exists() for t in targets):
        raise runs.MissingCheckpoint(f"--resume: no checkpoint_<target>.pt in {args.out}; run once without --resume")
    runs.start(args)
    if args.device != "cpu":
        torch.set_default_device(args.device)
    return {t: run_target(t, args) for t in targets}


if __name__ == "__main__":
    runs.cli(main, parse_args)
