r"""A learned FFJORD prior in a Pyro model: a VAE on binarized MNIST.

The model is the usual VAE

.. math::

    z \sim p_\psi(z), \qquad x \mid z \sim \mathrm{Bernoulli}(\sigma(\mathrm{dec}_\theta(z))),

with the guide :math:`q_\phi(z \mid x) = \mathcal N(\mu_\phi(x), \mathrm{diag}\,\sigma^2_\phi(x))`
(an MLP encoder), and two priors trained under the same budget:

* ``normal``: :math:`p(z) = \mathcal N(0, I)`;
* ``ffjord``: :math:`p_\psi = T_{\psi\#}\mathcal N(0, I)`, i.e.
  ``TransformedDistribution(Normal(0, 1), [FFJORD(latent)])``, the flow registered in the model
  with ``pyro.module("prior_flow", flow)`` so SVI learns it with everything else.

Both are fitted by SVI with ``Trace_ELBO`` (one particle). The prior scores the *guide's*
sample, which is not the flow's own output: every step is the flow's cache-miss path, one
reverse ODE solve for :math:`\log p_\psi(z)`. Training uses the cheap options (Hutchinson's
trace estimator, backprop through ``--steps`` fixed rk4 steps); evaluation uses the flow's eval
mode: exact trace and adaptive dopri5 (tolerance 1e-5), so the reported test ELBO is the
ELBO of the continuous-time model, not of the training discretisation.

Reported (JSON and stdout): the test ELBO per image in nats (one :math:`z` sample per test
image, as in the FFJORD paper), split into the reconstruction term and the KL estimate
:math:`\log q(z\mid x) - \log p(z)`; seconds per training epoch; the flow's function
evaluations per solve; and a PNG of decoded samples :math:`\sigma(\mathrm{dec}(z))`,
:math:`z \sim p(z)`, of each model.

Data: MNIST from the published IDX files (``--data-dir``), statically binarized with a fixed
seed (``pyro_ffjord.datasets.mnist``), 50k/10k/10k; ``--subset N`` trains on the first N
training images. The test set is always the full 10k t10k images unless ``--test-subset``.

Run::

    python examples/flow_prior.py                 # the documented run (see docs/flow_prior.md)
    python examples/flow_prior.py --quick         # seconds, for tests
    python examples/flow_prior.py --prior ffjord --epochs 30 --resume   # continue a run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
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

from pyro_ffjord import FFJORD, regularization
from pyro_ffjord.datasets.mnist import load_mnist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the examples' own modules
from run_info import machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist"


# -- the model ----------------------------------------------------------------------------------
def mlp(sizes: List[int]) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """MLP encoder/decoder with a standard normal or a learned FFJORD prior.

    :param latent_dim: dimension of :math:`z`.
    :param hidden: widths of the encoder's and decoder's hidden layers.
    :param prior: ``"normal"`` or ``"ffjord"``.
    :param flow_options: keyword options of :class:`~pyro_ffjord.FFJORD` (``"ffjord"`` only).
    """

    def __init__(self, latent_dim: int, hidden: List[int], prior: str, flow_options: Optional[dict] = None):
        super().__init__()
        self.latent_dim, self.prior_kind = latent_dim, prior
        self.encoder = mlp([784, *hidden, 2 * latent_dim])
        self.decoder = mlp([latent_dim, *hidden[::-1], 784])
        self.flow = FFJORD(latent_dim, **(flow_options or {})) if prior == "ffjord" else None

    def prior(self, batch: int, like: Tensor) -> dist.TorchDistribution:
        base = dist.Normal(like.new_zeros(batch, self.latent_dim), 1.0).to_event(1)
        if self.flow is None:
            return base
        return dist.TransformedDistribution(base, [self.flow])

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
            h = self.encoder(x)
            loc, scale = h[:, : self.latent_dim], nn.functional.softplus(h[:, self.latent_dim:]) + 1e-4
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample_images(self, n: int, like: Tensor) -> Tensor:
        """Bernoulli means of decoded prior samples, ``(n, 28, 28)``."""
        z = self.prior(n, like).sample()
        return torch.sigmoid(self.decoder(z)).reshape(n, 28, 28)


def elbo_terms(vae: VAE, x: Tensor) -> Dict[str, Tensor]:
    """Per-image ELBO with one z sample, split into log p(x|z) and log q(z|x) - log p(z)."""
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    rec = model_tr.nodes["x"]["fn"].log_prob(model_tr.nodes["x"]["value"])
    log_p = model_tr.nodes["z"]["fn"].log_prob(model_tr.nodes["z"]["value"])
    log_q = guide_tr.nodes["z"]["fn"].log_prob(guide_tr.nodes["z"]["value"])
    return {"rec": rec, "kl": log_q - log_p, "elbo": rec + log_p - log_q}


def evaluate(vae: VAE, data: Tensor, batch_size: int, device: str) -> Dict[str, float]:
    """Test ELBO per image (nats) in eval mode: exact trace, the flow's eval solver."""
    vae.eval()
    sums = {"rec": 0.0, "kl": 0.0, "elbo": 0.0}
    nfe = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data[i:i + batch_size].to(device)
            for k, v in elbo_terms(vae, x).items():
                sums[k] += float(v.sum())
            if vae.flow is not None:
                nfe.append(vae.flow.nfe_forward)
    vae.train()
    out = {f"test_{k}": v / len(data) for k, v in sums.items()}
    out["test_neg_elbo"] = -out.pop("test_elbo")
    out["eval_seconds"] = time.perf_counter() - start
    if nfe:
        out["eval_nfe_per_solve"] = sum(nfe) / len(nfe)
    return out


