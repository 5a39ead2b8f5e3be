r"""Image density estimation on MNIST with the paper's multiscale FFJORD: the bits/dim row.

What: a Pyro distribution over images ``(1, 28, 28)``, a standard normal latent pushed through
:class:`~pyro_ffjord.MultiscaleFFJORD` (squeezes, factored-out channels, convolutional CNFs, the
inverse logit last), ``dist.TransformedDistribution(flow.base_distribution(), [flow])``, fitted
by maximum likelihood on uniformly dequantized pixels, :math:`x = (k + u) / 256`, fresh noise
every batch: Adam on the batch's mean bits/dim (``bits_per_dim(density.log_prob(x))``, the
logit's log-det included; see ``pyro_ffjord.image_transforms``) plus ``flow.regularization``
(RNODE, ``--kinetic``/``--jacobian``), with Hutchinson's trace (Rademacher probes) in training.
Every ``--valid-every`` iterations the validation bits/dim is scored; the best model on
validation (or the final one) is scored on the test images and compared with the paper's 0.99
(the reference kept its best model on the test set itself).

The score: eval mode (dopri5, the configuration's tolerance), each image dequantized once with a
fixed seed, and by default Hutchinson's estimator with ``--probes`` probes per image averaged,
an unbiased estimate of log p(x), so the bits/dim reported is an estimate with its standard
error (over images: dequantization and probes included); ``--eval-trace exact`` costs D = 784
VJPs per evaluation, which a CPU cannot afford (measured: ``examples/image_model.py``). The
reference's ``train_cnf.py`` scores its test set with one probe per image.

``--config``: ``paper`` = the reference's MNIST run (``train_cnf.py --data mnist --dims 64,64,64
--num_blocks 2 --layer_type concat --multiscale True --rademacher True``: three scales, two CNFs
before and after each squeeze, 64-64-64 concat convolutions, softplus, dopri5 at 1e-5, T = 1
learned, adjoint gradients); ``fast`` = the same model through the package's default solve (3
fixed rk4 steps, drift-checked, T = 0.5, no adjoint, RNODE weights 0.01); see
``image_model.PAPER`` and ``FAST``. Both train with batches of 200 and lr 1e-3 warmed up over
1000 iterations, and are scored alike.

Outputs in ``--out`` (default ``out/image/mnist-<config>``): ``results.json``, ``samples.png``
(latent draws through the flow), ``bpd_curve.png`` (bits/dim against training time) and
``checkpoint.pt`` (every ``--checkpoint-every`` iterations, every ``--checkpoint-minutes``, on
Ctrl-C, which then exits); ``--resume`` continues exactly and refuses other options. Run::

    python examples/image_density.py --dataset mnist --data-dir ../shared/data/mnist --config paper
    python examples/image_density.py --config fast --max-minutes 60 --test-points 1000
    python examples/image_density.py --quick   # seconds: 2 scales (3 CNFs of 8 channels), 6 batches of 8

``--objective fm`` trains by conditional flow matching (``pyro_ffjord.flow_matching_loss``, no
solve in training) instead: it regresses one field, so the model is one CNF at one scale
(``--scales 1 --blocks 1``, the default under ``fm``) between the standard normal and the logit of
the dequantized pixels, with the configuration's field, T and evaluation; no RNODE term (it
regularizes solves, and there are none). Scored exactly as under ``mle``. ``--mle-after S``:
maximum likelihood of that one CNF after the share S of ``--iters`` or ``--max-minutes``.

On a CPU either configuration is budget-limited (``--max-minutes``; a 28x28 batch of 200 costs
minutes per iteration): read such a result as one, not as the paper's protocol.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

import density_common as common
import image_model as model
from pyro_ffjord import bits_per_dim, dequantize, distributed, flow_matching_loss, runs

FULL = dict(iters=100_000, valid_every=1000, valid_points=1000, test_points=10_000, probes=4, samples=64)
QUICK = dict(iters=6, valid_every=3, valid_points=8, test_points=8, probes=2, samples=16, batch_size=8,
             warmup_iters=2, hidden=[8], scales=2, blocks=1, tol=1e-3)
# What a resumed run may change (not --eval-batch-size: an adaptive solve steps a chunk as one)
FREE = ("iters", "max_minutes", "test_points", "samples", "data_dir")


def main(args) -> dict:
    data = model.load(args.data_dir)  # before anything is written
    world = distributed.setup(args)  # under torchrun: one of several processes (docs/distributed.md)
    out = runs.start(args)
    start_wall, device = time.perf_counter(), torch.device(args.device)
    train = data.train[: args.subset] if args.subset else data.train
    world.per_rank(args.batch_size, len(train))  # the global batch must split evenly
    valid = dequantize(data.valid[: args.valid_points], torch.Generator().manual_seed(model.VALID_SEED)).to(device)
    test = dequantize(data.test[: args.test_points], torch.Generator().manual_seed(model.TEST_SEED)).to(device)
    options = model.flow_options(args.config, args.hidden, args.scales, args.blocks, args.tol, args.kinetic,
                                 args.jacobian, args.eval_trace)
    world.seed(args.seed)  # initialisation, dequantization noise and Hutchinson probes (seed + rank)
    flow, density = model.build(options, device)
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)

    config = runs.run_config(args, free=FREE + common.objective_free(args))  # fm: its options too
    training = runs.Training(args, out / "checkpoint.pt", config)
    state = common.new_state(flow.flows, nfe=[], nfe_backward=[])
    common.resume(training, flow, flow.flows, optimizer, state)  # refuses a checkpoint of other options
    checkpoint = common.checkpointer(state, flow, flow.flows, optimizer)
    indices = common.epoch_batches(len(train), args.batch_size, args.seed)

    def loss_of(x: torch.Tensor, phase: str):  # (the loss, what is minimised) of a batch (this rank's share)
        if phase == "fm":  # one CNF (parse_args); its data end is the logit of the pixels
            loss = flow_matching_loss(flow.flows[0], flow.parts[-1].inv(x), coupling=args.coupling,
                                      sigma_min=args.sigma_min)
            return loss, loss
        loss = bits_per_dim(density.log_prob(x), model.NUM_DIMS).mean()
        return loss, loss + flow.regularization

    objective = common.parallel(world, training, args, state, loss_of, flow)  # DDP under torchrun

    def validate(done: int) -> None:  # rank 0 alone (no decision hangs on it)
        if not world.is_main:
            return
        with training.paused():  # not training time
            v = model.score(flow, density, valid, args.probes, args.eval_batch_size)
        state["history"].append(dict(iteration=done, seconds=training.elapsed(), valid_bpd=v["bpd"],
                                     valid_se=v["se"], nfe_per_solve=v["nfe_per_solve"]))
        common.keep_if_best(state, flow, v["bpd"], done)

    def step(it: int) -> float:  # one Adam step on iteration it's batch
        for group in optimizer.param_groups:  # the reference's linear warm-up
            group["lr"] = args.lr * min(1.0, (it + 1) / args.warmup_iters) if args.warmup_iters else args.lr
        optimizer.zero_grad()
        rows = indices(it)
        x = dequantize(train[world.share(rows)]).to(device)  # fresh dequantization noise every batch
        phase = common.objective_now(args, state, training, optimizer, world)
        loss, total = objective(x, phase)
        world.scale(total, len(x), len(rows)).backward()  # DDP averages the ranks' gradients
        optimizer.step()
        solved = phase == "mle"  # flow matching solves nothing in training
        state["nfe"].append([f.nfe_forward if solved else 0 for f in flow.flows])
        state["nfe_backward"].append(sum(f.nfe_backward for f in flow.flows) if solved else 0)  # adjoint solves
        return world.mean(loss.item(), len(x))  # the global batch's loss

    def progress() -> dict:
        return dict(bpd=f"{state['losses'][-1]:.3f}", valid=f"{state['best_valid']:.3f}", nfe=sum(state["nfe"][-1]))

    start = state["iteration"]
    flow.train()
    stopped = common.run_training(args, training, state, checkpoint, step, validate, f"mnist {args.config}", progress,
                                  world=world)
    if not world.is_main:
        return world.finish({})  # rank 0 tests, draws and writes
    done = state["iteration"]

    # Test the best model on validation; the last iterate competes if it was never validated.
    best_valid, best_iteration = common.load_best(
        state, flow, done, lambda: model.score(flow, density, valid, args.probes, args.eval_batch_size)["bpd"],
        last_by_default=True)
    t_eval = time.perf_counter()
    res = model.score(flow, density, test, args.probes, args.eval_batch_size)
    eval_seconds = time.perf_counter() - t_eval
    timing = training.summary()  # resumed, segments, train_seconds (all segments)
    how = f"{args.config}, {common.objective_words(args)}" if args.objective == "fm" else args.config
    title = (f"FFJORD on MNIST ({how}), {done} iterations, {training.describe()}: test "
             f"{res['bpd']:.3f} ± {res['se']:.3f} bits/dim (paper {model.PAPER_BPD})")
    model.save_samples(os.path.join(args.out, "samples.png"), flow, density, args.samples, title)
    common.plot_learning_curves(os.path.join(args.out, "bpd_curve.png"), state["clock"], state["losses"],
                                state["history"], "valid_bpd", title, best_iteration,
                                ylabel="bits/dim", valid_label="validation (dopri5)",
                                **common.curve_labels(args, state, "bits/dim", "training batch (training solver)"),
                                reference=(f"paper ({model.PAPER_BPD})", model.PAPER_BPD))
    nfe = np.array(state["nfe"] or [[0] * len(flow.flows)], dtype=float)
    results = {
        "dataset": args.dataset, "config": args.config, **common.objective_results(args, state),
        "image_shape": list(model.IMAGE_SHAPE),
        "data": dict(source=data.source, train_images=len(train), valid_points=len(valid),
                     pixels="round(255 x) of the loader's k / 255 (exact), dequantized (k + u) / 256"),
        "flow_options": model.describe(flow, options), "params": sum(p.numel() for p in flow.parameters()),
        "batch_size": args.batch_size, **world.describe(args.seed, args.batch_size), "lr": args.lr,
        "warmup_iters": args.warmup_iters, "iterations": done,
        "stopped": stopped, "resumed_from": start if training.resumed else None, **timing,
        "seconds_per_iteration": timing["train_seconds"] / done if done else None, "eval_seconds": eval_seconds,
        "wall_seconds": time.perf_counter() - start_wall,
        "nfe_train_per_solve": float(nfe.mean()) if state["nfe"] else None,
        "nfe_train_per_iteration": float(nfe.sum(1).mean()) if state["nfe"] else None,
        "nfe_train_adjoint_per_iteration": float(np.mean(state["nfe_backward"])) if state["nfe"] else None,
        "nfe_eval_per_solve": res["nfe_per_solve"], "nfe_eval_per_pass": res["nfe_per_pass"],
        "best_valid_bpd": best_valid if math.isfinite(best_valid) else None, "best_iteration": best_iteration,
        "test_bpd": res["bpd"], "test_bpd_se": res["se"], "test_probe_sd_bpd": res["probe_sd"],
        "test_points": res["points"], "test_probes": res["probes"], "test_finite": res["finite"],
        "estimator": model.estimator(flow, args.probes), "paper_bpd": model.PAPER_BPD, "paper_config": model.PAPER,
        "valid_history": state["history"], "losses": state["losses"], "clock": state["clock"],
    }
    results = runs.write_results(args, "image_density", results, filename="results.json")
    if not args.no_progress:
        print(f"mnist ({args.config}): {done} iterations in {training.describe()} "
              f"({results['nfe_train_per_solve'] or 0:.1f} NFE per training solve, "
              f"{res['nfe_per_solve']:.1f} per eval solve), best valid {best_valid:.3f} bits/dim at iteration "
              f"{best_iteration}, test {res['bpd']:.3f} ± {res['se']:.3f} bits/dim on {res['points']} images "
              f"({res['probes']} probe(s) each); paper {model.PAPER_BPD}")
    return world.finish(results)  # the other ranks wait for rank 0 here


def parse_args(argv=None) -> argparse.Namespace:
    count, whole, rate, weight = runs.positive_int, runs.nonnegative_int, runs.positive_float, runs.nonnegative_float
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("mnist",), default="mnist")
    p.add_argument("--data-dir", default=model.default_data_dir(), help="folder of MNIST's four IDX files")
    p.add_argument("--config", choices=model.CONFIGS, default="paper",
                   help="paper: the reference's MNIST run; fast: the same model, fixed rk4 steps and RNODE")
    t = p.add_argument_group("training")
    common.add_objective_args(t)
    common.add_training_args(t, FULL, QUICK, checkpoint_every=500)
    t.add_argument("--subset", type=count, default=None, help="train on the first N training images")
    t.add_argument("--batch-size", type=count, default=None, help="default 200 (--quick 8)")
    t.add_argument("--lr", type=rate, default=model.TRAINING["lr"], help="Adam, after the warm-up")
    t.add_argument("--warmup-iters", type=whole, default=None, help="linear lr warm-up (default 1000; --quick 2)")
    f = p.add_argument_group("flow (overrides of --config)")
    f.add_argument("--hidden", type=count, nargs="+", default=None, help="channels of each field (--quick 8)")
    f.add_argument("--scales", type=count, default=None, help="default 3 for 28x28 (--quick 2; fm 1)")
    f.add_argument("--blocks", type=count, default=None, help="CNFs per block (default 2; --quick 1; fm 1)")
    f.add_argument("--tol", type=rate, default=None, help="atol = rtol of dopri5 (default 1e-5; --quick 1e-3)")
    f.add_argument("--kinetic", type=weight, default=None, help="RNODE weight (paper 0, fast 0.01)")
    f.add_argument("--jacobian", type=weight, default=None, help="RNODE weight (paper 0, fast 0.01)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-trace", choices=("hutchinson", "exact"), default="hutchinson")
    e.add_argument("--probes", type=count, default=None, help="Hutchinson probes per image (default 4; --quick 2)")
    e.add_argument("--valid-points", type=count, default=None, help="the first N (default 1000; --quick 8)")
    e.add_argument("--test-points", type=count, default=None, help="the first N (default 10000; --quick 8)")
    e.add_argument("--eval-batch-size", type=count, default=200, help="rows (images x probes) per solve")
    e.add_argument("--samples", type=count, default=None, help="images in samples.png (default 64; --quick 16)")
    runs.add_run_args(p, out=None, resume=True, threads=None, out_note="out/image/mnist-<config>",
                      threads_note="64-channel convolutions on batches of 200 use every core")
    distributed.add_args(p)  # --dist-timeout (torchrun)
    args = common.parse(p, argv, out="out/image/{dataset}-{config}")
    common.check_objective(p, args)
    if args.objective == "fm":  # flow matching regresses one field: one CNF at one scale
        for name in ("scales", "blocks"):
            if getattr(args, name) not in (None, 1):
                p.error(f"--objective fm trains a single CNF: --{name} must be 1 (it is by default under fm), "
                        f"got {getattr(args, name)}; use --objective mle for the multiscale model")
            setattr(args, name, 1)
        for name in ("kinetic", "jacobian"):
            if getattr(args, name):
                p.error(f"--{name} regularizes the training solve, and --objective fm has none")
            setattr(args, name, 0.0)
    runs.fill_defaults(args, {**{k: None for k in QUICK}, **FULL, **model.TRAINING}, QUICK)
    return args


if __name__ == "__main__":
    runs.cli(main, parse_args)
