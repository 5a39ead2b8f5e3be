r"""Variational autoencoders with normalizing-flow posteriors, FFJORD's VAE experiment in Pyro.

The model and the recipe are those of the FFJORD paper's variational-inference table
(Grathwohl, Chen et al., ICLR 2019, section 4.3), which reuses the Sylvester-flows code
(van den Berg et al., UAI 2018):

- Model: :math:`z \sim \mathcal N(0, I_{64})`, :math:`x \mid z \sim p_\theta(x \mid z)` with
  a gated transposed-convolution decoder; Bernoulli pixels for binary images (MNIST,
  Omniglot, Caltech 101 silhouettes), a 256-way categorical per pixel for Frey faces.
- Guide: a gated convolutional encoder maps :math:`x` to :math:`h` (256 numbers); the
  posterior is :math:`q(z \mid x) = T_{h}\#\,\mathcal N(\mu(h), \sigma(h)^2)`, a diagonal
  Gaussian pushed through a stack of flows amortized on :math:`h`
  (``pyro.distributions.ConditionalTransformedDistribution(...).condition(h)``):

  ========== ==========================================================================
  ``none``   the diagonal Gaussian alone
  ``planar`` ``pyro.distributions.transforms.conditional_planar``, ``--num-flows`` times
  ``iaf``    ``conditional_affine_autoregressive`` (inverse autoregressive flows)
  ``sylvester`` Householder-Sylvester flows amortized on :math:`h` as in van den Berg et
             al. (:class:`ConditionalSylvester` below; Pyro's ``Sylvester`` is not
             conditional)
  ``householder`` Pyro's ``conditional_householder`` (volume-preserving rotations)
  ``ffjord`` ``pyro_ffjord.ConditionalFFJORD`` blocks: ``--ffjord-config paper`` is the
             paper's per-data-set low-rank amortization (``conditioning="lowrank"``),
             ``lean`` a much smaller context-conditioned field (``conditioning="concat"``)
  ========== ==========================================================================

- Training: the ELBO of Pyro's ``Trace_ELBO`` (plus RNODE penalties of the FFJORD blocks
  if ``--kinetic``/``--jacobian`` are set, through ``pyro_ffjord.regularization``), KL
  warm-up :math:`\beta = \min(\mathrm{epoch}/\mathrm{warmup}, 1)` (epochs counted from 1:
  0.01 to 1 over 100 epochs by default) applied with ``poutine.scale`` to the latent site
  ``z`` in *both* the model (prior) and the guide (posterior), so the loss is
  :math:`-E_q[\log p(x \mid z)] + \beta\,E_q[\log q(z \mid x) - \log p(z)]`; Adamax
  (lr 5e-4, eps 1e-7, the reference code's), batch 100, early stopping when the validation
  :math:`-\mathrm{ELBO}` (:math:`\beta = 1`) has not improved for ``--patience`` epochs
  after warm-up; the best model on validation is the one tested.
- Evaluation (the paper's): :math:`\beta = 1`, flows in eval mode (FFJORD: exact trace and
  adaptive dopri5), one :math:`z` per test point, mean over the test set. Beyond the paper,
  an importance-sampled NLL :math:`-\log \frac1K \sum_k p(x, z_k) / q(z_k \mid x)` with
  ``--is-samples`` samples per point.
- Units: nats per image for binary data. Frey faces: bits per dimension,
  :math:`-\mathrm{ELBO} / (560 \ln 2)`, the unit of the Frey column of the paper's table
  (the Sylvester/FFJORD code divides the loss in nats by ``prod(input_size) * ln 2``); both
  are in the results.

Outputs ``<out>/results.json`` and ``<out>/checkpoint.pt`` (state dicts and plain values,
read back with ``torch.load(weights_only=True)``; ``--resume`` continues from it).

Run::

    python examples/vae.py --dataset freyfaces --flow ffjord --epochs 20 --width 0.25
    python examples/vae.py --dataset mnist --flow planar --quick     # seconds

The full paper budget (up to 2000 epochs, full-width nets, the paper's FFJORD configuration:
145M parameters on MNIST) needs a GPU; see ``docs/vae.md`` for the budget-matched CPU table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional

import torch
from tqdm.auto import tqdm

import pyro
from pyro.infer import Trace_ELBO

from pyro_ffjord import regularization

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the example's own modules
from run_info import atomic_save, machine_info  # noqa: E402
from vae_data import DATASETS, _plain, load, unit_of  # noqa: E402
from vae_model import FLOWS, VAE, build_flows, count_params, ffjord_settings, nfe_total  # noqa: E402


# --- training and evaluation ----------------------------------------------------------------------
def batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


@torch.no_grad()
def evaluate(vae: VAE, x: torch.Tensor, args, seed: int, is_samples: int = 0, is_points: Optional[int] = None,
             desc: str = "eval") -> dict:
    """Negative ELBO (beta = 1, one sample per point) and, if ``is_samples``, the importance-
    sampled NLL with that many samples per point, in nats per image; flows in eval mode."""
    was_training = vae.training
    vae.eval()
    rng = torch.get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        elbos = []
        for idx in tqdm(list(batches(len(x), args.eval_batch_size)), desc=desc, disable=args.no_progress, leave=False):
            elbos.append(vae.log_weights(x[idx].to(args.device)).cpu())
        elbo = torch.cat(elbos).double()
        out = {
            "neg_elbo": float(-elbo.mean()),
            "neg_elbo_se": float(elbo.std() / math.sqrt(len(elbo))) if len(elbo) > 1 else 0.0,
            "points": len(elbo),
            "finite": bool(torch.isfinite(elbo).all()),
        }
        if is_samples:
            xs = x[: is_points or len(x)]
            per = max(1, args.eval_batch_size // is_samples)  # points per chunk
            reps = min(is_samples, args.eval_batch_size)  # samples per pass
            nll = []
            for idx in tqdm(list(batches(len(xs), per)), desc="IS", disable=args.no_progress, leave=False):
                xb = xs[idx].to(args.device)
                lw = []
                done = 0
                while done < is_samples:
                    k = min(reps, is_samples - done)
                    lw.append(vae.log_weights(xb.repeat(k, *[1] * (xb.dim() - 1))).reshape(k, len(xb)).cpu())
                    done += k
                lw = torch.cat(lw).double()
                nll.append(-(torch.logsumexp(lw, 0) - math.log(is_samples)))
            nll = torch.cat(nll)
            out.update(nll_is=float(nll.mean()), nll_is_se=float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else 0.0,
                       is_samples=is_samples, is_points=len(nll))
    finally:
        torch.set_rng_state(rng)
        vae.train(was_training)
    return out


def main(args) -> dict:
    if args.quick:
        args.epochs = 1 if args.epochs is None else args.epochs
        args.subset = args.subset or 100
        args.width = 0.125 if args.width is None else args.width
        args.valid_points = args.valid_points or 50
        args.test_points = args.test_points or 50
        args.is_samples = min(args.is_samples, 4)
        args.num_flows = min(args.num_flows, 2)
        args.hypernet_hidden = [32]
        args.iaf_hidden = 64
        args.num_householder = min(args.num_householder, 2)
        if args.ffjord_hidden_dims is None:
            args.ffjord_hidden_dims = [32]
        if args.ffjord_config == "lean" and args.ffjord_steps is None:
            args.ffjord_steps = 2
        args.ffjord_tol = max(args.ffjord_tol, 1e-3)
    args.epochs = 100 if args.epochs is None else args.epochs
    args.width = 1.0 if args.width is None else args.width
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_wall = time.perf_counter()

    data = load(args.dataset, args.data_dir, seed=args.data_seed, binarization=args.binarization)
    train = data.train[: args.subset] if args.subset else data.train
    valid = data.valid[: args.valid_points] if args.valid_points else data.valid
    test = data.test[: args.test_points] if args.test_points else data.test
    dynamic = data.likelihood == "bernoulli" and not bool(((train == 0) | (train == 1)).all())

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(data.image_shape, data.likelihood, args.latent_dim, args.width, build_flows(args, args.latent_dim))
    vae.to(args.device)
    optimizer = torch.optim.Adamax(vae.parameters(), lr=args.lr, eps=1e-7)
    elbo = Trace_ELBO()
    shuffle = torch.Generator().manual_seed(args.seed)
    binarize = torch.Generator().manual_seed(args.seed + 1)

    start_epoch, best, best_epoch, bad_epochs, history = 1, math.inf, 0, 0, []
    best_state = None
    train_seconds = 0.0
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=args.device, weights_only=True)
        vae.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        best_state = ck["best_model"]
        start_epoch, best, best_epoch = ck["epoch"] + 1, ck["best_valid"], ck["best_epoch"]
        bad_epochs, history, train_seconds = ck["bad_epochs"], ck["history"], ck["train_seconds"]
        torch.set_rng_state(ck["rng"])
        shuffle.set_state(ck["shuffle_rng"])
        binarize.set_state(ck["binarize_rng"])
        if ck.get("stopped"):
            start_epoch = args.epochs + 1

    def valid_neg_elbo(epoch):
        return evaluate(vae, valid, args, seed=args.seed + 2, desc="valid")["neg_elbo"]

    if start_epoch == 1 and args.validate_initial:
        history.append({"epoch": 0, "valid_neg_elbo": valid_neg_elbo(0)})

    stopped = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, args.epochs + 1):
        beta = min(epoch / args.warmup_epochs, 1.0) if args.warmup_epochs > 0 else 1.0
        vae.train()
        losses, t0, nfe0 = [], time.perf_counter(), nfe_total(vae)
        bar = tqdm(list(batches(len(train), args.batch_size, shuffle)), desc=f"epoch {epoch}",
                   disable=args.no_progress, leave=False)
        for idx in bar:
            x = train[idx]
            if dynamic:
                x = torch.bernoulli(x, generator=binarize)
            x = x.to(args.device)
            loss = elbo.differentiable_loss(vae.model, vae.guide, x, beta) / x.shape[0]
            total = loss + regularization(vae.flows).to(loss.device)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            losses.append(loss.detach().item())
            bar.set_postfix(loss=f"{losses[-1]:.2f}")
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds
        record = {
            "epoch": epoch, "beta": beta, "train_loss": sum(losses) / len(losses), "train_losses": losses,
            "seconds": epoch_seconds,
        }
        if args.flow == "ffjord":
            record["nfe_forward_per_step"] = (nfe_total(vae) - nfe0) / len(losses)
        if epoch % args.valid_every == 0 or epoch == args.epochs:
            v0 = time.perf_counter()
            v = valid_neg_elbo(epoch)
            record.update(valid_neg_elbo=v, valid_seconds=time.perf_counter() - v0)
            if v < best:
                best, best_epoch, bad_epochs = v, epoch, 0
                best_state = {k: t.detach().clone() for k, t in vae.state_dict().items()}
            elif epoch > args.warmup_epochs:
                bad_epochs += args.valid_every
            stopped = bad_epochs > args.patience
        history.append(record)
        if not args.no_progress:
            tqdm.write(f"epoch {epoch}: beta {beta:.3f} train loss {record['train_loss']:.3f}"
                       + (f" valid -ELBO {record['valid_neg_elbo']:.3f}" if "valid_neg_elbo" in record else ""))
        if args.checkpoint_every and (epoch % args.checkpoint_every == 0 or stopped or epoch == args.epochs):
            atomic_save({
                "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "best_model": best_state,
                "epoch": epoch, "best_valid": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "history": history, "train_seconds": train_seconds, "rng": torch.get_rng_state(),
                "shuffle_rng": shuffle.get_state(), "binarize_rng": binarize.get_state(), "stopped": stopped,
            }, ckpt_path)
        if stopped:
            break

    if best_state is not None:
        vae.load_state_dict(best_state)
    t0 = time.perf_counter()
    res = evaluate(vae, test, args, seed=args.seed + 3, is_samples=args.is_samples, is_points=args.is_points,
                   desc="test")
    eval_seconds = time.perf_counter() - t0
    unit = unit_of(data.likelihood, data.image_shape)
    per = unit["nats_per_unit"]
    epochs_trained = [h for h in history if h["epoch"] > 0]
    results = {
        "dataset": args.dataset,
        "flow": args.flow,
        "epochs": args.epochs,
        "epochs_trained": len(epochs_trained),
        "last_epoch": epoch if epochs_trained else 0,
        "best_epoch": best_epoch,
        "stopped_early": stopped,
        "params": count_params(vae),
        "params_encoder": count_params(vae.encoder),
        "params_decoder": count_params(vae.decoder),
        "params_flow": count_params(vae.flows),
        "device": args.device,
        "wall_s": time.perf_counter() - start_wall,
        "train_s": train_seconds,
        "seconds_per_epoch": train_seconds / len(epochs_trained) if epochs_trained else None,
        "eval_s": eval_seconds,
        "test_neg_elbo": res["neg_elbo"] / per,
        "test_neg_elbo_se": res["neg_elbo_se"] / per,
        "test_neg_elbo_nats": res["neg_elbo"],
        "test_nll_is": res["nll_is"] / per if "nll_is" in res else None,
        "test_nll_is_se": res["nll_is_se"] / per if "nll_is" in res else None,
        "test_nll_is_nats": res.get("nll_is"),
        "is_samples": res.get("is_samples", 0),
        "is_points": res.get("is_points", 0),
        "test_points": res["points"],
        "best_valid_neg_elbo_nats": best if math.isfinite(best) else None,
        **unit,
        "evaluation": "beta = 1, flows in eval mode (FFJORD: exact trace, dopri5), one z per test point, "
                      "mean over the test points; IS-NLL: -log mean_k p(x, z_k)/q(z_k|x), z_k ~ q",
        "likelihood": data.likelihood,
        "image_shape": list(data.image_shape),
        "data": dict(data.info, train_used=len(train), valid_used=len(valid), test_used=len(test),
                     dynamic_binarization=dynamic, data_seed=args.data_seed),
        "budget": {
            "epochs": args.epochs, "subset": args.subset, "width": args.width, "latent_dim": args.latent_dim,
            "batch_size": args.batch_size, "lr": args.lr, "warmup_epochs": args.warmup_epochs,
            "patience": args.patience, "valid_every": args.valid_every, "valid_points": len(valid),
            "test_points": len(test), "is_samples": args.is_samples, "is_points": args.is_points,
            "paper_budget": "up to 2000 epochs, warm-up 100, patience 35 (code), full width, full data",
        },
        "ffjord": ffjord_settings(args) if args.flow == "ffjord" else None,
        "flow_settings": {"num_flows": args.num_flows, "hypernet_hidden": args.hypernet_hidden,
                          "iaf_hidden": args.iaf_hidden, "num_householder": args.num_householder},
        "machine": machine_info(args.device),
        "args": {k: v for k, v in vars(args).items() if _plain(v)},
        "history": history,
        "finite": res["finite"],
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not args.no_progress:
        print(f"{args.dataset} {args.flow}: test -ELBO {results['test_neg_elbo']:.4f} {unit['unit']}, "
              f"IS-NLL {results['test_nll_is'] if results['test_nll_is'] is None else round(results['test_nll_is'], 4)}, "
              f"{results['params']} params, {results['seconds_per_epoch']} s/epoch")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--flow", choices=FLOWS, default="ffjord")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 100; the paper: up to 2000)")
    p.add_argument("--data-dir", default=None, help="data folder (default ../shared/data/<dataset folder>)")
    p.add_argument("--out", default=None, help="output folder (default out/vae/<dataset>-<flow>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="initialisation, minibatches, binarization, noise")
    p.add_argument("--data-seed", type=int, default=None,
                   help="data split / static binarization seed (default: the loader's; Frey faces 123)")
    p.add_argument("--subset", type=int, default=None, help="use the first N training examples")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--binarization", choices=("static", "dynamic"), default="static", help="MNIST")
    # model and flows
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--width", type=float, default=None, help="channel multiplier of the conv nets (default 1)")
    p.add_argument("--num-flows", type=int, default=4, help="planar / iaf / sylvester flows in sequence")
    p.add_argument("--hypernet-hidden", type=int, nargs="+", default=[256],
                   help="hidden widths of Pyro's DenseNN hypernets (planar, householder)")
    p.add_argument("--iaf-hidden", type=int, default=640, help="hidden width of each IAF's conditional MADE")
    p.add_argument("--num-householder", type=int, default=8, help="reflections per Sylvester flow")
    p.add_argument("--ffjord-config", choices=("paper", "lean"), default="lean")
    p.add_argument("--ffjord-rank", type=int, default=None)
    p.add_argument("--ffjord-hidden-dims", type=int, nargs="+", default=None)
    p.add_argument("--ffjord-blocks", type=int, default=None)
    p.add_argument("--ffjord-activation", default=None)
    p.add_argument("--ffjord-conditioning", choices=("concat", "lowrank", "bias"), default=None)
    p.add_argument("--ffjord-solver", default=None, help="training solver (paper: dopri5; lean: rk4)")
    p.add_argument("--ffjord-steps", type=int, default=None, help="steps of a fixed-step training solver")
    p.add_argument("--ffjord-tol", type=float, default=1e-5, help="atol = rtol of dopri5")
    p.add_argument("--ffjord-T", type=float, default=0.5)
    p.add_argument("--adjoint", action="store_true", help="adjoint gradients (the reference code's)")
    p.add_argument("--kinetic", type=float, default=0.0, help="RNODE kinetic-energy weight")
    p.add_argument("--jacobian", type=float, default=0.0, help="RNODE Jacobian-norm weight")
    # training
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup-epochs", type=int, default=100, help="beta = min(epoch / warmup, 1)")
    p.add_argument("--patience", type=int, default=35, help="epochs without validation gain after warm-up")
    p.add_argument("--valid-every", type=int, default=1)
    p.add_argument("--validate-initial", action="store_true", help="also score the untrained model")
    p.add_argument("--checkpoint-every", type=int, default=1, help="0: never")
    # evaluation
    p.add_argument("--valid-points", type=int, default=None, help="validate on the first N points")
    p.add_argument("--test-points", type=int, default=None, help="test on the first N points (default all)")
    p.add_argument("--is-samples", type=int, default=100, help="importance samples per test point (0: skip)")
    p.add_argument("--is-points", type=int, default=None, help="IS-NLL on the first N test points")
    p.add_argument("--eval-batch-size", type=int, default=500)
    # runtime
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--quick", action="store_true", help="tiny budget for tests (seconds)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.data_dir is None:
        here = os.path.dirname(os.path.abspath(__file__))
        folder = {"mnist": "mnist", "omniglot": "omniglot", "freyfaces": "freyfaces",
                  "caltech": "caltech101_silhouettes"}[args.dataset]
        args.data_dir = os.path.join(here, "..", "..", "shared", "data", folder)
    if args.out is None:
        args.out = os.path.join("out", "vae", f"{args.dataset}-{args.flow}")
    return args


if __name__ == "__main__":
    main(parse_args())
