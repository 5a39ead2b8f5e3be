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
The funnel, the checks and the picture: ``neutra_model.py``.

What ``--resume`` can continue: the guide's training. ``checkpoint.pt`` in ``--out`` (the guide's
parameters, ClippedAdam's state, losses, step, the random state, the run's options and each
segment's training time) is written every ``--checkpoint-minutes`` of training, on Ctrl-C (which
then exits with code 130) and when training ends; ``--resume`` continues it to the guide of an
uninterrupted run. The NeuTra checks and the NUTS chains cannot be resumed mid-chain: Ctrl-C
there exits with code 130 keeping only the trained guide, and ``--resume`` skips its training and
samples again from the start (with the same results; NUTS's options may change then, no other).
Run::

    python examples/neutra.py            # about 10 minutes on one CPU thread
    python examples/neutra.py --resume   # continue after Ctrl-C
    python examples/neutra.py --quick    # seconds, for tests (out/neutra-quick)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Optional, Tuple

import pyro
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam
from tqdm.auto import tqdm

from neutra_model import V_SCALE, Funnel, check_neutra, guide_quality, plot, summarize
from pyro_ffjord import FFJORD, AutoFFJORD, runs

FULL = dict(guide_steps=3000, particles=32, hidden_dims=[128, 128], num_samples=1000, warmup=500,
            max_tree_depth=10)
QUICK = dict(guide_steps=40, particles=8, hidden_dims=[32, 32], num_samples=30, warmup=30, max_tree_depth=5)
# Options a resumed run may change: NUTS's (its chains always run from the start).
NUTS_OPTIONS = ("num_samples", "warmup", "max_tree_depth", "target_accept")


def train_guide(model: Funnel, args, training: runs.Training, ck: Optional[dict] = None) -> Tuple[AutoFFJORD, list]:
    """The FFJORD guide (in eval mode it solves with ``--hmc-solver``), fitted by SVI from step 0 or
    from the checkpoint ``ck`` (parameters, optimizer, losses, random state); its losses."""
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    steps = {} if args.solver_steps is None else {"steps": args.solver_steps}  # default: the preset's
    guide = AutoFFJORD(model, hidden_dims=args.hidden_dims, preset="fast", eval_solver=args.hmc_solver,
                       T=args.end_time, activation=args.activation, **steps)
    lrd = args.lr_decay ** (1.0 / max(1, args.guide_steps))  # lr * lr_decay at the end
    optim = pyro.optim.ClippedAdam({"lr": args.lr, "lrd": lrd})
    svi = SVI(model, guide, optim, Trace_ELBO(num_particles=args.particles, vectorize_particles=True))
    run = dict(step=0, losses=[])

    def checkpoint() -> dict:
        return dict(run, **runs.svi_state(optim))

    if ck is not None:
        runs.restore_svi(svi, optim, ck)  # random draws undone below
        run.update((k, ck[k]) for k in run)
        runs.set_rng_state(ck["rng"])
    bar = tqdm(range(run["step"], args.guide_steps), initial=run["step"], total=args.guide_steps, desc="guide",
               disable=args.no_progress, leave=False)
    with training.loop(run["step"]):
        for step in bar:
            run["losses"].append(svi.step())
            run["step"] = step + 1
            if step % 100 == 0:
                bar.set_postfix(loss=f"{sum(run['losses'][-100:]) / len(run['losses'][-100:]):.3f}")
            # the trained guide is always saved: --resume after Ctrl-C in MCMC starts from it
            training.step(step + 1, checkpoint, due=step + 1 == args.guide_steps)
    bar.close()
    return guide, run["losses"]


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
    runs.add_run_args(p, out="out/neutra", resume=True, threads=1, threads_note="a 10-D funnel and sequential NUTS")
    args = runs.parse(p, argv)
    if args.device != "cpu":  # refused before any folder is made
        p.error("argument --device: this example runs on the CPU (NUTS is sequential and the solves are tiny)")
    return args


def main(args) -> dict:
    if args.device != "cpu":
        raise runs.RunError("this example runs on the CPU (NUTS is sequential and the solves are tiny)")
    runs.fill_defaults(args, full=FULL, quick=QUICK)
    out = runs.start(args)
    model = Funnel(args.dim)

    # 1. The guide (checkpoints by minutes, on Ctrl-C and at the end); --resume may change NUTS's options only.
    training = runs.Training(args, out / "checkpoint.pt", runs.run_config(args, free=NUTS_OPTIONS), unit="guide step")
    ck = training.resume()  # refuses other options; restores the random state
    if ck is not None:
        print(f"resumed from {training.path} at guide step {ck['step']} of {args.guide_steps}")
    guide, losses = train_guide(model, args, training, ck)
    try:  # NUTS cannot continue a chain: Ctrl-C from here on keeps the trained guide only
        return sample(guide, model, losses, training, args)
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C) after the guide's training, which {training.path} holds; the NeuTra checks "
              f"and NUTS runs cannot be resumed mid-chain. Continue with: {runs.resume_command()} (skips the "
              "guide's training, samples again from the start)", file=sys.stderr)
        raise SystemExit(130) from None


def sample(guide: AutoFFJORD, model: Funnel, losses: list, training: runs.Training, args) -> dict:
    """The trained guide's quality, the NeuTra checks, NUTS with and without NeuTra; the results."""
    timing = training.summary()  # the guide's training: resumed, segments, train_seconds
    seconds = timing["train_seconds"]
    quality, q_samples = guide_quality(guide, model, 200 if args.quick else 4000)
    print(f"guide: {args.guide_steps} steps in {training.describe()}, ELBO {quality['elbo']:.3f} "
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
          ("FFJORD guide q alone", *q_samples[: len(v_n), :2].T)], f"{args.out}/neutra.png",
         f"guide: {args.guide_steps} SVI steps, trained in {training.describe()}")
    target = {"name": "Neal's funnel", "dim": args.dim, "v_std": V_SCALE, "x1_std": math.exp(V_SCALE**2 / 4)}
    last = losses[-100:]
    fit = {"steps": args.guide_steps, "seconds": seconds, "loss_last100": sum(last) / len(last)}
    payload = {"target": target, "guide": {**fit, **quality}, **timing, "checks": checks, "results": rows,
               "resumed_from": training.segments[-1]["start"] if training.resumed else None}  # a guide step
    return runs.write_results(args, "neutra", payload)


if __name__ == "__main__":
    runs.cli(main, parse_args)
