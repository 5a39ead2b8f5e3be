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
  ``--is-samples`` samples per point (100) on the first ``--is-points`` test points (1000, with
  its standard error: 100 exact-trace samples of every test point cost hours on a CPU).
  With ``--subset N`` validation uses the first N validation points (``--valid-points``).
- Units: nats per image for binary data; Frey faces in bits per dimension,
  :math:`-\mathrm{ELBO} / (560 \ln 2)`, as in the paper's table (the results have both).

Outputs ``<out>/results.json`` and ``<out>/checkpoint.pt``, written every ``--checkpoint-every``
epochs, every ``--checkpoint-minutes`` (mid-epoch) and on Ctrl-C (which then exits); ``--resume``
continues from it exactly and refuses one written with other options (data, model, flow, lr, seed...).
Networks and an epoch of training: ``vae_model.py``; flows: ``vae_flows.py``; data: ``vae_data.py``;
scores: ``vae_eval.py``.

Run::

    python examples/vae.py --dataset freyfaces --flow ffjord --epochs 20 --width 0.25
    python examples/vae.py --dataset mnist --flow planar --quick     # seconds (out/vae/mnist-planar-quick)

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

from pyro_ffjord import distributed, runs
from pyro_ffjord.runs import add_run_args, fill_defaults, start, write_results
from vae_data import DATASETS, default_data_dir, load, unit_of
from vae_eval import EVALUATION, evaluate, figures
from vae_flows import add_flow_args, build_flows, ffjord_settings, nfe_total
from vae_model import H_DIM, VAE, count_params, elbo_loss, train_epoch

# Defaults of the options left unset on the command line: a full run, and --quick (seconds).
FULL = dict(epochs=100, width=1.0, is_samples=100, is_points=1000, num_flows=4, hypernet_hidden=[256], iaf_hidden=640,
            num_householder=8, ffjord_tol=1e-5)
QUICK = dict(epochs=1, subset=100, width=0.125, valid_points=50, test_points=50, is_samples=4, num_flows=2,
             hypernet_hidden=[32], iaf_hidden=64, num_householder=2, ffjord_hidden_dims=[32], ffjord_tol=1e-3)
BUDGET = ("epochs", "subset", "width", "latent_dim", "batch_size", "lr", "warmup_epochs", "patience", "valid_every",
          "is_samples", "is_points")
FLOW_SETTINGS = ("num_flows", "hypernet_hidden", "iaf_hidden", "num_householder")
PAPER_BUDGET = "up to 2000 epochs, warm-up 100, patience 35 (code), full width, full data"
# Options a resumed run may change (budget, where the files are, test-time sizes); all others must match.
FREE = ("epochs", "data_dir", "test_points", "is_samples", "is_points", "eval_batch_size", "validate_initial")


