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
the PNG with samples. Model, guides and score: ``amortized_vi_model.py``. Results and
discussion: docs/amortized_and_neutra.md.

``checkpoint.pt`` in ``--out`` holds the finished guides (parameters, results) and the one in
training (parameters, Adam's state, its minibatch generator, losses, curve, step) with the random
state, the run's options and each segment's training time. It is written after every guide, every
``--checkpoint-minutes`` of training and on Ctrl-C (which then exits with code 130). ``--resume``
continues at the guide and step where it stopped and ends with the numbers of an uninterrupted
run; it refuses a checkpoint written with other options (all but --out, --threads,
--no-progress, --device and --checkpoint-minutes define the run, --steps too: it sets the
evaluation schedule). Run::

    python examples/amortized_vi.py                 # all guides, about 8 minutes on one CPU thread
    python examples/amortized_vi.py --resume        # continue it after Ctrl-C
    python examples/amortized_vi.py --quick         # seconds, for tests (out/amortized_vi-quick)
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from tqdm.auto import tqdm

from amortized_vi_model import (ALL_GUIDES, FLOW_GUIDES, FlowGuide, GaussianGuide,  # noqa: F401 (tests: av.*)
                                LinearGaussian, expected_kl, make_guide, plot)
from pyro_ffjord import runs

FULL = dict(steps=2000, n_train=2048, n_eval=256, eval_samples=32, evals=10, batch_size=128, hidden_dims=[64] * 3)
QUICK = dict(steps=30, n_train=256, n_eval=32, eval_samples=8, evals=2, batch_size=32, hidden_dims=[32, 32])


def train(name: str, index: int, model: LinearGaussian, x_train: torch.Tensor, x_eval: torch.Tensor, args,
          eval_at: List[int], training: runs.Training, done: List[dict], resume: Optional[dict] = None) -> dict:
    """Fit guide number ``index`` by SVI from step 0, or from ``resume`` (its state in the checkpoint,
    with the random state). ``done``: the finished guides, which every checkpoint holds too."""
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    guide = make_guide(name, model, args).to(args.device)
    optim = Adam({"lr": args.lr})
    svi = SVI(model, guide, optim, Trace_ELBO())
    g = torch.Generator().manual_seed(args.seed + 7)  # same minibatches for every guide
    # where this guide stands; clock: the run's training seconds when the guide started
    run = dict(step=0, curve=[], losses=[], clock=training.elapsed(), nfe=0)

    def evaluate(step: int) -> dict:
        with training.paused():  # scoring is not training time
            pyro.set_rng_seed(args.seed + 99)  # the same eval noise at every evaluation
            run["curve"].append(dict(expected_kl(guide, model, x_eval, args.eval_samples), step=step,
                                     train_seconds=training.elapsed() - run["clock"]))
        return run["curve"][-1]

    def checkpoint() -> dict:
        nfe = 0 if guide.flow is None else guide.flow.stats.nfe_forward_total
        return {"done": done, "current": dict(run, nfe=nfe, guide=guide.state_dict(), optim=optim.get_state(),
                                              batches=g.get_state())}

    if resume is not None:
        guide.load_state_dict(resume["guide"])
        optim.set_state(resume["optim"])  # Adam's moments, consumed at the first step
        g.set_state(resume["batches"])
        run.update((k, resume[k]) for k in run)
        if guide.flow is not None:
            guide.flow.stats.nfe_forward_total = run["nfe"]
        runs.set_rng_state(resume["rng"], args.device)  # building the guide reseeded it
    else:
        if 0 in eval_at:
            evaluate(0)
        pyro.set_rng_seed(args.seed + 1)
    bar = tqdm(range(run["step"] + 1, args.steps + 1), initial=run["step"], total=args.steps, desc=f"{name:>8}",
               disable=args.no_progress, leave=False)
    for step in bar:
        idx = torch.randint(0, x_train.shape[0], (args.batch_size,), generator=g)
        run["losses"].append(svi.step(x_train[idx.to(x_train.device)]) / args.batch_size)
        run["step"] = step
        if step in eval_at:
            state = torch.get_rng_state()  # evaluating leaves the training noise as it was
            bar.set_postfix(kl=f"{evaluate(step)['kl']:.4f}")
            torch.set_rng_state(state)
        training.step(index * args.steps + step, checkpoint)  # by minutes, or Ctrl-C: save (and stop)
    bar.close()
    seconds, curve, losses = training.elapsed() - run["clock"], run["curve"], run["losses"]
    nfe = guide.flow.stats.nfe_forward_total / max(1, args.steps) if guide.flow is not None else None
    return {"guide": name, "params": sum(p.numel() for p in guide.parameters()), "steps": args.steps,
            "train_seconds": seconds, "it_per_s": args.steps / seconds if seconds else None,
            "nfe_forward_per_step": nfe, "final_kl": curve[-1]["kl"], "final_kl_se": curve[-1]["se"],
            "loss_last100": sum(losses[-100:]) / max(1, len(losses[-100:])), "curve": curve, "_guide": guide}


def restore(entry: dict, model: LinearGaussian, args) -> dict:
    """A finished guide of the checkpoint: its result, with the guide rebuilt for the picture."""
    guide = make_guide(entry["guide"], model, args).to(args.device)
    guide.load_state_dict(entry["state"])
    return dict({k: v for k, v in entry.items() if k != "state"}, _guide=guide)


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
    runs.add_run_args(p, out="out/amortized_vi", resume=True, threads=1, threads_note="2-D latents and 64-wide fields")
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
    # One checkpoint for the run; its position counts SVI steps over the guides, in order.
    training = runs.Training(args, out / "checkpoint.pt", runs.run_config(args), unit="step")
    ck = training.resume()  # refuses other options; restores the random state
    done = [] if ck is None else ck["done"]  # finished guides: results and parameters
    results = [restore(entry, model, args) for entry in done]
    current = None if ck is None else ck["current"]  # the guide in training, if any
    start = len(done) * args.steps + (current["step"] if current else 0)
    if ck is not None:
        print(f"resumed from {training.path} at step {start}: {len(done)} guide(s) done")
    with training.loop(start):
        for index in range(len(done), len(args.guides)):
            resume = None if current is None else dict(current, rng=ck["rng"])
            r = train(args.guides[index], index, model, x_train, x_eval, args, eval_at, training, done, resume)
            current = None
            results.append(r)
            done.append(dict({k: v for k, v in r.items() if not k.startswith("_")}, state=r["_guide"].state_dict()))
            print(f"{r['guide']:>8}: KL {r['curve'][0]['kl']:.4f} -> {r['final_kl']:.4f} +- {r['final_kl_se']:.4f} "
                  f"({r['train_seconds']:.1f} s, {r['it_per_s']:.1f} it/s)")
            training.step((index + 1) * args.steps, lambda: {"done": done, "current": None}, due=True)
    title = f"{args.steps} SVI steps per guide, trained in {training.describe()}"
    plot(results, model, x_eval, out / "amortized_vi.png", info["diag_floor"], title)
    return runs.write_results(args, "amortized_vi", {
        "model": info,
        "eval": {"n_eval_x": args.n_eval, "samples_per_x": args.eval_samples, "eval_at": eval_at},
        **training.summary(), "resumed_from": start if training.resumed else None,  # segments: steps of all guides
        "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
    })

if __name__ == "__main__":
    runs.cli(main, parse_args)
