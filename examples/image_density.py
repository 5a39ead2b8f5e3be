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

On a CPU either configuration is budget-limited (``--max-minutes``; a 28x28 batch of 200 costs
minutes per iteration): read such a result as one, not as the paper's protocol.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import pyro
import torch
from tqdm import tqdm

import image_model as model
from pyro_ffjord import bits_per_dim, dequantize, runs

FULL = dict(iters=100_000, valid_every=1000, valid_points=1000, test_points=10_000, probes=4, samples=64)
QUICK = dict(iters=6, valid_every=3, valid_points=8, test_points=8, probes=2, samples=16, batch_size=8,
             warmup_iters=2, hidden=[8], scales=2, blocks=1, tol=1e-3)
# What a resumed run may change (not --eval-batch-size: an adaptive solve steps a chunk as one)
FREE = ("iters", "max_minutes", "test_points", "samples", "data_dir")


def main(args) -> dict:
    data = model.load(args.data_dir)  # before anything is written
    out = runs.start(args)
    start_wall, device = time.perf_counter(), torch.device(args.device)
    train = data.train[: args.subset] if args.subset else data.train
    valid = dequantize(data.valid[: args.valid_points], torch.Generator().manual_seed(model.VALID_SEED)).to(device)
    test = dequantize(data.test[: args.test_points], torch.Generator().manual_seed(model.TEST_SEED)).to(device)
    options = model.flow_options(args.config, args.hidden, args.scales, args.blocks, args.tol, args.kinetic,
                                 args.jacobian, args.eval_trace)
    pyro.set_rng_seed(args.seed)  # initialisation, dequantization noise and Hutchinson probes
    flow, density = model.build(options, device)
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)

    training = runs.Training(args, out / "checkpoint.pt", runs.run_config(args, free=FREE))
    state = dict(iteration=0, losses=[], clock=[], nfe=[], nfe_backward=[], history=[], best_valid=math.inf,
                 best_iteration=None, best_model=None, training_solves=[0] * len(flow.flows))
    ck = training.resume()  # restores the random state; refuses a checkpoint of other options
    if ck is not None:
        flow.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        state.update((k, ck[k]) for k in state)
        for f, solves in zip(flow.flows, state["training_solves"]):  # the drift checks' schedule
            f.stats.training_solves = solves

    def checkpoint() -> dict:
        state["training_solves"] = [f.stats.training_solves for f in flow.flows]
        return dict(state, model=flow.state_dict(), optimizer=optimizer.state_dict())

    per_epoch, order = math.ceil(len(train) / args.batch_size), {}

    def batch(it: int) -> torch.Tensor:  # epoch e's shuffle depends on (seed, e) only: nothing to save
        epoch, k = divmod(it, per_epoch)
        if epoch not in order:
            order.clear()
            order[epoch] = torch.from_numpy(np.random.default_rng([args.seed, epoch]).permutation(len(train)))
        return dequantize(train[order[epoch][k * args.batch_size : (k + 1) * args.batch_size]]).to(device)

    def validate(done: int) -> None:
        with training.paused():  # not training time
            v = model.score(flow, density, valid, args.probes, args.eval_batch_size)
        state["history"].append(dict(iteration=done, seconds=training.elapsed(), valid_bpd=v["bpd"],
                                     valid_se=v["se"], nfe_per_solve=v["nfe_per_solve"]))
        if v["bpd"] < state["best_valid"]:
            best = {k: t.detach().clone() if torch.is_tensor(t) else t for k, t in flow.state_dict().items()}
            state.update(best_valid=v["bpd"], best_iteration=done, best_model=best)

    budget = 60.0 * args.max_minutes
    out_of_time = lambda: budget > 0 and training.elapsed() >= budget  # noqa: E731
    start = state["iteration"]
    flow.train()
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc=f"mnist {args.config}",
               disable=args.no_progress, dynamic_ncols=True)
    with training.loop(start):
        for it in bar:
            if out_of_time():
                break
            for group in optimizer.param_groups:  # the reference's linear warm-up
                group["lr"] = args.lr * min(1.0, (it + 1) / args.warmup_iters) if args.warmup_iters else args.lr
            loss = bits_per_dim(density.log_prob(batch(it)), model.NUM_DIMS).mean()
            optimizer.zero_grad()
            (loss + flow.regularization).backward()
            optimizer.step()
            state["iteration"] = done = it + 1
            state["losses"].append(loss.item())
            state["clock"].append(training.elapsed())
            state["nfe"].append([f.nfe_forward for f in flow.flows])
            state["nfe_backward"].append(sum(f.nfe_backward for f in flow.flows))  # adjoint solves
            if done % args.valid_every == 0:
                validate(done)
            bar.set_postfix(bpd=f"{state['losses'][-1]:.3f}", valid=f"{state['best_valid']:.3f}",
                            nfe=sum(state["nfe"][-1]), refresh=False)
            every = bool(args.checkpoint_every) and done % args.checkpoint_every == 0
            training.step(done, checkpoint, due=every or done == args.iters or out_of_time())
        if not training.path.exists():  # --iters 0: still leave a checkpoint
            training.save(state["iteration"], checkpoint)
    bar.close()
    done = state["iteration"]
    stopped = "iters" if done >= args.iters else "max_minutes"

    # Test the best model on validation; the last iterate competes if it was never validated.
    best_valid, best_iteration = state["best_valid"], state["best_iteration"]
    if not state["history"] or state["history"][-1]["iteration"] != done:
        last = model.score(flow, density, valid, args.probes, args.eval_batch_size)["bpd"]
        if last < best_valid or best_iteration is None:
            best_valid, best_iteration = last, done
    if best_iteration != done and state["best_model"] is not None:
        flow.load_state_dict(state["best_model"])
    t_eval = time.perf_counter()
    res = model.score(flow, density, test, args.probes, args.eval_batch_size)
    eval_seconds = time.perf_counter() - t_eval
    timing = training.summary()  # resumed, segments, train_seconds (all segments)
    title = (f"FFJORD on MNIST ({args.config}), {done} iterations, {training.describe()}: test "
             f"{res['bpd']:.3f} ± {res['se']:.3f} bits/dim (paper {model.PAPER_BPD})")
    model.save_samples(os.path.join(args.out, "samples.png"), flow, density, args.samples, title)
    model.plot_curve(os.path.join(args.out, "bpd_curve.png"), state["clock"], state["losses"], state["history"],
                     title, best_iteration)
    nfe = np.array(state["nfe"] or [[0] * len(flow.flows)], dtype=float)
    results = {
        "dataset": args.dataset, "config": args.config, "image_shape": list(model.IMAGE_SHAPE),
        "data": dict(source=data.source, train_images=len(train), valid_points=len(valid),
                     pixels="round(255 x) of the loader's k / 255 (exact), dequantized (k + u) / 256"),
        "flow_options": model.describe(flow, options), "params": sum(p.numel() for p in flow.parameters()),
        "batch_size": args.batch_size, "lr": args.lr, "warmup_iters": args.warmup_iters, "iterations": done,
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
    return results


def parse_args(argv=None) -> argparse.Namespace:
    count, whole, rate, weight = runs.positive_int, runs.nonnegative_int, runs.positive_float, runs.nonnegative_float
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=("mnist",), default="mnist")
    p.add_argument("--data-dir", default=model.default_data_dir(), help="folder of MNIST's four IDX files")
    p.add_argument("--config", choices=model.CONFIGS, default="paper",
                   help="paper: the reference's MNIST run; fast: the same model, fixed rk4 steps and RNODE")
    t = p.add_argument_group("training")
    t.add_argument("--iters", type=whole, default=None, help="at most this many (default 100000; --quick 6)")
    t.add_argument("--max-minutes", type=weight, default=0.0, help="training-time budget (0: none)")
    t.add_argument("--subset", type=count, default=None, help="train on the first N training images")
    t.add_argument("--batch-size", type=count, default=None, help="default 200 (--quick 8)")
    t.add_argument("--lr", type=rate, default=model.TRAINING["lr"], help="Adam, after the warm-up")
    t.add_argument("--warmup-iters", type=whole, default=None, help="linear lr warm-up (default 1000; --quick 2)")
    t.add_argument("--valid-every", type=count, default=None, help="iterations (default 1000; --quick 3)")
    t.add_argument("--checkpoint-every", type=whole, default=500, help="iterations (0: by minutes and Ctrl-C)")
    f = p.add_argument_group("flow (overrides of --config)")
    f.add_argument("--hidden", type=count, nargs="+", default=None, help="channels of each field (--quick 8)")
    f.add_argument("--scales", type=count, default=None, help="default 3 for 28x28 (--quick 2)")
    f.add_argument("--blocks", type=count, default=None, help="CNFs per block (default 2; --quick 1)")
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
    args = runs.parse(p, argv)
    if args.out is None:  # a --quick run keeps its own folder
        out = os.path.join("out", "image", f"{args.dataset}-{args.config}")
        args.out = runs.quick_out(out) if args.quick else out
    runs.fill_defaults(args, {**{k: None for k in QUICK}, **FULL, **model.TRAINING}, QUICK)
    return args


if __name__ == "__main__":
    runs.cli(main, parse_args)
