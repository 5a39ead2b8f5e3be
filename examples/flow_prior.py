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
``--time-options`` only times SVI steps for several flow options. Run::

    python examples/flow_prior.py                 # the documented run (see docs/flow_prior.md)
    python examples/flow_prior.py --quick         # seconds, for tests
    python examples/flow_prior.py --prior ffjord --epochs 30 --resume   # continue a run
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import DenseNN

from pyro_ffjord import FFJORD, regularization, runs
from pyro_ffjord.datasets import mnist

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
FULL = dict(epochs=20, latent_dim=16, hidden=[512, 256], flow_hidden=[64, 64, 64], batch_size=100,
            eval_batch_size=1000)
QUICK = dict(epochs=1, latent_dim=4, hidden=[64], flow_hidden=[16, 16], batch_size=50, eval_batch_size=200,
             subset=200, test_subset=200)


class VAE(nn.Module):
    """MLP encoder and decoder; prior N(0, I), pushed through ``FFJORD(latent_dim, **flow_options)`` if given."""

    def __init__(self, latent_dim: int, hidden: List[int], flow_options: Optional[dict] = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = DenseNN(784, hidden, [2 * latent_dim])  # ReLU between the layers
        self.decoder = DenseNN(latent_dim, hidden[::-1], [784])
        self.flow = None if flow_options is None else FFJORD(latent_dim, **flow_options)

    def prior(self, batch: int, like: Tensor) -> dist.TorchDistribution:
        base = dist.Normal(like.new_zeros(batch, self.latent_dim), 1.0).to_event(1)
        return base if self.flow is None else dist.TransformedDistribution(base, [self.flow])

    def model(self, x: Tensor) -> None:
        pyro.module("decoder", self.decoder)
        if self.flow is not None:
            pyro.module("prior_flow", self.flow)  # the prior's parameters are learned by SVI
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x.shape[0], x))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).split(self.latent_dim, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


def evaluate(vae: VAE, data: Tensor, batch_size: int, device: str) -> Dict[str, float]:
    """Test ELBO per image (nats, one z per image) in eval mode (exact trace, the flow's eval
    solver), split into log p(x|z) and the KL estimate log q(z|x) - log p(z)."""
    vae.eval()
    sums, nfe, start = {"rec": 0.0, "kl": 0.0, "elbo": 0.0}, [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data[i:i + batch_size].to(device)
            guide_tr = poutine.trace(vae.guide).get_trace(x)
            model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
            rec, log_p, log_q = (tr.nodes[k]["fn"].log_prob(tr.nodes[k]["value"])
                                 for tr, k in ((model_tr, "x"), (model_tr, "z"), (guide_tr, "z")))
            for k, v in {"rec": rec, "kl": log_q - log_p, "elbo": rec + log_p - log_q}.items():
                sums[k] += float(v.sum())
            nfe += [] if vae.flow is None else [vae.flow.nfe_forward]
    vae.train()
    out = {"test_rec": sums["rec"] / len(data), "test_kl": sums["kl"] / len(data),
           "test_neg_elbo": -(sums["elbo"] / len(data)), "eval_seconds": time.perf_counter() - start}
    return {**out, "eval_nfe_per_solve": sum(nfe) / len(nfe)} if nfe else out


def flow_options(args) -> dict:
    # --steps is used by a fixed-grid solver (rk4) and ignored by an adaptive one (dopri5)
    return dict(hidden_dims=args.flow_hidden, trace=args.trace, solver=args.solver, steps=args.steps,
                eval_solver="dopri5", T=args.T, kinetic=args.kinetic, jacobian=args.jacobian)


def make_svi(args, flow_opts: Optional[dict]):
    """A fresh VAE (seeded: the same initialisation for every prior), its optimizer and SVI."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(args.latent_dim, args.hidden, flow_opts).to(args.device)
    elbo, optim = Trace_ELBO(), pyro.optim.Adam({"lr": args.lr})

    def rnode_loss(model, guide, x):  # RNODE: the ELBO plus the flow's penalty of the same step
        return elbo.differentiable_loss(model, guide, x) + len(x) * regularization(vae)
    regularized = flow_opts is not None and (flow_opts["kinetic"] > 0 or flow_opts["jacobian"] > 0)
    return vae, optim, SVI(vae.model, vae.guide, optim, rnode_loss if regularized else elbo)


def train(prior: str, args, train_x: Tensor, test_x: Tensor) -> dict:
    """Fit one VAE by SVI, checkpointing every epoch; evaluate it on the test set."""
    opts = flow_options(args) if prior == "ffjord" else None
    vae, optim, svi = make_svi(args, opts)
    ckpt_path = Path(args.out) / f"checkpoint_{prior}.pt"
    config = {"prior": prior, "latent_dim": args.latent_dim, "hidden": args.hidden, "subset": args.subset,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, **(opts or {})}
    history, epoch_seconds, train_nfe, start_epoch = [], [], [], 0
    if args.resume and ckpt_path.exists():
        ckpt = runs.load_checkpoint(ckpt_path, args.device)  # also restores the random state
        if ckpt["config"] != config:
            raise ValueError(f"{ckpt_path} was written with {ckpt['config']}, not {config}; "
                             "use the same options or another --out")
        vae.load_state_dict(ckpt["model"])
        optim.set_state(ckpt["optim"])
        history, epoch_seconds, start_epoch = ckpt["history"], ckpt["epoch_seconds"], ckpt["epoch"]
        print(f"[{prior}] resumed from {ckpt_path} after epoch {start_epoch}")

    n, bs = len(train_x), args.batch_size
    for epoch in range(start_epoch, args.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        total, t0 = 0.0, time.perf_counter()
        bar = tqdm(range(math.ceil(n / bs)), desc=f"{prior} epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress, leave=False)
        for i in bar:
            x = train_x[order[i * bs:(i + 1) * bs]].to(args.device)
            step_loss = svi.step(x)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"[{prior}] non-finite loss at epoch {epoch + 1}, step {i}")
            total += step_loss
            train_nfe += [] if vae.flow is None else [vae.flow.nfe_forward]
            if i % 50 == 0:
                bar.set_postfix(loss=f"{step_loss / len(x):.2f}")
        epoch_seconds.append(time.perf_counter() - t0)
        history.append(total / n)
        print(f"[{prior}] epoch {epoch + 1}: train -ELBO {history[-1]:.2f} (Hutchinson/rk4 estimate "
              f"for ffjord), {epoch_seconds[-1]:.1f} s", flush=True)
        state = {"epoch": epoch + 1, "config": config, "model": vae.state_dict(), "optim": optim.get_state()}
        runs.save_checkpoint(ckpt_path, dict(state, history=history, epoch_seconds=epoch_seconds), args.device)

    seconds = sum(epoch_seconds)
    result = {"prior": prior, "params": sum(p.numel() for p in vae.parameters()),
              "prior_params": sum(p.numel() for p in vae.flow.parameters()) if opts else 0,
              "epochs": args.epochs, "train_neg_elbo_per_epoch": history, "epoch_seconds": epoch_seconds,
              "seconds_per_epoch": seconds / max(1, len(epoch_seconds)), "train_seconds": seconds,
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
          f"{result['test_kl']:.2f}); {seconds / max(1, len(epoch_seconds)):.1f} s/epoch; "
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
        vae, _, svi = make_svi(args, None if over is None else {**flow_options(args), **over})
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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with the MNIST IDX files")
    p.add_argument("--epochs", type=int, help="training epochs (20; quick: 1)")
    p.add_argument("--subset", type=int, help="train on the first N of the 50k training images (quick: 200)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test images (quick: 200)")
    p.add_argument("--latent-dim", type=int, help="dimension of z (16; quick: 4)")
    p.add_argument("--hidden", type=int, nargs="+", help="encoder widths, decoder reversed (512 256; quick: 64)")
    p.add_argument("--prior", choices=["normal", "ffjord", "both"], default="both")
    p.add_argument("--batch-size", type=int, help="(100; quick: 50)")
    p.add_argument("--eval-batch-size", type=int, help="(1000; quick: 200)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--flow-hidden", type=int, nargs="+", help="FFJORD field widths (64 64 64; quick: 16 16)")
    p.add_argument("--trace", choices=["hutchinson", "exact"], default="hutchinson", help="in training")
    p.add_argument("--solver", default="rk4", help="training solver (rk4: fixed steps; dopri5: adaptive)")
    p.add_argument("--steps", type=int, default=3, help="fixed steps over [0, T] (ignored by dopri5)")
    p.add_argument("--T", type=float, default=0.5, help="the flow's end time")
    p.add_argument("--kinetic", type=float, default=0.0, help="RNODE kinetic-energy weight")
    p.add_argument("--jacobian", type=float, default=0.0, help="RNODE Jacobian-norm weight")
    p.add_argument("--binarize-seed", type=int, default=0, help="seed of the static binarization")
    p.add_argument("--time-options", action="store_true", help="only time SVI steps (writes time_options.json)")
    runs.add_run_args(p, out="out/flow_prior", resume=True)
    p.set_defaults(threads=1)  # the documented runs use one torch thread
    return p.parse_args(argv)


def main(args) -> dict:
    runs.fill_defaults(args, FULL, QUICK)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
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
    for prior in ["normal", "ffjord"] if args.prior == "both" else [args.prior]:
        results.append(train(prior, args, train_x, test_x))
        samples[prior] = results[-1].pop("_samples")
    titles = {r["prior"]: f"{r['prior']} prior: test -ELBO {r['test_neg_elbo']:.2f}\n"
                          f"{args.epochs} epochs, {len(train_x)} images" for r in results}
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
    main(parse_args())
