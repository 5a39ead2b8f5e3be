r"""Fit a 2-D toy density with FFJORD, the README's demo.

The density is a Pyro distribution, a standard normal base pushed through one learnable FFJORD
bijection, ``dist.TransformedDistribution(Normal(0, I), [FFJORD(2, ...)])``, fitted by maximum
likelihood on fresh batches of the toy sampler (``pyro_ffjord.datasets.toy``):
``loss = -density.log_prob(batch).mean()`` (one reverse ODE solve from the data to the base),
plus ``flow.regularization`` when the RNODE weights ``--kinetic``/``--jacobian`` are set.

Why plain Adam on ``flow.parameters()`` and not SVI: with no latent variable, SVI's ELBO (empty
guide) *is* the log-likelihood and would only hide the loss and the RNODE penalty. Inside a
model, register the flow with ``pyro.module("flow", flow)`` (see ``examples/flow_prior.py``).

Training uses the library's fast configuration (exact trace, backpropagation through
``--steps`` fixed rk4 steps); everything reported is computed in eval mode (exact trace,
adaptive dopri5 at ``--tol``), the continuous-time model. Over a long run a flow trained
through few fixed steps can learn to exploit the discretisation: the RNODE weights (default
0.05) prevent it, and ``results.json`` gives the held-out NLL both ways (``test_nll``,
``test_nll_training_solver``) so such a run shows. Measurements: ``docs/toy_density.md``.

``--objective fm`` trains the same flow by conditional flow matching instead
(:func:`pyro_ffjord.flow_matching_loss`, ``--coupling`` ``ot`` by default, ``--sigma-min``): each
step regresses the field on straight base-to-data paths, with no ODE solve (so ``--solver``,
``--steps``, ``--trace`` and the RNODE weights play no part in training); the per-iteration
``losses`` are then flow-matching losses (``train_loss_kind`` in ``results.json``), not NLLs, and
everything reported is evaluated exactly as for the default ``--objective mle``. ``--mle-after
0.5`` mixes the two: flow matching for the first half of ``--iters``, then maximum likelihood of
the same flow (Adam's moments restarted; ``mle_from`` in ``results.json``).

Outputs in ``--out`` (default ``out/toy_density``): ``density.png`` (data, model density on a
grid, model samples on :math:`[-4, 4]^2`), ``trajectory.png`` (base samples pushed through the
flow, :math:`t \in [0, T]`), ``results.json`` and ``checkpoint.pt`` (model, optimizer, losses,
torch and numpy random states, the run's options and the time of each training segment),
written every ``--checkpoint-every`` iterations, every ``--checkpoint-minutes`` and on Ctrl-C
(which then exits). ``--resume`` continues from it and gives the same parameters as an
uninterrupted run with the same seed (same thread count); it refuses a checkpoint written with
other options (``--lr``, ``--seed``, ``--data``, the flow's...), as a changed learning rate or
seed would make the results describe a run that never happened. Run::

    python examples/toy_density.py                       # about 2 minutes on one CPU core
    python examples/toy_density.py --data 8gaussians --iters 4000 --out out/8gaussians
    python examples/toy_density.py --iters 6000 --resume # train 2000 more iterations
    python examples/toy_density.py --quick               # seconds, for tests (out/toy_density-quick)
"""

import argparse
import math
import os
import time

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from torchdiffeq import odeint  # noqa: E402
from tqdm import tqdm  # noqa: E402

import density_common as common  # noqa: E402
from pyro_ffjord import FFJORD, distributed, flow_matching_loss, runs  # noqa: E402
from pyro_ffjord.datasets import toy  # noqa: E402

LIMIT = 4.0  # pictures show [-LIMIT, LIMIT]^2
TEST_SEED = 2**31 - 1  # held-out points: the same for every --seed
PICTURE_SEED = 2**31 - 2  # base samples of the pictures (drawn without touching the training RNG)
FREE = ("iters", "test_points", "grid", "picture_samples", "trajectory_points", "trajectory_panels", "eval_chunk")
FULL = dict(iters=3000, test_points=2000, grid=100, picture_samples=20000, trajectory_points=2000)
QUICK = dict(iters=20, test_points=200, grid=24, picture_samples=400, trajectory_points=200)


@torch.no_grad()
def log_prob_chunked(density, points: torch.Tensor, chunk: int) -> torch.Tensor:
    """``density.log_prob`` of many points, ``chunk`` at a time (callers set eval mode)."""
    return torch.cat([density.log_prob(points[i : i + chunk]) for i in range(0, len(points), chunk)])