# -- training -----------------------------------------------------------------------------------
def flow_options(args) -> dict:
    return dict(
        hidden_dims=args.flow_hidden,
        trace=args.trace,
        solver=args.solver,
        step_size=(args.T / args.steps) if args.solver in ("rk4", "euler", "midpoint") else None,
        eval_solver="dopri5",
        T=args.T,
        kinetic=args.kinetic,
        jacobian=args.jacobian,
    )


def config_of(args, prior: str) -> dict:
    """What a checkpoint must agree with to be resumed."""
    cfg = {"prior": prior, "latent_dim": args.latent_dim, "hidden": list(args.hidden),
           "subset": args.subset, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed}
    if prior == "ffjord":
        cfg.update({k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in flow_options(args).items()})
    return cfg


def train(prior: str, args, train_x: Tensor, test_x: Tensor) -> dict:
    """Fit one VAE by SVI; checkpoint every epoch; evaluate on the test set."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)  # same encoder/decoder initialisation for both priors
    vae = VAE(args.latent_dim, args.hidden, prior, flow_options(args) if prior == "ffjord" else None)
    vae.to(args.device)
    regularized = prior == "ffjord" and (args.kinetic > 0 or args.jacobian > 0)
    if regularized:
        # RNODE: Trace_ELBO's differentiable loss plus the flow's penalty of the same step
        elbo = Trace_ELBO()

        def loss(model, guide, x):
            return elbo.differentiable_loss(model, guide, x) + len(x) * regularization(vae)
    else:
        loss = Trace_ELBO()
    optim = pyro.optim.Adam({"lr": args.lr})
    svi = SVI(vae.model, vae.guide, optim, loss)

    ckpt_path = Path(args.out) / f"checkpoint_{prior}.pt"
    history: List[float] = []
    epoch_seconds: List[float] = []
    start_epoch = 0
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True, map_location=args.device)
        if ckpt["config"] != config_of(args, prior):
            raise ValueError(f"{ckpt_path} was written with {ckpt['config']}, not {config_of(args, prior)}; "
                             "use the same options or another --out")
        vae.load_state_dict(ckpt["model"])
        optim.set_state(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
        history, epoch_seconds = list(ckpt["history"]), list(ckpt["epoch_seconds"])
        start_epoch = int(ckpt["epoch"])
        print(f"[{prior}] resumed from {ckpt_path} after epoch {start_epoch}")

    n, bs = len(train_x), args.batch_size
    steps_per_epoch = math.ceil(n / bs)
    train_nfe = []
    for epoch in range(start_epoch, args.epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        total = 0.0
        t0 = time.perf_counter()
        bar = tqdm(range(steps_per_epoch), desc=f"{prior} epoch {epoch + 1}/{args.epochs}",
                   disable=args.no_progress, leave=False)
        for i in bar:
            x = train_x[order[i * bs:(i + 1) * bs]].to(args.device)
            step_loss = svi.step(x)
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"[{prior}] non-finite loss at epoch {epoch + 1}, step {i}")
            total += step_loss
            if vae.flow is not None:
                train_nfe.append(vae.flow.nfe_forward)
            if i % 50 == 0:
                bar.set_postfix(loss=f"{step_loss / len(x):.2f}")
        epoch_seconds.append(time.perf_counter() - t0)
        history.append(total / n)
        print(f"[{prior}] epoch {epoch + 1}: train -ELBO {history[-1]:.2f} (Hutchinson/rk4 estimate "
              f"for ffjord), {epoch_seconds[-1]:.1f} s", flush=True)
        torch.save({"epoch": epoch + 1, "config": config_of(args, prior), "model": vae.state_dict(),
                    "optim": optim.get_state(), "rng": torch.get_rng_state(), "history": history,
                    "epoch_seconds": epoch_seconds}, ckpt_path)

    result = {
        "prior": prior,
        "params": sum(p.numel() for p in vae.parameters()),
        "prior_params": sum(p.numel() for p in vae.flow.parameters()) if vae.flow is not None else 0,
        "epochs": args.epochs,
        "train_neg_elbo_per_epoch": history,
        "epoch_seconds": epoch_seconds,
        "seconds_per_epoch": sum(epoch_seconds) / max(1, len(epoch_seconds)),
        "train_seconds": sum(epoch_seconds),
    }
    if train_nfe:
        result["train_nfe_per_solve"] = sum(train_nfe) / len(train_nfe)
    torch.manual_seed(args.seed + 1)  # same test z noise for both priors
    result.update(evaluate(vae, test_x, args.eval_batch_size, args.device))
    if vae.flow is not None and args.solver != "dopri5":
        # Diagnostic: the same model scored with the training discretisation (exact trace). If
        # it drifts from the dopri5 figure, the fixed steps no longer resolve the dynamics.
        opts = dict(flow_options(args), eval_solver=args.solver)
        same = VAE(args.latent_dim, args.hidden, prior, opts).to(args.device)
        same.load_state_dict(vae.state_dict())
        torch.manual_seed(args.seed + 1)
        check = evaluate(same, test_x, args.eval_batch_size, args.device)
        result["test_neg_elbo_training_solver"] = check["test_neg_elbo"]
    print(f"[{prior}] test -ELBO {result['test_neg_elbo']:.2f} nats/image (rec {-result['test_rec']:.2f}, "
          f"KL {result['test_kl']:.2f}); {result['seconds_per_epoch']:.1f} s/epoch; "
          f"eval {result['eval_seconds']:.1f} s", flush=True)
    torch.manual_seed(args.seed + 2)
    result["_samples"] = vae.sample_images(64, test_x[:1].to(args.device)).cpu()
    return result


# -- choosing the flow's options -----------------------------------------------------------------
TIMED_OPTIONS = {
    "normal prior (no flow)": None,
    "hutchinson, rk4 x3 (default)": dict(trace="hutchinson", solver="rk4"),
    "exact, rk4 x3 (preset 'fast')": dict(trace="exact", solver="rk4"),
    "hutchinson, dopri5 1e-5": dict(trace="hutchinson", solver="dopri5"),
    "exact, dopri5 1e-5": dict(trace="exact", solver="dopri5"),
}


def time_options(args, train_x: Tensor, warmup: int = 10, steps: int = 50) -> List[dict]:
    """Milliseconds per SVI step of a freshly initialised VAE for several flow options (the
    same batches for each; an adaptive solver's NFE grows as the flow trains, so its figure
    here is a lower bound)."""
    rows = []
    for name, over in TIMED_OPTIONS.items():
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        opts = None if over is None else {**flow_options(args), **over}
        if opts is not None and over["solver"] == "dopri5":
            opts["step_size"] = None
        vae = VAE(args.latent_dim, args.hidden, "normal" if over is None else "ffjord", opts).to(args.device)
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}), Trace_ELBO())
        nfe = []
        batches = max(1, len(train_x) // args.batch_size)
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            j = i % batches
            svi.step(train_x[j * args.batch_size:(j + 1) * args.batch_size].to(args.device))
            if vae.flow is not None and i >= warmup:
                nfe.append(vae.flow.nfe_forward)
        ms = 1000 * (time.perf_counter() - t0) / steps
        rows.append({"options": name, "ms_per_step": ms,
                     "nfe_per_solve": sum(nfe) / len(nfe) if nfe else 0.0})
        print(f"{name:>32}: {ms:7.1f} ms/step, NFE/solve {rows[-1]['nfe_per_solve']:.1f}", flush=True)
    return rows


# -- output -------------------------------------------------------------------------------------
def plot_samples(samples: Dict[str, Tensor], titles: Dict[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(samples), figsize=(4.2 * len(samples), 4.6), dpi=90, squeeze=False)
    for ax, (prior, imgs) in zip(axes[0], samples.items()):
        k = int(math.ceil(math.sqrt(len(imgs))))
        grid = torch.full((k * 29 - 1, k * 29 - 1), 0.2)  # light grey gutters
        for j, img in enumerate(imgs):
            r, c = divmod(j, k)
            grid[r * 29:r * 29 + 28, c * 29:c * 29 + 28] = img
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(titles[prior], fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="folder with the MNIST IDX files")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--subset", type=int, default=None, help="train on the first N of the 50k training images")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--latent-dim", type=int, default=16)
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 256], help="encoder widths (decoder reversed)")
    p.add_argument("--prior", choices=["normal", "ffjord", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--flow-hidden", type=int, nargs="+", default=[64, 64, 64], help="FFJORD field widths")
    p.add_argument("--trace", choices=["hutchinson", "exact"], default="hutchinson",
                   help="the flow's trace in training (evaluation is always exact)")
    p.add_argument("--solver", default="rk4", help="training solver (rk4: fixed steps; dopri5: adaptive)")
    p.add_argument("--steps", type=int, default=3, help="fixed steps over [0, T] for rk4/euler/midpoint")
    p.add_argument("--T", type=float, default=0.5, help="the flow's end time")
    p.add_argument("--kinetic", type=float, default=0.0, help="RNODE kinetic-energy weight")
    p.add_argument("--jacobian", type=float, default=0.0, help="RNODE Jacobian-norm weight")
    p.add_argument("--binarize-seed", type=int, default=0, help="seed of the static binarization")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/flow_prior", help="output folder (JSON, PNG, checkpoints)")
    p.add_argument("--quick", action="store_true", help="tiny budget for tests (seconds)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--time-options", action="store_true",
                   help="only time SVI steps for several flow options (writes time_options.json)")
    return p.parse_args(argv)


def main(args) -> dict:
    if isinstance(args, (list, tuple)) or args is None:
        args = parse_args(args)
    if args.quick:
        args.subset = min(args.subset or 200, 200)
        args.test_subset = min(args.test_subset or 200, 200)
        args.epochs = min(args.epochs, 1)
        args.batch_size = min(args.batch_size, 50)
        args.eval_batch_size = min(args.eval_batch_size, 200)
        args.hidden = [64]
        args.flow_hidden = [16, 16]
        args.latent_dim = min(args.latent_dim, 4)
    torch.set_num_threads(args.threads)
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t_load = time.perf_counter()
    data = load_mnist(args.data_dir, binarize="static", seed=args.binarize_seed)
    train_x = data.train[: args.subset] if args.subset else data.train
    test_x = data.test[: args.test_subset] if args.test_subset else data.test
    print(f"MNIST: {len(train_x)} training images, {len(test_x)} test images, static binarization "
          f"(seed {args.binarize_seed}); loaded in {time.perf_counter() - t_load:.1f} s")

    if args.time_options:
        rows = time_options(args, train_x, *((2, 3) if args.quick else ()))
        payload = {"example": "flow_prior", "mode": "time_options", "machine": machine_info(args.device),
                   "args": vars(args), "rows": rows}
        path = out / "time_options.json"
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {path}")
        return payload

    priors = ["normal", "ffjord"] if args.prior == "both" else [args.prior]
    results, samples = [], {}
    for prior in priors:
        r = train(prior, args, train_x, test_x)
        samples[prior] = r.pop("_samples")
        results.append(r)

    titles = {r["prior"]: (f"{r['prior']} prior: test -ELBO {r['test_neg_elbo']:.2f}" +
                           f"\n{args.epochs} epochs, {len(train_x)} images") for r in results}
    png = out / "flow_prior_samples.png"
    plot_samples(samples, titles, png)
    payload = {
        "example": "flow_prior",
        "machine": {**machine_info(args.device), "load_average_at_start": load_at_start},
        "args": vars(args),
        "data": {"name": "MNIST", "binarization": "static", "binarize_seed": args.binarize_seed,
                 "train_images": len(train_x), "test_images": len(test_x),
                 "subset": "full 50k training split" if not args.subset else f"first {len(train_x)}"},
        "unit": "nats per image; test ELBO with one z sample per image, flow in eval mode "
                "(exact trace, dopri5 atol=rtol=1e-5)",
        "results": results,
    }
    if len(results) == 2:
        normal, flow = results
        payload["comparison"] = {
            "neg_elbo_gain_nats": normal["test_neg_elbo"] - flow["test_neg_elbo"],
            "time_per_epoch_ratio": flow["seconds_per_epoch"] / max(normal["seconds_per_epoch"], 1e-9),
        }
        print(f"FFJORD prior vs N(0, I): test -ELBO {flow['test_neg_elbo']:.2f} vs "
              f"{normal['test_neg_elbo']:.2f} ({payload['comparison']['neg_elbo_gain_nats']:+.2f} nats "
              f"better), {payload['comparison']['time_per_epoch_ratio']:.1f}x time per epoch")
    path = out / "flow_prior.json"
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    print(f"wrote {path} and {png}")
    return payload


if __name__ == "__main__":
    main(parse_args())
