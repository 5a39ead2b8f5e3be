r"""A learned FFJORD prior in a Pyro model: a VAE on binarized MNIST.

The usual VAE, :math:`z \sim p_\psi(z)`, :math:`x \mid z \sim \mathrm{Bernoulli}(\sigma(\mathrm{dec}(z)))`,
guide :math:`q(z \mid x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma^2(x))` (an MLP encoder), with two
priors fitted by SVI (``Trace_ELBO``, one particle) on the same budget: ``normal``,
:math:`\mathcal N(0, I)`, and ``ffjord``, ``TransformedDistribution(Normal(0, 1), [FFJORD(latent)])``
registered with ``pyro.module("prior_flow", flow)`` so SVI learns it with everything else.

The prior scores the *guide's* sample, not the flow's own output, so every step takes the flow's
cache-miss path: one reverse solve for :math:`\log p_\psi(z)`. Training uses the cheap options
(Hutchinson's trace, backprop through ``--steps`` fixed rk4 steps); evaluation the flow's eval mode
(exact trace, dopri5 1e-5), so the test ELBO (one :math:`z` per test image, as in the FFJORD paper)
is that of the continuous-time model. Data: MNIST from the published IDX files (``--data-dir``),
statically binarized with a fixed seed, 50k/10k/10k. Results and discussion: docs/flow_prior.md.
``--time-options`` only times SVI steps for several flow options. Networks, SVI set-up and the
test ELBO: ``flow_prior_model.py``. Checkpoints (``checkpoint_<prior>.pt``) are written every
epoch, every ``--checkpoint-minutes`` (mid-epoch) and on Ctrl-C (which then exits); ``--resume``
continues them exactly and refuses one written with other options (lr, seed, sizes...). Run::

    python examples/flow_prior.py                 # the documented run (see docs/flow_prior.md)
    python examples/flow_prior.py --quick         # seconds, for tests (out/flow_prior-quick)
    python examples/flow_prior.py --prior ffjord --epochs 30 --resume   # continue a run
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from flow_prior_model import VAE, evaluate, flow_options, make_svi  # noqa: F401 (VAE: fp.VAE)
from pyro_ffjord import runs
from pyro_ffjord.datasets import mnist

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
FULL = dict(epochs=20, latent_dim=16, hidden=[512, 256], flow_hidden=[64, 64, 64], batch_size=100,
            eval_batch_size=1000)
QUICK = dict(epochs=1, latent_dim=4, hidden=[64], flow_hidden=[16, 16], batch_size=50, eval_batch_size=200,
             subset=200, test_subset=200)
# Options a resumed run may change (budget, file places, test-time sizes); all others must match.
FREE = ("epochs", "prior", "data_dir", "test_subset", "eval_batch_size", "time_options")


def train(prior: str, args, train_x: Tensor, test_x: Tensor) -> dict:
    """Fit one VAE by SVI (checkpoints: every epoch, every --checkpoint-minutes, on Ctrl-C);
    evaluate it on the test set."""
    opts = flow_options(args) if prior == "ffjord" else None
    vae, optim, svi = make_svi(args, opts)
    config = dict(runs.run_config(args, free=FREE), prior=prior)
    training = runs.Training(args, Path(args.out) / f"checkpoint_{prior}.pt", config, unit="step")
    # where training stands: epochs done, batches done in the next one (and their loss sum)
    run = dict(epoch=0, batch=0, total=0.0, clock=0.0, history=[], epoch_seconds=[], train_nfe=[])
    ckpt = training.resume(missing_ok=True)  # also restores the random state; refuses other options
    if ckpt is not None:
        vae.load_state_dict(ckpt["model"])
        optim.set_state(ckpt["optim"])
        run.update((k, ckpt[k]) for k in run)
        print(f"[{prior}] resumed from {training.path} after epoch {run['epoch']}, step {run['batch']}")

    def checkpoint() -> dict:
        return dict(run, model=vae.state_dict(), optim=optim.get_state())

    n, bs = len(train_x), args.batch_size
    per_epoch = math.ceil(n / bs)
    with training.loop(run["epoch"] * per_epoch + run["batch"]):
        while run["epoch"] < args.epochs:
            epoch = run["epoch"]
            order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
            run["clock"] = training.elapsed() if run["batch"] == 0 else run["clock"]  # when the epoch began
            bar = tqdm(range(run["batch"], per_epoch), initial=run["batch"], total=per_epoch,
                       desc=f"{prior} epoch {epoch + 1}/{args.epochs}", disable=args.no_progress, leave=False)
            for i in bar:
                x = train_x[order[i * bs:(i + 1) * bs]].to(args.device)
                step_loss = svi.step(x)
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"[{prior}] non-finite loss at epoch {epoch + 1}, step {i}")
                run["total"] += step_loss
                run["train_nfe"] += [] if vae.flow is None else [vae.flow.nfe_forward]
                run["batch"] = i + 1
                if i % 50 == 0:
                    bar.set_postfix(loss=f"{step_loss / len(x):.2f}")
                training.step(epoch * per_epoch + i + 1, checkpoint)  # by minutes, or Ctrl-C: save (and stop)
            run["epoch_seconds"].append(training.elapsed() - run["clock"])
            run["history"].append(run["total"] / n)
            run.update(epoch=epoch + 1, batch=0, total=0.0)
            print(f"[{prior}] epoch {epoch + 1}: train -ELBO {run['history'][-1]:.2f} (Hutchinson/rk4 estimate "
                  f"for ffjord), {run['epoch_seconds'][-1]:.1f} s", flush=True)
            training.step(run["epoch"] * per_epoch, checkpoint, due=True)

    history, epoch_seconds, train_nfe = run["history"], run["epoch_seconds"], run["train_nfe"]
    timing = training.summary()  # resumed, segments (steps from, to, seconds), train_seconds
    result = {"prior": prior, "params": sum(p.numel() for p in vae.parameters()),
              "prior_params": sum(p.numel() for p in vae.flow.parameters()) if opts else 0,
              "epochs": args.epochs, "train_neg_elbo_per_epoch": history, "epoch_seconds": epoch_seconds,
              "seconds_per_epoch": sum(epoch_seconds) / max(1, len(epoch_seconds)), **timing,
              **({"train_nfe_per_solve": sum(train_nfe) / len(train_nfe)} if train_nfe else {})}
    torch.manual_seed(args.seed + 1)  # same test z noise for both priors
    result.update(evaluate(vae, test_x, args.eval_batch_size, args.device))
    if opts and args.solver != "dopri5":
        # the same model scored with the training solver: far from dopri5, the fixed steps no longer resolve it
        same = VAE(args.latent_dim, args.hidden, dict(opts, eval_solver=args.solver)).to(args.device)
        same.load_state_dict(vae.state_dict())
        torch.manual_seed(args.seed + 1)
        check = evaluate(same, test_x, args.eval_batch_size, args.device)
        result["test_neg_elbo_training_solver"] = check["test_neg_elbo"]
    print(f"[{prior}] test -ELBO {result['test_neg_elbo']:.2f} nats/image (rec {-result['test_rec']:.2f}, KL "
          f"{result['test_kl']:.2f}); {result['seconds_per_epoch']:.1f} s/epoch; "
          f"eval {result['eval_seconds']:.1f} s", flush=True)
    torch.manual_seed(args.seed + 2)
    with torch.no_grad():  # Bernoulli means of 64 decoded prior samples
        z = vae.prior(64, test_x[:1].to(args.device)).sample()
        result["_samples"] = torch.sigmoid(vae.decoder(z)).reshape(64, 28, 28).cpu()
    return result


TIMED_OPTIONS = {
    "normal prior (no flow)": None,
    "hutchinson, rk4 x3 (default)": dict(trace="hutchinson", solver="rk4"),
    "exact, rk4 x3 (preset 'fast')": dict(trace="exact", solver="rk4"),
    "hutchinson, dopri5 1e-5": dict(trace="hutchinson", solver="dopri5"),
    "exact, dopri5 1e-5": dict(trace="exact", solver="dopri5"),
}


def time_options(args, train_x: Tensor, warmup: int = 10, steps: int = 50) -> List[dict]:
    """Milliseconds per SVI step of a fresh VAE for several flow options, on the same batches (an
    adaptive solver's NFE grows as the flow trains: its figure here is a lower bound)."""
    rows, bs, batches = [], args.batch_size, max(1, len(train_x) // args.batch_size)
    for name, over in TIMED_OPTIONS.items():
        vae, _, svi = make_svi(args, None if over is None else flow_options(args, **over))
        nfe = []
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            svi.step(train_x[(i % batches) * bs:(i % batches + 1) * bs].to(args.device))
            nfe += [vae.flow.nfe_forward] if vae.flow is not None and i >= warmup else []
        ms = 1000 * (time.perf_counter() - t0) / steps
        rows.append({"options": name, "ms_per_step": ms, "nfe_per_solve": sum(nfe) / len(nfe) if nfe else 0.0})
        print(f"{name:>32}: {ms:7.1f} ms/step, NFE/solve {rows[-1]['nfe_per_solve']:.1f}", flush=True)
    return rows


def plot_samples(samples: Dict[str, Tensor], titles: Dict[str, str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4.6), dpi=90, squeeze=False)
    for ax, (prior, imgs) in zip(axes[0], samples.items()):  # 64 images in an 8 x 8 grid, grey gutters
        grid = nn.functional.pad(imgs, (0, 1, 0, 1), value=0.2).reshape(8, 8, 29, 29).permute(0, 2, 1, 3)
        ax.imshow(grid.reshape(232, 232)[:-1, :-1].numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(titles[prior], fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    count, rate, weight = runs.positive_int, runs.positive_float, runs.nonnegative_float
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with the MNIST IDX files")
    p.add_argument("--epochs", type=runs.nonnegative_int, help="training epochs (20; quick: 1)")
    p.add_argument("--subset", type=count, help="train on the first N of the 50k training images (quick: 200)")
    p.add_argument("--test-subset", type=count, help="evaluate on the first N test images (quick: 200)")
    p.add_argument("--latent-dim", type=count, help="dimension of z (16; quick: 4)")
    p.add_argument("--hidden", type=count, nargs="+", help="encoder widths, decoder reversed (512 256; quick: 64)")
    p.add_argument("--prior", choices=["normal", "ffjord", "both"], default="both")
    p.add_argument("--batch-size", type=count, help="(100; quick: 50)")
    p.add_argument("--eval-batch-size", type=count, help="(1000; quick: 200)")
    p.add_argument("--lr", type=rate, default=1e-3)
    p.add_argument("--flow-hidden", type=count, nargs="+", help="FFJORD field widths (64 64 64; quick: 16 16)")
    p.add_argument("--trace", choices=["hutchinson", "exact"], default="hutchinson", help="in training")
    p.add_argument("--solver", default="rk4", help="training solver (rk4: fixed steps; dopri5: adaptive)")
    p.add_argument("--steps", type=count, default=3, help="fixed steps over [0, T] (ignored by dopri5)")
    p.add_argument("--T", type=rate, default=0.5, help="the flow's end time")
    p.add_argument("--kinetic", type=weight, default=0.0, help="RNODE kinetic-energy weight")
    p.add_argument("--jacobian", type=weight, default=0.0, help="RNODE Jacobian-norm weight")
    p.add_argument("--binarize-seed", type=runs.nonnegative_int, default=0, help="seed of the static binarization")
    p.add_argument("--time-options", action="store_true", help="only time SVI steps (writes time_options.json)")
    # one thread: MLPs of 512 and 256 units and a 64-wide field in 16-D (the documented runs too)
    runs.add_run_args(p, out="out/flow_prior", resume=True, threads=1,
                      threads_note="MLPs and a 64-wide field at batch 100 are too small for more")
    return runs.parse(p, argv)


def main(args) -> dict:
    runs.fill_defaults(args, FULL, QUICK)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    priors = ["normal", "ffjord"] if args.prior == "both" else [args.prior]
    if args.resume and not args.time_options and not any(
            (Path(args.out) / f"checkpoint_{p}.pt").exists() for p in priors):
        raise runs.MissingCheckpoint(f"--resume: no checkpoint_<prior>.pt in {args.out}; run once without --resume")
    out = runs.start(args)
    t_load = time.perf_counter()
    data = mnist.load(args.data_dir, binarization="static", seed=args.binarize_seed)
    train_x = data.train[: args.subset] if args.subset else data.train
    test_x = data.test[: args.test_subset] if args.test_subset else data.test
    print(f"MNIST: {len(train_x)} training images, {len(test_x)} test images, static binarization "
          f"(seed {args.binarize_seed}); loaded in {time.perf_counter() - t_load:.1f} s")
    if args.time_options:
        rows = time_options(args, train_x, *((2, 3) if args.quick else ()))
        return runs.write_results(args, "flow_prior", {"mode": "time_options", "rows": rows}, "time_options.json")

    results, samples = [], {}
    for prior in priors:
        results.append(train(prior, args, train_x, test_x))
        samples[prior] = results[-1].pop("_samples")
    titles = {r["prior"]: f"{r['prior']} prior: test -ELBO {r['test_neg_elbo']:.2f}\n"
                          f"{args.epochs} epochs, {len(train_x)} images, {runs.describe_training(r)}" for r in results}
    plot_samples(samples, titles, out / "flow_prior_samples.png")
    subset = f"first {len(train_x)}" if args.subset else "full 50k training split"
    payload = {"machine": {**runs.machine_info(args.device), "load_average_at_start": load_at_start},
               "data": {"name": "MNIST", "binarization": "static", "binarize_seed": args.binarize_seed,
                        "train_images": len(train_x), "test_images": len(test_x), "subset": subset},
               "unit": "nats per image; test ELBO with one z sample per image, flow in eval mode "
                       "(exact trace, dopri5 atol=rtol=1e-5)", "results": results}
    if len(results) == 2:
        normal, flow = results
        cmp = payload["comparison"] = {
            "neg_elbo_gain_nats": normal["test_neg_elbo"] - flow["test_neg_elbo"],
            "time_per_epoch_ratio": flow["seconds_per_epoch"] / max(normal["seconds_per_epoch"], 1e-9)}
        print(f"FFJORD prior vs N(0, I): test -ELBO {flow['test_neg_elbo']:.2f} vs {normal['test_neg_elbo']:.2f} "
              f"({cmp['neg_elbo_gain_nats']:+.2f} nats better), {cmp['time_per_epoch_ratio']:.1f}x time per epoch")
    return runs.write_results(args, "flow_prior", payload)  # machine: with the load at the start of the timings


if __name__ == "__main__":
    runs.cli(main, parse_args)
