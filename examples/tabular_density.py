r"""Tabular density estimation with stacked FFJORD blocks: the FFJORD paper's density table.

What: a Pyro distribution, a standard normal base pushed through ``num_blocks`` FFJORD
bijections, ``dist.TransformedDistribution(Normal(0, I_D), [FFJORD(D, ...), ...])``, fitted by
maximum likelihood (Adam on ``-density.log_prob(batch).mean()``, shuffled batches of the
training split) on one of the paper's five tabular sets (MAF's files and preprocessing, see
``pyro_ffjord.datasets.tabular``) or on scikit-learn's bundled breast-cancer table (30-D,
nothing to download). Every ``--valid-every`` iterations the validation NLL is computed in eval
mode (exact trace, adaptive solver); the best parameters on validation are kept, and training
stops after ``--patience`` validations without gain (the learning rate drops tenfold after a
third of them and again after two thirds, as the reference code does), after ``--iters`` or
after ``--max-minutes`` of training. The best model's exact-trace test NLL (mean ± standard
error, nats) is compared with the paper's figure.

Why: it is the protocol of the paper's table (reference code ``train_tabular.py``), so that a
figure printed here stands beside the paper's, and ``--config`` says what is the reference's:
``paper`` = the data set's reference configuration (table ``PAPER``: stacked blocks of width
``hdim_factor x D``, dopri5 at atol 1e-8 / rtol 1e-6, Hutchinson trace with Gaussian probes, T = 1
learned, adjoint gradients); ``default`` = one ``FFJORD(D)``, what a user gets without options
(three tanh layers of ``max(64, 4D)``, Hutchinson, 3 rk4 steps, dopri5 1e-5 to evaluate);
``fast`` = one ``FFJORD(D, preset="fast")`` (the same with the exact trace). Batch size and
learning rate default to the data set's reference values in every configuration.

Outputs in ``--out`` (default ``out/tabular/<dataset>-<config>``): ``results.json``,
``nll_curve.png`` (training and validation NLL against training time) and ``checkpoint.pt``
(every ``--checkpoint-every`` iterations, every ``--checkpoint-minutes``, on Ctrl-C, which then
exits); ``--resume`` continues exactly and refuses a checkpoint written with other options.

``--objective fm`` trains by conditional flow matching instead of maximum likelihood
(:func:`pyro_ffjord.flow_matching_loss` on each batch, ``--coupling`` ``ot`` by default,
``--sigma-min``): no ODE solve in training, so the training solver, trace and adjoint play no
part there; validation, early stopping and the test NLL are exactly as for ``--objective mle``
(the default). Flow matching fits the field of one FFJORD, so it needs a single block: every
``--config`` of breast_cancer (one block), otherwise ``--num-blocks 1``. The per-batch
``losses`` (and the curve in ``nll_curve.png``) are then flow-matching losses, not NLLs
(``train_loss_kind`` in ``results.json``). ``--mle-after S`` switches to maximum likelihood once
the share S of ``--iters`` or of ``--max-minutes`` has passed (Adam's moments restarted).

Run, one command per row of the table (MAF's ``data.tar.gz`` from https://zenodo.org/record/1161203
unpacked to ``data/``; GAS needs a one-time conversion, see ``pyro_ffjord.datasets.maf_tabular``;
BSDS300 needs h5py)::

    python examples/tabular_density.py --dataset power --data-dir data
    python examples/tabular_density.py --dataset gas --data-dir data
    python examples/tabular_density.py --dataset hepmass --data-dir data
    python examples/tabular_density.py --dataset miniboone --data-dir data
    python examples/tabular_density.py --dataset bsds300 --data-dir data
    python examples/tabular_density.py --dataset breast_cancer --config fast   # bundled, no download
    python examples/tabular_density.py --quick      # seconds (out/tabular/breast_cancer-paper-quick)

The reference configurations (batches of 10,000, up to 10 blocks solved at 1e-8, until early
stopping) are far beyond a CPU's budget: there, add ``--max-minutes`` and read the result as a
budget-limited one.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

import density_common as common
import tabular_model as model
from pyro_ffjord import distributed, flow_matching_loss, runs
from pyro_ffjord.datasets import tabular

# The reference configuration per data set. Rows (nhidden = hidden layers of the field,
# hdim_factor = their width / D, num_blocks = stacked CNFs, nonlinearity, batch_size): the FFJORD
# paper's appendix table of the best tabular architectures (Grathwohl et al. 2019; ffjord-facts.md
# confirms the MINIBOONE row only, the reference README's command). Shared by every row (COMMON):
# train_tabular.py's defaults -- concatsquash layers, Adam lr 1e-3, weight decay 1e-6, dopri5 at
# atol 1e-8 / rtol 1e-6 in training and test, time_length T = 1.0 with train_T (the reference's T
# never moved, ffjord-facts.md: ours learns it), Hutchinson trace with Gaussian probes (rademacher
# False), validation every 200 iterations, early stopping after 30 validations without gain, exact
# trace at test time; adjoint gradients (the reference always uses them, ffjord-facts.md).
COMMON = dict(layer_type="concatsquash", lr=1e-3, weight_decay=1e-6, solver="dopri5", atol=1e-8, rtol=1e-6, T=1.0,
              train_T=True, trace="hutchinson", noise="gaussian", adjoint=True, valid_every=200, patience=30)
PAPER = {
    "power": dict(COMMON, nhidden=3, hdim_factor=10, num_blocks=5, nonlinearity="tanh", batch_size=10000),
    "gas": dict(COMMON, nhidden=3, hdim_factor=20, num_blocks=5, nonlinearity="tanh", batch_size=1000),
    "hepmass": dict(COMMON, nhidden=2, hdim_factor=10, num_blocks=10, nonlinearity="softplus", batch_size=10000),
    "miniboone": dict(COMMON, nhidden=2, hdim_factor=20, num_blocks=1, nonlinearity="softplus", batch_size=1000),
    "bsds300": dict(COMMON, nhidden=3, hdim_factor=20, num_blocks=2, nonlinearity="softplus", batch_size=10000),
    # Not in the paper: MINIBOONE's row, the reference's own example command, because MINIBOONE is
    # the nearest of the five in dimension (43 vs 30) and in size (the smallest); with 462 training
    # rows, a batch of 1000 is the whole training split, and early stopping guards the 600-wide field.
    "breast_cancer": dict(COMMON, nhidden=2, hdim_factor=20, num_blocks=1, nonlinearity="softplus", batch_size=1000),
}
# The FFJORD row of the paper's table (test NLL, nats; ffjord-facts.md), for comparison.
PAPER_NLL = {"power": -0.46, "gas": -8.59, "hepmass": 15.26, "miniboone": 10.43, "bsds300": -157.67,
             "breast_cancer": None}
FULL = dict(iters=100_000, valid_every=COMMON["valid_every"])
QUICK = dict(iters=30, valid_every=10, batch_size=64, width=16, tol=1e-3, valid_points=50, test_points=50)
# What a resumed run may change (not --eval-batch-size: an adaptive solve steps a chunk as one)
FREE = ("iters", "max_minutes", "test_points", "data_dir")
EVALUATION = "eval mode (exact trace, adaptive solver); mean -log p of the test points; the best model on validation"


def main(args) -> dict:
    data = model.load(args.dataset, args.data_dir)  # before anything is written
    world = distributed.setup(args)  # under torchrun: one of several processes (docs/distributed.md)
    world.per_rank(args.batch_size, len(data.train))  # the global batch must split evenly
    out = runs.start(args)
    start_wall, device = time.perf_counter(), torch.device(args.device)
    train, valid, test = (s.to(device) for s in (data.train, data.valid[: args.valid_points],
                                                 data.test[: args.test_points]))
    blocks, options = model.flow_setup(args.config, PAPER[args.dataset], data.dim, args.num_blocks, args.width,
                                       args.tol, args.quick)
    world.seed(args.seed)  # initialisation and Hutchinson probes (seed + rank)
    flows, density = model.build_density(data.dim, blocks, options, device)
    optimizer = torch.optim.Adam(flows.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    config = runs.run_config(args, free=FREE + common.objective_free(args))  # fm: its options too
    training = runs.Training(args, out / "checkpoint.pt", config)
    state = common.new_state(flows, bad=0, decays=0, stopped=None)  # bad: validations without gain
    common.resume(training, flows, flows, optimizer, state)  # refuses a checkpoint of other options
    checkpoint = common.checkpointer(state, flows, flows, optimizer)
    indices = common.epoch_batches(len(train), args.batch_size, args.seed)

    def loss_of(x: torch.Tensor, phase: str) -> torch.Tensor:  # the mean loss of a batch (this rank's share)
        if phase == "fm":  # one block (parse_args): its field regressed, no solve
            return flow_matching_loss(flows[0], x, coupling=args.coupling, sigma_min=args.sigma_min)
        return -density.log_prob(x).mean()

    objective = common.parallel(world, training, args, state, loss_of, flows)  # DDP under torchrun

    def validate(done: int) -> None:  # on rank 0; its decisions reach every rank
        if world.is_main:
            with training.paused():  # not training time
                v = model.score(flows, density, valid, args.eval_batch_size)
            state["history"].append(dict(iteration=done, seconds=training.elapsed(), valid_nll=v["nll"],
                                         nfe=v["nfe"]))
            state["bad"] = 0 if common.keep_if_best(state, flows, v["nll"], done) else state["bad"] + 1
            third = args.patience // 3  # the reference's schedule: lr / 10, then lr / 100
            state["decays"] = max(state["decays"], 2 if state["bad"] > 2 * third else int(state["bad"] > third))
        state.update(world.broadcast({k: state[k] for k in ("bad", "decays")}))
        for group in optimizer.param_groups:
            group["lr"] = args.lr / 10 ** state["decays"]
        if state["bad"] > args.patience:
            state["stopped"] = "patience"

    def step(it: int) -> float:  # one Adam step on iteration it's batch (this rank's share of it)
        rows = indices(it)
        x = train[world.share(rows).to(device)]
        loss = objective(x, common.objective_now(args, state, training, optimizer, world))
        optimizer.zero_grad()
        world.scale(loss, len(x), len(rows)).backward()  # DDP averages the ranks' gradients
        optimizer.step()
        return world.mean(loss.item(), len(x))  # the global batch's loss

    def progress() -> dict:
        return dict(loss=f"{state['losses'][-1]:.3f}", valid=f"{state['best_valid']:.3f}",
                    nfe=sum(f.nfe_forward for f in flows))

    start = state["iteration"]
    flows.train()
    ended = common.run_training(args, training, state, checkpoint, step, validate, f"{args.dataset} {args.config}",
                                progress, stopped=lambda: bool(state["stopped"]), world=world)
    if not world.is_main:
        return world.finish({})  # rank 0 tests, draws and writes
    stopped = state["stopped"] or ended  # early stopping, else iters or max_minutes

    # Test the best model on validation; the last iterate competes if it was never validated.
    done = state["iteration"]
    score_last = (lambda: model.score(flows, density, valid, args.eval_batch_size)["nll"]) if done else None
    best_valid, best_iteration = common.load_best(state, flows, done, score_last)
    t_eval = time.perf_counter()
    res = model.score(flows, density, test, args.eval_batch_size)
    eval_seconds = time.perf_counter() - t_eval
    timing = training.summary()  # resumed, segments, train_seconds (all segments)
    paper_nll = PAPER_NLL[args.dataset]
    fm = args.objective == "fm"
    how = f"{args.config}, {common.objective_words(args)}" if fm else args.config
    title = (f"FFJORD on {args.dataset} ({how}), {done} iterations, {training.describe()}: test NLL "
             f"{res['nll']:.3f} nats" + ("" if paper_nll is None else f" (paper {paper_nll})"))
    common.plot_learning_curves(os.path.join(args.out, "nll_curve.png"), state["clock"], state["losses"],
                                state["history"], "valid_nll", title, best_iteration,
                                ylabel="NLL (nats)", running_mean=True,
                                **common.curve_labels(args, state, "NLL", "training batch NLL"),
                                valid_label="validation NLL (exact trace, adaptive solver)")
    results = {
        "dataset": args.dataset, "config": args.config, **common.objective_results(args, state), "dim": data.dim,
        "data": dict(source=data.source, sizes=list(data.sizes), valid_points=len(valid), **data.info),
        "flow_options": model.describe(flows), "params": sum(p.numel() for p in flows.parameters()),
        "batch_size": args.batch_size, **world.describe(args.seed, args.batch_size), "lr": args.lr,
        "iterations": done, "stopped": stopped,
        "resumed_from": start if training.resumed else None, **timing,
        "seconds_per_iteration": timing["train_seconds"] / done if done else None,
        "eval_seconds": eval_seconds, "wall_seconds": time.perf_counter() - start_wall,
        "best_valid_nll": best_valid if math.isfinite(best_valid) else None, "best_iteration": best_iteration,
        "test_nll": res["nll"], "test_nll_se": res["se"], "test_points": len(test), "test_finite": res["finite"],
        "eval_nfe": res["nfe"], "evaluation": EVALUATION, "paper_test_nll": paper_nll,
        "paper_config": PAPER[args.dataset], "valid_history": state["history"], "losses": state["losses"],
    }
    results = runs.write_results(args, "tabular_density", results, filename="results.json")
    if not args.no_progress:
        versus = "" if paper_nll is None else f"; paper {paper_nll}"
        print(f"{args.dataset} ({args.config}, {blocks} block(s)): {done} iterations in {training.describe()} "
              f"(stopped: {stopped}), best valid NLL {best_valid:.3f} at iteration {best_iteration}, "
              f"test NLL {res['nll']:.3f} ± {res['se']:.3f} nats on {len(test)} points{versus}")
    return world.finish(results)  # the other ranks wait for rank 0 here


def parse_args(argv=None) -> argparse.Namespace:
    count, whole, rate, weight = runs.positive_int, runs.nonnegative_int, runs.positive_float, runs.nonnegative_float
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=tabular.NAMES, default="breast_cancer")
    p.add_argument("--data-dir", default=None, help=f"MAF's data/ folder or the data set's own ({tabular.ZENODO})")
    p.add_argument("--config", choices=model.CONFIGS, default="paper",
                   help="paper: the reference configuration (PAPER); default: FFJORD(D); fast: preset='fast'")
    t = p.add_argument_group("training")
    common.add_objective_args(t)
    common.add_training_args(t, FULL, QUICK, checkpoint_every=1000)
    t.add_argument("--batch-size", type=count, default=None, help="default: the data set's (PAPER); --quick 64")
    t.add_argument("--lr", type=rate, default=None, help="Adam (default: the data set's, PAPER)")
    t.add_argument("--weight-decay", type=weight, default=COMMON["weight_decay"])
    t.add_argument("--patience", type=whole, default=COMMON["patience"], help="validations without gain")
    f = p.add_argument_group("flow (overrides of --config)")
    f.add_argument("--num-blocks", type=count, default=None, help="default: the config's (--quick: at most 2)")
    f.add_argument("--width", type=count, default=None, help="every hidden layer (--quick 16)")
    f.add_argument("--tol", type=rate, default=None, help="atol = rtol of the adaptive solver (--quick 1e-3)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--valid-points", type=count, default=None, help="the first N (default all; --quick 50)")
    e.add_argument("--test-points", type=count, default=None, help="the first N (default all; --quick 50)")
    e.add_argument("--eval-batch-size", type=count, default=1000, help="points per evaluation solve")
    runs.add_run_args(p, out=None, resume=True, threads=None, out_note="out/tabular/<dataset>-<config>",
                      threads_note="the reference fields are 10-20 x D wide, batches 1000-10000")
    distributed.add_args(p)  # --dist-timeout (torchrun)
    args = common.parse(p, argv, out="out/tabular/{dataset}-{config}")
    common.check_objective(p, args)
    if args.objective == "fm":
        blocks = model.flow_setup(args.config, PAPER[args.dataset], tabular.DIMS[args.dataset], args.num_blocks,
                                  quick=args.quick)[0]
        if blocks != 1:
            p.error(f"--objective fm trains a single FFJORD block, but --dataset {args.dataset} --config "
                    f"{args.config}{' --quick' if args.quick else ''} stacks {blocks}: use --num-blocks 1 "
                    "or --objective mle")
    runs.fill_defaults(args, FULL, QUICK)
    args.batch_size = args.batch_size or PAPER[args.dataset]["batch_size"]
    args.lr = args.lr or PAPER[args.dataset]["lr"]
    return args


if __name__ == "__main__":
    runs.cli(main, parse_args)