def main(args) -> dict:
    world = distributed.setup(args)  # under torchrun: one of several processes (docs/distributed.md)
    out = start(args)
    start_wall = time.perf_counter()

    data = load(args.dataset, args.data_dir, seed=args.data_seed, binarization=args.binarization)
    train = data.train[: args.subset] if args.subset else data.train
    # With --subset the validation set shrinks to the subset's size unless --valid-points says
    # otherwise: scoring 10,000 points every epoch of a 100-point run cost 100x its training.
    valid_points = args.valid_points or (min(args.subset, len(data.valid)) if args.subset else None)
    valid = data.valid[:valid_points] if valid_points else data.valid
    test = data.test[: args.test_points] if args.test_points else data.test
    dynamic = data.likelihood == "bernoulli" and not bool(((train == 0) | (train == 1)).all())
    world.per_rank(args.batch_size, len(train))  # the global batch must split evenly
    per_epoch = math.ceil(len(train) / args.batch_size)  # steps; a checkpoint's position is a step count

    pyro.clear_param_store()
    world.seed(args.seed)  # initialisation and the reparameterised draws (seed + rank)
    vae = VAE(data.image_shape, data.likelihood, args.latent_dim, args.width, build_flows(args, args.latent_dim, H_DIM))
    vae.to(args.device)
    optimizer = torch.optim.Adamax(vae.parameters(), lr=args.lr, eps=1e-7)
    elbo = Trace_ELBO()
    shuffle = torch.Generator().manual_seed(args.seed)
    binarize = torch.Generator().manual_seed(args.seed + 1)
    # Where training stands: what a checkpoint holds beside the model, optimizer and generators;
    # "part": the epoch in progress (batches done, their losses, the shuffle state it began with).
    run = dict(epoch=0, best_valid=math.inf, best_epoch=0, bad_epochs=0, stopped=False, history=[], best_model=None,
               part=None)
    training = runs.Training(args, out / "checkpoint.pt", runs.run_config(args, free=FREE), unit="step")
    ck = training.resume()  # restores the random state too; refuses a checkpoint of other options
    if ck is not None:
        vae.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        shuffle.set_state(ck["shuffle_rng"])
        binarize.set_state(ck["binarize_rng"])
        run.update((k, ck[k]) for k in run)
        world.reseed_resumed(args.seed, run["epoch"] * per_epoch + (run["part"] or {}).get("batch", 0))
    # The parameters exist (built with the modules) and hold their final values: DDP copies rank 0's.
    objective = world.wrap(distributed.Objective(elbo_loss(vae, elbo), vae))

    def checkpoint() -> dict:
        return dict(run, model=vae.state_dict(), optimizer=optimizer.state_dict(), shuffle_rng=shuffle.get_state(),
                    binarize_rng=binarize.get_state())

    def valid_neg_elbo():
        return evaluate(vae, valid, args.seed + 2, args.eval_batch_size, args.device, progress=not args.no_progress,
                        desc="valid")["neg_elbo"]

    if world.is_main and run["epoch"] == 0 and args.validate_initial and not run["history"]:
        run["history"].append({"epoch": 0, "valid_neg_elbo": valid_neg_elbo()})

    with training.loop(run["epoch"] * per_epoch + (run["part"] or {}).get("batch", 0)):
        training.segments[-1]["world_size"] = world.world_size  # a resumed run may use another
        for epoch in range(run["epoch"] + 1, args.epochs + 1):
            if run["stopped"]:
                break
            beta = min(epoch / args.warmup_epochs, 1.0) if args.warmup_epochs > 0 else 1.0  # KL warm-up
            part = run["part"] = run["part"] or dict(batch=0, losses=[], nfe=0, clock=training.elapsed(),
                                                     shuffle_rng=shuffle.get_state())
            shuffle.set_state(part["shuffle_rng"])  # a resumed epoch draws the same order again
            nfe0 = nfe_total(vae) - part["nfe"]

            def safe_point(batch: int) -> None:
                part.update(batch=batch, nfe=nfe_total(vae) - nfe0)
                if world.is_main:  # rank 0 writes the checkpoints
                    training.step((epoch - 1) * per_epoch + batch, checkpoint)

            losses = train_epoch(vae, optimizer, elbo, train, beta, args, shuffle, binarize, dynamic,
                                 f"epoch {epoch}", part, safe_point, objective, world)
            run["part"] = None
            record = {"epoch": epoch, "beta": beta, "train_loss": sum(losses) / len(losses), "train_losses": losses,
                      "seconds": training.elapsed() - part["clock"]}
            if args.flow == "ffjord":
                record["nfe_forward_per_step"] = part["nfe"] / len(losses)
            if world.is_main and (epoch % args.valid_every == 0 or epoch == args.epochs):  # early stopping
                v0 = time.perf_counter()
                with training.paused():  # validation is not training time
                    v = valid_neg_elbo()
                record.update(valid_neg_elbo=v, valid_seconds=time.perf_counter() - v0)
                if v < run["best_valid"]:
                    best_model = {k: t.detach().clone() if torch.is_tensor(t) else t
                                  for k, t in vae.state_dict().items()}  # (extra state: plain values)
                    run.update(best_valid=v, best_epoch=epoch, bad_epochs=0, best_model=best_model)
                elif epoch > args.warmup_epochs:
                    run["bad_epochs"] += args.valid_every
                run["stopped"] = run["bad_epochs"] > args.patience
            run["stopped"] = world.broadcast(run["stopped"])  # rank 0 validates and decides
            run["history"].append(record)
            run["epoch"] = epoch
            if not args.no_progress:
                tqdm.write(f"epoch {epoch}: beta {beta:.3f} train loss {record['train_loss']:.3f}"
                           + (f" valid -ELBO {record['valid_neg_elbo']:.3f}" if "valid_neg_elbo" in record else ""))
            last = run["stopped"] or epoch == args.epochs
            if world.is_main:
                training.step(epoch * per_epoch, checkpoint, due=bool(args.checkpoint_every) and
                              (epoch % args.checkpoint_every == 0 or last))
    if not world.is_main:
        return world.finish({})  # rank 0 tests and writes

    # Test the best model on validation, as the paper: beta = 1, flows in eval mode.
    if run["best_model"] is not None:
        vae.load_state_dict(run["best_model"])
    t0 = time.perf_counter()
    res = evaluate(vae, test, args.seed + 3, args.eval_batch_size, args.device, args.is_samples, args.is_points,
                   progress=not args.no_progress, desc="test")
    eval_seconds = time.perf_counter() - t0
    unit = unit_of(data.likelihood, data.image_shape)
    trained = [h for h in run["history"] if h["epoch"] > 0]
    timing = training.summary()  # resumed, segments (steps from, to, seconds), train_seconds
    results = {
        "dataset": args.dataset, "flow": args.flow, "epochs": args.epochs,
        "epochs_trained": len(trained), "last_epoch": run["epoch"], "best_epoch": run["best_epoch"],
        "stopped_early": run["stopped"],
        "params": count_params(vae), "params_encoder": count_params(vae.encoder),
        "params_decoder": count_params(vae.decoder), "params_flow": count_params(vae.flows),
        "device": args.device, "wall_s": time.perf_counter() - start_wall, "train_s": timing["train_seconds"],
        **timing, "steps_per_epoch": per_epoch, **world.describe(args.seed, args.batch_size),
        "seconds_per_epoch": timing["train_seconds"] / len(trained) if trained else None, "eval_s": eval_seconds,
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
              f"{results['test_nll_is']}, {results['params']} params, {results['seconds_per_epoch']} s/epoch"
              + (f", trained in {training.describe()}" if training.resumed else ""))
    return world.finish(results)  # the other ranks wait for rank 0 here