def test_nll(flow: FFJORD, density, test: torch.Tensor, chunk: int, mode: str = "eval") -> dict:
    """Mean negative log-likelihood (nats) of held-out points in eval mode (exact trace, dopri5);
    ``mode="train"`` scores them with the training solver and trace instead."""
    was_training = flow.training
    flow.train(mode == "train")
    try:
        with torch.random.fork_rng(devices=[test.device] if test.device.type == "cuda" else []):
            lp = log_prob_chunked(density, test, chunk).double()  # Hutchinson probes use the RNG
    finally:
        flow.train(was_training)
    return {"nll": float(-lp.mean()), "se": float(lp.std() / math.sqrt(len(lp))) if len(lp) > 1 else 0.0,
            "finite": bool(torch.isfinite(lp).all()), "nfe_forward_eval": flow.nfe_forward}


def panel(ax, title: str, points: torch.Tensor = None, bins: int = 0) -> None:
    if points is not None:
        pts = points.detach().cpu().numpy()
        ax.hist2d(pts[:, 0], pts[:, 1], bins=bins, range=[[-LIMIT, LIMIT]] * 2, cmap="viridis")
    ax.set(xlim=(-LIMIT, LIMIT), ylim=(-LIMIT, LIMIT), xticks=[], yticks=[], title=title, aspect="equal")


@torch.no_grad()
def make_pictures(args, flow: FFJORD, density, title: str) -> float:
    """Write ``density.png`` and ``trajectory.png`` (in eval mode); returns the seconds taken."""
    t0, was_training, device = time.perf_counter(), flow.training, args.device
    flow.eval()
    try:
        with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
            torch.manual_seed(PICTURE_SEED)
            data = toy.sample(args.data, args.picture_samples, seed=PICTURE_SEED)
            side = torch.linspace(-LIMIT, LIMIT, args.grid)  # density on a grid, chunk by chunk
            xx, yy = torch.meshgrid(side, side, indexing="xy")
            grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1).to(device)
            logp = log_prob_chunked(density, grid, args.eval_chunk).reshape(args.grid, args.grid)
            n, chunk = args.picture_samples, args.eval_chunk
            samples = torch.cat([density.sample((min(chunk, n - i),)) for i in range(0, n, chunk)])
            z0 = torch.randn(args.trajectory_points, 2, device=device)
            times = torch.linspace(0.0, float(flow.end_time), args.trajectory_panels, device=device)
            states = odeint(lambda t, z: flow.net(t, z), z0, times, method="dopri5", rtol=args.tol, atol=args.tol)
    finally:
        flow.train(was_training)

    bins = max(20, min(100, int(math.sqrt(args.picture_samples) / 1.5)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    panel(axes[0], f"data ({args.data})", data, bins)
    axes[1].pcolormesh(side.numpy(), side.numpy(), logp.exp().cpu().numpy(), cmap="viridis", shading="auto")
    panel(axes[1], "model density")
    panel(axes[2], "model samples", samples, bins)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "density.png"), dpi=100)
    plt.close(fig)

    angle = torch.atan2(z0[:, 1], z0[:, 0]).cpu().numpy()
    fig, axes = plt.subplots(1, args.trajectory_panels, figsize=(2.6 * args.trajectory_panels, 2.9))
    for ax, t, z in zip(np.atleast_1d(axes), times.tolist(), states.cpu().numpy()):
        ax.scatter(z[:, 0], z[:, 1], c=angle, cmap="hsv", s=1.5, linewidths=0)
        panel(ax, f"t = {t:.2f}")
    fig.suptitle("base samples pushed through the flow, dz/dt = f(z, t), t from 0 to T")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "trajectory.png"), dpi=100)
    plt.close(fig)
    return time.perf_counter() - t0


