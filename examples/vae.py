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
             al. (``vae_flows.ConditionalSylvester``; Pyro's ``Sylvester`` is not
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
- Units: nats per image for binary data; Frey faces in bits per dimension,
  :math:`-\mathrm{ELBO} / (560 \ln 2)`, as in the paper's table (the results have both).

Outputs ``<out>/results.json`` and ``<out>/checkpoint.pt`` (``--resume`` continues from it).
Networks: ``vae_model.py``; flows: ``vae_flows.py``; data: ``vae_data.py``; scores: ``vae_eval.py``.

Run::

    python examples/vae.py --dataset freyfaces --flow ffjord --epochs 20 --width 0.25
    python examples/vae.py --dataset mnist --flow planar --quick     # seconds

The full paper budget (up to 2000 epochs, full-width nets, the paper's FFJORD configuration:
145M parameters on MNIST) needs a GPU; see ``docs/vae.md`` for the budget-matched CPU table.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import pyro
import torch
from pyro.infer import Trace_ELBO
from tqdm.auto import tqdm

from pyro_ffjord import regularization
from pyro_ffjord.runs import add_run_args, fill_defaults, load_checkpoint, save_checkpoint, start, write_results
from vae_data import DATASETS, load, unit_of
from vae_eval import EVALUATION, batches, evaluate, figures
from vae_flows import add_flow_args, build_flows, ffjord_settings, nfe_total
from vae_model import H_DIM, VAE, count_params

FOLDERS = {"mnist": "mnist", "omniglot": "omniglot", "freyfaces": "freyfaces", "caltech": "caltech101_silhouettes"}
# Defaults of the options left unset on the command line: a full run, and --quick (seconds).
FULL = dict(epochs=100, width=1.0, is_samples=100, num_flows=4, hypernet_hidden=[256], iaf_hidden=640,
            num_householder=8, ffjord_tol=1e-5)
QUICK = dict(epochs=1, subset=100, width=0.125, valid_points=50, test_points=50, is_samples=4, num_flows=2,
             hypernet_hidden=[32], iaf_hidden=64, num_householder=2, ffjord_hidden_dims=[32], ffjord_tol=1e-3)
BUDGET = ("epochs", "subset", "width", "latent_dim", "batch_size", "lr", "warmup_epochs", "patience", "valid_every",
          "is_samples", "is_points")
FLOW_SETTINGS = ("num_flows", "hypernet_hidden", "iaf_hidden", "num_householder")
PAPER_BUDGET = "up to 2000 epochs, warm-up 100, patience 35 (code), full width, full data"


def train_epoch(vae, optimizer, elbo, train, beta, args, shuffle, binarize, dynamic, desc) -> list:
    """One pass over ``train`` in shuffled minibatches; the per-step losses (-ELBO per image)."""
    vae.train()
    losses = []
    bar = tqdm(list(batches(len(train), args.batch_size, shuffle)), desc=desc, disable=args.no_progress, leave=False)
    for idx in bar:
        x = train[idx]
        if dynamic:  # a grey-level training set is re-binarized every batch
            x = torch.bernoulli(x, generator=binarize)
        x = x.to(args.device)
        loss = elbo.differentiable_loss(vae.model, vae.guide, x, beta) / x.shape[0]
        total = loss + regularization(vae.flows).to(loss.device)  # RNODE penalties, if any
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(loss.detach().item())
        bar.set_postfix(loss=f"{losses[-1]:.2f}")
    return losses


def main(args) -> dict:
    ckpt_path = start(args) / "checkpoint.pt"
    start_wall = time.perf_counter()

    data = load(args.dataset, args.data_dir, seed=args.data_seed, binarization=args.binarization)
    train = data.train[: args.subset] if args.subset else data.train
    valid = data.valid[: args.valid_points] if args.valid_points else data.valid
    test = data.test[: args.test_points] if args.test_points else data.test
    dynamic = data.likelihood == "bernoulli" and not bool(((train == 0) | (train == 1)).all())

    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(data.image_shape, data.likelihood, args.latent_dim, args.width, build_flows(args, args.latent_dim, H_DIM))
    vae.to(args.device)
    optimizer = torch.optim.Adamax(vae.parameters(), lr=args.lr, eps=1e-7)
    elbo = Trace_ELBO()
    shuffle = torch.Generator().manual_seed(args.seed)
    binarize = torch.Generator().manual_seed(args.seed + 1)
    # Where training stands: what a checkpoint holds beside the model, optimizer and generators.
    run = dict(epoch=0, best_valid=math.inf, best_epoch=0, bad_epochs=0, stopped=False, history=[],
               train_seconds=0.0, best_model=None)
    if args.resume and ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, args.device)  # restores the random state too
        vae.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        shuffle.set_state(ck["shuffle_rng"])
        binarize.set_state(ck["binarize_rng"])
        run.update((k, ck[k]) for k in run)

    def valid_neg_elbo():
        return evaluate(vae, valid, args.seed + 2, args.eval_batch_size, args.device, progress=not args.no_progress,
                        desc="valid")["neg_elbo"]

    if run["epoch"] == 0 and args.validate_initial:
        run["history"].append({"epoch": 0, "valid_neg_elbo": valid_neg_elbo()})

    for epoch in range(run["epoch"] + 1, args.epochs + 1):
        if run["stopped"]:
            break
        beta = min(epoch / args.warmup_epochs, 1.0) if args.warmup_epochs > 0 else 1.0  # KL warm-up
        t0, nfe0 = time.perf_counter(), nfe_total(vae)
        losses = train_epoch(vae, optimizer, elbo, train, beta, args, shuffle, binarize, dynamic, f"epoch {epoch}")
        seconds = time.perf_counter() - t0
        run["train_seconds"] += seconds
        record = {"epoch": epoch, "beta": beta, "train_loss": sum(losses) / len(losses), "train_losses": losses,
                  "seconds": seconds}
        if args.flow == "ffjord":
            record["nfe_forward_per_step"] = (nfe_total(vae) - nfe0) / len(losses)
        if epoch % args.valid_every == 0 or epoch == args.epochs:  # early stopping on validation
            v0 = time.perf_counter()
            v = valid_neg_elbo()
            record.update(valid_neg_elbo=v, valid_seconds=time.perf_counter() - v0)
            if v < run["best_valid"]:
                best_model = {k: t.detach().clone() for k, t in vae.state_dict().items()}
                run.update(best_valid=v, best_epoch=epoch, bad_epochs=0, best_model=best_model)
            elif epoch > args.warmup_epochs:
                run["bad_epochs"] += args.valid_every
            run["stopped"] = run["bad_epochs"] > args.patience
        run["history"].append(record)
        run["epoch"] = epoch
        if not args.no_progress:
            tqdm.write(f"epoch {epoch}: beta {beta:.3f} train loss {record['train_loss']:.3f}"
                       + (f" valid -ELBO {record['valid_neg_elbo']:.3f}" if "valid_neg_elbo" in record else ""))
        if args.checkpoint_every and (epoch % args.checkpoint_every == 0 or run["stopped"] or epoch == args.epochs):
            save_checkpoint(ckpt_path, dict(run, model=vae.state_dict(), optimizer=optimizer.state_dict(),
                                            shuffle_rng=shuffle.get_state(), binarize_rng=binarize.get_state()),
                            args.device)

    # Test the best model on validation, as the paper: beta = 1, flows in eval mode.
    if run["best_model"] is not None:
        vae.load_state_dict(run["best_model"])
    t0 = time.perf_counter()
    res = evaluate(vae, test, args.seed + 3, args.eval_batch_size, args.device, args.is_samples, args.is_points,
                   progress=not args.no_progress, desc="test")
    eval_seconds = time.perf_counter() - t0
    unit = unit_of(data.likelihood, data.image_shape)
    trained = [h for h in run["history"] if h["epoch"] > 0]
    results = {
        "dataset": args.dataset, "flow": args.flow, "epochs": args.epochs,
        "epochs_trained": len(trained), "last_epoch": run["epoch"], "best_epoch": run["best_epoch"],
        "stopped_early": run["stopped"],
        "params": count_params(vae), "params_encoder": count_params(vae.encoder),
        "params_decoder": count_params(vae.decoder), "params_flow": count_params(vae.flows),
        "device": args.device, "wall_s": time.perf_counter() - start_wall, "train_s": run["train_seconds"],
        "seconds_per_epoch": run["train_seconds"] / len(trained) if trained else None, "eval_s": eval_seconds,
        **figures(res, unit["nats_per_unit"]),
        "best_valid_neg_elbo_nats": run["best_valid"] if math.isfinite(run["best_valid"]) else None,
        **unit,
        "evaluation": EVALUATION, "likelihood": data.likelihood, "image_shape": list(data.image_shape),
        "data": dict(data.info, train_used=len(train), valid_used=len(valid), test_used=len(test),
                     dynamic_binarization=dynamic, data_seed=args.data_seed),
        "budget": dict({k: getattr(args, k) for k in BUDGET}, valid_points=len(valid), test_points=len(test),
                       paper_budget=PAPER_BUDGET),
        "ffjord": ffjord_settings(args) if args.flow == "ffjord" else None,
        "flow_settings": {k: getattr(args, k) for k in FLOW_SETTINGS},
        "history": run["history"],
        "finite": res["finite"],
    }
    results = write_results(args, "vae", results, filename="results.json")
    if not args.no_progress:
        print(f"{args.dataset} {args.flow}: test -ELBO {results['test_neg_elbo']:.4f} {unit['unit']}, IS-NLL "
              f"{results['test_nll_is']}, {results['params']} params, {results['seconds_per_epoch']} s/epoch")
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 100; the paper: up to 2000)")
    p.add_argument("--data-dir", default=None, help="data folder (default ../shared/data/<dataset folder>)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="data split / static binarization seed (default: the loader's; Frey faces 123)")
    p.add_argument("--subset", type=int, default=None, help="use the first N training examples")
    p.add_argument("--binarization", choices=("static", "dynamic"), default="static", help="MNIST")
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--width", type=float, default=None, help="channel multiplier of the conv nets (default 1)")
    add_flow_args(p)  # --flow, --num-flows, ..., --ffjord-config, --ffjord-steps, ...
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=100)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup-epochs", type=int, default=100, help="beta = min(epoch / warmup, 1)")
    t.add_argument("--patience", type=int, default=35, help="epochs without validation gain after warm-up")
    t.add_argument("--valid-every", type=int, default=1)
    t.add_argument("--validate-initial", action="store_true", help="also score the untrained model")
    t.add_argument("--checkpoint-every", type=int, default=1, help="0: never")
    e = p.add_argument_group("evaluation")
    e.add_argument("--valid-points", type=int, default=None, help="validate on the first N points")
    e.add_argument("--test-points", type=int, default=None, help="test on the first N points (default all)")
    e.add_argument("--is-samples", type=int, help="importance samples per test point (default 100; 0: skip)")
    e.add_argument("--is-points", type=int, default=None, help="IS-NLL on the first N test points")
    e.add_argument("--eval-batch-size", type=int, default=500)
    add_run_args(p, out=None, resume=True)  # --device --seed --out --threads --quick --no-progress --resume
    args = p.parse_args(argv)
    if args.data_dir is None:
        args.data_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                     FOLDERS[args.dataset])
    if args.out is None:
        args.out = os.path.join("out", "vae", f"{args.dataset}-{args.flow}")
    fill_defaults(args, FULL, dict(QUICK, ffjord_steps=2) if args.ffjord_config == "lean" else QUICK)
    return args


if __name__ == "__main__":
    main(parse_args())