def parse_args(argv=None):
    count, whole, rate = runs.positive_int, runs.nonnegative_int, runs.positive_float
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASETS, default="mnist")
    p.add_argument("--epochs", type=whole, default=None, help="epochs (default 100; the paper: up to 2000)")
    p.add_argument("--data-dir", default=None, help="data folder (default ../shared/data/<dataset folder>)")
    p.add_argument("--data-seed", type=whole, default=None,
                   help="data split / static binarization seed (default: the loader's; Frey faces 123)")
    p.add_argument("--subset", type=count, default=None, help="use the first N training examples")
    p.add_argument("--binarization", choices=("static", "dynamic"), default="static", help="MNIST")
    p.add_argument("--latent-dim", type=count, default=64)
    p.add_argument("--width", type=rate, default=None, help="channel multiplier of the conv nets (default 1)")
    add_flow_args(p)  # --flow, --num-flows, ..., --ffjord-config, --ffjord-steps, ...
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=count, default=100)
    t.add_argument("--lr", type=rate, default=5e-4)
    t.add_argument("--warmup-epochs", type=whole, default=100, help="beta = min(epoch / warmup, 1)")
    t.add_argument("--patience", type=whole, default=35, help="epochs without validation gain after warm-up")
    t.add_argument("--valid-every", type=count, default=1)
    t.add_argument("--validate-initial", action="store_true", help="also score the untrained model")
    t.add_argument("--checkpoint-every", type=whole, default=1, help="epochs (0: only by minutes and on Ctrl-C)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--valid-points", type=count, default=None,
                   help="validate on the first N points (default all; with --subset, as many as the subset)")
    e.add_argument("--test-points", type=count, default=None, help="test on the first N points (default all)")
    e.add_argument("--is-samples", type=whole, help="importance samples per test point (default 100; 0: skip)")
    e.add_argument("--is-points", type=count, default=None,
                   help="IS-NLL on the first N test points (default 1000, with standard errors)")
    e.add_argument("--eval-batch-size", type=count, default=500)
    # threads: the conv nets (batch 100, 28x28) share well: 2 threads trained 1.8x faster than 1 at
    # --width 1 on a quiet 2-core machine (1.2-1.5x at widths 0.25 and 0.125)
    add_run_args(p, out=None, resume=True, threads=None, threads_note="conv nets at batch 100 gain from them",
                 out_note="out/vae/<dataset>-<flow>")
    distributed.add_args(p)  # --dist-timeout (torchrun)
    args = runs.parse(p, argv)
    if args.data_dir is None:
        args.data_dir = default_data_dir(args.dataset)
    if args.out is None:  # a --quick run keeps its own folder
        out = os.path.join("out", "vae", f"{args.dataset}-{args.flow}")
        args.out = runs.quick_out(out) if args.quick else out
    fill_defaults(args, FULL, dict(QUICK, ffjord_steps=2) if args.ffjord_config == "lean" else QUICK)
    return args


if __name__ == "__main__":
    runs.cli(main, parse_args)