def main(args) -> dict:
    runs.fill_defaults(args, full=FULL, quick=QUICK)
    world = distributed.setup(args)  # under torchrun: one of several processes (docs/distributed.md)
    world.per_rank(args.batch_size)  # the global batch must split evenly
    out = runs.start(args)
    start_wall, device = time.perf_counter(), torch.device(args.device)

    world.seed(args.seed)  # initialisation (and Hutchinson probes, if used; seed + rank)
    flow = FFJORD(2, hidden_dims=args.hidden, activation=args.activation, zero_init=args.zero_init, T=args.T,
                  trace=args.trace, solver=args.solver, steps=args.steps, eval_solver="dopri5", atol=args.tol,
                  rtol=args.tol, adjoint=args.adjoint, kinetic=args.kinetic, jacobian=args.jacobian).to(device)
    base = dist.Normal(torch.zeros(2, device=device), torch.ones(2, device=device)).to_event(1)
    density = dist.TransformedDistribution(base, [flow])
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)  # training batches (the same global batch on every rank)
    test = toy.sample(args.data, args.test_points, seed=TEST_SEED).to(device)

    # Checkpoints by iterations, minutes and Ctrl-C; --resume refuses one written with other options.
    config = runs.run_config(args, free=FREE + common.objective_free(args))
    training = runs.Training(args, out / "checkpoint.pt", config, numpy_rng=rng)
    state = {"iteration": 0, "losses": [], "nfe_forward": [], "mle_from": None}  # mle_from: --mle-after
    ck = training.resume()  # restores the torch and numpy random states too
    if ck is not None:
        flow.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        state.update({k: ck[k] for k in (*state, "test_nll_initial") if k in ck})  # older ones lack mle_from
    else:
        state["test_nll_initial"] = test_nll(flow, density, test, args.eval_chunk)["nll"] if world.is_main else None
    start, losses, nfes = state["iteration"], state["losses"], state["nfe_forward"]

    def loss_of(batch: torch.Tensor, phase: str):  # (the loss, what is minimised) of a batch (this rank's share)
        if phase == "fm":  # no solve: the field regressed on the paths' velocities
            loss = flow_matching_loss(flow, batch, coupling=args.coupling, sigma_min=args.sigma_min)
            return loss, loss
        loss = -density.log_prob(batch).mean()
        return loss, loss if flow.regularization is None else loss + flow.regularization

    objective = common.parallel(world, training, args, state, loss_of, flow)  # DDP under torchrun

    def checkpoint() -> dict:
        return {**state, "model": flow.state_dict(), "optimizer": optimizer.state_dict()}

    flow.train()
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc=args.data,
               disable=args.no_progress, dynamic_ncols=True)
    with training.loop(start):
        training.segments[-1]["world_size"] = world.world_size  # a resumed run may use another
        for it in bar:
            batch = toy.sample(args.data, args.batch_size, seed=rng).to(device)
            x = world.share(batch)
            phase = common.objective_now(args, state, training, optimizer, world)
            loss, total = objective(x, phase)
            optimizer.zero_grad()
            world.scale(total, len(x), len(batch)).backward()  # DDP averages the ranks' gradients
            optimizer.step()
            losses.append(world.mean(loss.item(), len(x)))  # the global batch's loss
            nfes.append(0 if phase == "fm" else flow.nfe_forward)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", nfe=nfes[-1], refresh=False)
            state["iteration"] = done = it + 1
            every = args.checkpoint_every and done % args.checkpoint_every == 0
            if world.is_main:  # rank 0 writes the checkpoints
                training.step(done, checkpoint, due=done == args.iters or every)
        if world.is_main and start >= args.iters and not training.path.exists():  # --iters 0: still one
            training.save(start, checkpoint)
    bar.close()
    if not world.is_main:
        return world.finish({})  # rank 0 tests, draws and writes

    t_eval = time.perf_counter()
    res = test_nll(flow, density, test, args.eval_chunk)
    eval_seconds = time.perf_counter() - t_eval
    res_train = test_nll(flow, density, test, args.eval_chunk, mode="train")
    timing = training.summary()  # resumed, segments, train_seconds (all segments)
    iterations, train_seconds, tail = max(start, args.iters), timing["train_seconds"], losses[-100:]
    how = f" ({common.objective_words(args)}, {args.coupling} coupling)" if args.objective == "fm" else ""
    title = f"FFJORD{how}, {iterations} iterations, {training.describe()}, test NLL {res['nll']:.3f} nats"
    picture_seconds = make_pictures(args, flow, density, title)
    flow_options = dict(vars(flow.config), hidden_dims=list(args.hidden), activation=args.activation,
                        time_embedding="concatsquash", zero_init=args.zero_init)
    results = {
        "data": args.data, **common.objective_results(args, state),
        "iterations": iterations, "resumed_from": start if training.resumed else None,
        "batch_size": args.batch_size, **world.describe(args.seed, args.batch_size),
        **timing, "seconds_per_iteration": train_seconds / len(losses) if losses else None,
        "eval_seconds": eval_seconds, "picture_seconds": picture_seconds,
        "wall_seconds": time.perf_counter() - start_wall, "test_nll": res["nll"], "test_nll_se": res["se"],
        "test_nll_initial": state["test_nll_initial"], "test_nll_training_solver": res_train["nll"],
        "test_nll_training_solver_note": "the same points scored in training mode (--solver, --steps, "
                                         "--trace); far below test_nll means the flow fits its "
                                         "discretisation, not the ODE: use more --steps or RNODE weights",
        "test_points": args.test_points, "test_finite": res["finite"],
        "evaluation": "flow.eval(): exact trace, dopri5 atol = rtol = --tol; mean -log p over held-out "
                      f"points drawn with seed {TEST_SEED}",
        "train_loss_last100": sum(tail) / len(tail) if tail else None,
        "nfe_forward_mean": sum(nfes) / len(nfes) if nfes else None, "nfe_forward_last": nfes[-1] if nfes else None,
        "nfe_forward_eval": res["nfe_forward_eval"], "params": sum(p.numel() for p in flow.parameters()),
        "flow_options": flow_options, "losses": losses,
    }
    results = runs.write_results(args, "toy_density", results, filename="results.json")
    if not args.no_progress:
        print(f"{args.data}: {iterations} iterations in {training.describe()} "
              f"({results['nfe_forward_mean'] or 0:.1f} NFE/iteration), test NLL {res['nll']:.3f} "
              f"± {res['se']:.3f} nats (untrained {state['test_nll_initial']:.3f}); pictures in {args.out}")
    return world.finish(results)  # the other ranks wait for rank 0 here


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=toy.NAMES, default="pinwheel")
    count, whole, rate, weight = runs.positive_int, runs.nonnegative_int, runs.positive_float, runs.nonnegative_float
    common.add_objective_args(p.add_argument_group("objective"))
    p.add_argument("--iters", type=whole, default=None, help="training iterations (default 3000; --quick 20)")
    p.add_argument("--batch-size", type=count, default=256)
    p.add_argument("--lr", type=rate, default=1e-3, help="Adam (5e-3 and 2e-3 diverged)")
    p.add_argument("--weight-decay", type=weight, default=1e-5)
    p.add_argument("--checkpoint-every", type=whole, default=500, help="iterations (0: at the end only)")
    # one thread: a 64-wide field at D = 2 is far too small to share among threads (a second one
    # only adds synchronisation, and on a busy machine waits for a core)
    runs.add_run_args(p, out=os.path.join("out", "toy_density"), resume=True, threads=1,
                      threads_note="64-wide nets at D = 2 are too small for more")
    f = p.add_argument_group("flow")
    f.add_argument("--hidden", type=count, nargs="+", default=[64, 64, 64], help="hidden widths of f")
    f.add_argument("--activation", default="tanh")
    f.add_argument("--zero-init", action="store_true", help="start as the identity map")
    f.add_argument("--T", type=rate, default=0.5, help="end time")
    f.add_argument("--trace", choices=("exact", "hutchinson"), default="exact", help="in training")
    f.add_argument("--solver", default="rk4", help="training solver (torchdiffeq method)")
    f.add_argument("--steps", type=count, default=3, help="steps of a fixed-grid training solver")
    f.add_argument("--tol", type=rate, default=1e-5, help="atol = rtol of dopri5 (evaluation)")
    f.add_argument("--adjoint", action="store_true", help="adjoint gradients (less memory, slower)")
    f.add_argument("--kinetic", type=weight, default=0.05, help="RNODE kinetic-energy weight")
    f.add_argument("--jacobian", type=weight, default=0.05, help="RNODE Jacobian-norm weight")
    e = p.add_argument_group("evaluation")
    e.add_argument("--test-points", type=count, default=None, help="held-out points (default 2000)")
    e.add_argument("--grid", type=count, default=None, help="density grid side (default 100)")
    e.add_argument("--picture-samples", type=count, default=None, help="data and model samples (20000)")
    e.add_argument("--trajectory-points", type=count, default=None, help="default 2000")
    e.add_argument("--trajectory-panels", type=count, default=6)
    e.add_argument("--eval-chunk", type=count, default=2500, help="points per evaluation solve")
    distributed.add_args(p)  # --dist-timeout (torchrun)
    args = runs.parse(p, argv)
    common.check_objective(p, args)
    return args


if __name__ == "__main__":
    runs.cli(main, parse_args)
