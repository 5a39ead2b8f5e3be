r"""Fit a 2-D toy density with FFJORD, the README's demo.

The density is a Pyro distribution: a standard normal base pushed through one learnable
FFJORD bijection,

.. code-block:: python

    flow = FFJORD(2, hidden_dims=[64, 64, 64], ...)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    density = dist.TransformedDistribution(base, [flow])

fitted by maximum likelihood on fresh batches of the toy sampler
(``pyro_ffjord.datasets.toy``): ``loss = -density.log_prob(batch).mean()``, plus
``flow.regularization`` when the RNODE weights ``--kinetic``/``--jacobian`` are set. Each
``log_prob`` is one reverse ODE solve from the data to the base.

Why a plain ``torch.optim.Adam`` on ``flow.parameters()`` and not ``pyro.module`` + SVI: the
data are observed and there is no latent variable, so SVI would run with an empty guide and
its ELBO *is* the log-likelihood; going through the guide machinery only hides the loss and
the RNODE penalty (which must be added after the solve). ``flow`` is a
``pyro.distributions.TransformModule`` (an ``nn.Module``), so its parameters are ordinary
tensors; this also keeps the checkpoint to plain state dicts. To learn the same flow inside a
model with SVI instead, register it with ``pyro.module("flow", flow)`` (see the README's SVI
section and ``examples/flow_prior.py``).

Training defaults are the library's fast configuration (``FFJORD(..., preset="fast")``):
exact trace, backpropagation through ``--steps`` fixed rk4 steps. Everything reported is
computed in eval mode (``flow.eval()``): exact trace and adaptive dopri5 (``--tol``), so the
test NLL is that of the continuous-time model, not of the training discretisation.

Why RNODE weights 0.05 and lr 1e-3 by default (pinwheel, 3000 iterations, one CPU thread,
2026-11-24/25): without them, lr 5e-3 and 2e-3 diverged after 1000-2000 iterations (test NLL
6.5 and 4.1 from 4.0 at the start), and lr 1e-3 reached a test NLL of 2.41 while the training
solver's NLL was 2.22: over a long run a flow trained through 3 fixed rk4 steps learns to
exploit the discretisation. With kinetic = jacobian = 0.01 the test NLL is 2.31 (gap 0.06);
with 0.05 it is 2.31 as well, the gap 0.005 and the dopri5 evaluation needs 56 function
evaluations instead of 92. ``results.json`` reports both figures (``test_nll`` and
``test_nll_training_solver``) so a run that fits its discretisation shows.

Outputs in ``--out`` (default ``out/toy_density``):

- ``density.png``: data histogram, model density :math:`\exp\log p(x)` on a grid, histogram
  of model samples, all on :math:`[-4, 4]^2`;
- ``trajectory.png``: base samples pushed through the flow, shown at times
  :math:`t \in [0, T]` (solved with ``torchdiffeq.odeint`` on ``dz/dt = flow.net(t, z)``),
  coloured by their starting angle;
- ``results.json``: configuration, training time, function evaluations (NFE), test NLL;
- ``checkpoint.pt``: model, optimizer, iteration, losses and RNG states (torch and the numpy
  generator of the training batches), written with ``torch.save`` from state dicts and plain
  values and read with ``torch.load(weights_only=True)``. ``--resume`` continues from it and
  gives the same parameters as an uninterrupted run with the same seed (same thread count).

Run::

    python examples/toy_density.py                       # about 2 minutes on one CPU core
    python examples/toy_density.py --data 8gaussians --iters 4000
    python examples/toy_density.py --iters 6000 --resume # train 2000 more iterations
    python examples/toy_density.py --quick               # seconds, for tests
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from torchdiffeq import odeint  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pyro_ffjord import FFJORD  # noqa: E402
from pyro_ffjord.datasets import toy  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the examples' own modules
from run_info import atomic_save  # noqa: E402

LIMIT = 4.0  # pictures show [-LIMIT, LIMIT]^2
TEST_SEED = 2**31 - 1  # held-out points: the same for every --seed
PICTURE_SEED = 2**31 - 2  # base samples of the pictures (drawn without touching the training RNG)


def free_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_flow(args) -> FFJORD:
    fixed_step = args.solver in ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")
    return FFJORD(
        2,
        hidden_dims=args.hidden,
        activation=args.activation,
        zero_init=args.zero_init,
        trace=args.trace,
        solver=args.solver,
        step_size=args.T / args.steps if fixed_step else None,
        eval_solver="dopri5",
        atol=args.tol,
        rtol=args.tol,
        adjoint=args.adjoint,
        T=args.T,
        kinetic=args.kinetic,
        jacobian=args.jacobian,
    )


def make_density(flow: FFJORD, device) -> dist.TransformedDistribution:
    base = dist.Normal(torch.zeros(2, device=device), torch.ones(2, device=device)).to_event(1)
    return dist.TransformedDistribution(base, [flow])


@torch.no_grad()
def log_prob_chunked(density, points: torch.Tensor, chunk: int) -> torch.Tensor:
    """``density.log_prob`` of many points, ``chunk`` at a time (callers set eval mode)."""
    return torch.cat([density.log_prob(points[i : i + chunk]) for i in range(0, len(points), chunk)])


def test_nll(flow: FFJORD, density, test: torch.Tensor, chunk: int, mode: str = "eval") -> dict:
    """Mean negative log-likelihood (nats) of the held-out points: in eval mode (exact trace,
    dopri5) by default; ``mode="train"`` scores them with the training solver and trace instead,
    which shows whether the model fits its training discretisation rather than the ODE."""
    was_training = flow.training
    flow.train(mode == "train")
    try:
        with torch.random.fork_rng(devices=[test.device] if test.device.type == "cuda" else []):
            lp = log_prob_chunked(density, test, chunk).double()  # Hutchinson probes use the RNG
    finally:
        flow.train(was_training)
    return {
        "nll": float(-lp.mean()),
        "se": float(lp.std() / math.sqrt(len(lp))) if len(lp) > 1 else 0.0,
        "finite": bool(torch.isfinite(lp).all()),
        "nfe_forward_eval": flow.nfe_forward,
    }


@torch.no_grad()
def trajectory(flow: FFJORD, z0: torch.Tensor, times: torch.Tensor, tol: float) -> torch.Tensor:
    """States of base samples ``z0`` at ``times`` (``0 .. T``) under ``dz/dt = flow.net(t, z)``."""
    return odeint(lambda t, z: flow.net(t, z), z0, times, method="dopri5", rtol=tol, atol=tol)


def hist2d(ax, points: torch.Tensor, bins: int, title: str) -> None:
    pts = points.detach().cpu().numpy()
    ax.hist2d(pts[:, 0], pts[:, 1], bins=bins, range=[[-LIMIT, LIMIT], [-LIMIT, LIMIT]], cmap="viridis")
    finish(ax, title)


def finish(ax, title: str) -> None:
    ax.set_xlim(-LIMIT, LIMIT)
    ax.set_ylim(-LIMIT, LIMIT)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)


def make_pictures(args, flow: FFJORD, density, stats: dict) -> dict:
    """Write ``density.png`` and ``trajectory.png``; returns timings and NFE."""
    was_training = flow.training
    flow.eval()
    device = args.device
    out = {}
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[device] if str(device).startswith("cuda") else []):
            torch.manual_seed(PICTURE_SEED)
            data = toy.sample(args.data, args.picture_samples, seed=PICTURE_SEED)
            # Density on a grid: one reverse solve (exact trace) per chunk.
            side = torch.linspace(-LIMIT, LIMIT, args.grid)
            xx, yy = torch.meshgrid(side, side, indexing="xy")
            grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1).to(device)
            logp = log_prob_chunked(density, grid, args.eval_chunk).reshape(args.grid, args.grid)
            out["nfe_forward_grid_last_chunk"] = flow.nfe_forward
            with torch.no_grad():
                samples = torch.cat([
                    density.sample((min(args.eval_chunk, args.picture_samples - i),))
                    for i in range(0, args.picture_samples, args.eval_chunk)
                ])
            z0 = torch.randn(args.trajectory_points, 2, device=device)
            times = torch.linspace(0.0, float(flow.end_time), args.trajectory_panels, device=device)
            states = trajectory(flow, z0, times, args.tol)
    finally:
        flow.train(was_training)

    bins = max(20, min(100, int(math.sqrt(args.picture_samples) / 1.5)))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3))
    hist2d(axes[0], data, bins, f"data ({args.data})")
    axes[1].pcolormesh(side.numpy(), side.numpy(), logp.exp().cpu().numpy(), cmap="viridis", shading="auto")
    finish(axes[1], "model density")
    hist2d(axes[2], samples, bins, "model samples")
    fig.suptitle(
        f"FFJORD, {stats['iterations']} iterations, {stats['train_seconds']:.0f} s, "
        f"test NLL {stats['test_nll']:.3f} nats"
    )
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "density.png"), dpi=100)
    plt.close(fig)

    angle = torch.atan2(z0[:, 1], z0[:, 0]).cpu().numpy()
    n = args.trajectory_panels
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.9))
    for ax, t, z in zip(np.atleast_1d(axes), times.tolist(), states.cpu().numpy()):
        ax.scatter(z[:, 0], z[:, 1], c=angle, cmap="hsv", s=1.5, linewidths=0)
        finish(ax, f"t = {t:.2f}")
    fig.suptitle("base samples pushed through the flow, dz/dt = f(z, t), t from 0 to T")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "trajectory.png"), dpi=100)
    plt.close(fig)
    out["seconds"] = time.perf_counter() - t0
    return out


def checkpoint(path, flow, optimizer, iteration, losses, nfes, train_seconds, nll_initial, rng, args) -> None:
    state = {
        "model": flow.state_dict(),
        "optimizer": optimizer.state_dict(),
        "iteration": iteration,
        "losses": list(losses),
        "nfe_forward": list(nfes),
        "train_seconds": train_seconds,
        "test_nll_initial": nll_initial,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": rng.bit_generator.state,  # a dict of str and int: weights_only-safe
        "data": args.data,
        "seed": args.seed,
    }
    if str(args.device).startswith("cuda"):
        state["cuda_rng"] = torch.cuda.get_rng_state(torch.device(args.device))
    atomic_save(state, path)


def main(args) -> dict:
    if args.quick:
        args.iters = 20 if args.iters is None else args.iters
        args.test_points = args.test_points or 200
        args.grid = args.grid or 24
        args.picture_samples = args.picture_samples or 400
        args.trajectory_points = args.trajectory_points or 200
    args.iters = 3000 if args.iters is None else args.iters
    args.test_points = args.test_points or 2000
    args.grid = args.grid or 100
    args.picture_samples = args.picture_samples or 20000
    args.trajectory_points = args.trajectory_points or 2000
    if args.threads is None:
        args.threads = free_cores()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start_wall = time.perf_counter()
    device = torch.device(args.device)

    pyro.set_rng_seed(args.seed)  # initialisation (and Hutchinson probes, if used)
    flow = build_flow(args).to(device)
    density = make_density(flow, device)
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng = np.random.default_rng(args.seed)  # training batches
    test = toy.sample(args.data, args.test_points, seed=TEST_SEED).to(device)

    start, losses, nfes, train_seconds, nll_initial = 0, [], [], 0.0, None
    resumed_from = None
    if args.resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ck = torch.load(ckpt_path, map_location=device, weights_only=True)
        if ck["data"] != args.data:
            raise ValueError(f"the checkpoint was trained on {ck['data']!r}, not {args.data!r}")
        flow.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        start = resumed_from = ck["iteration"]
        losses, nfes, train_seconds = ck["losses"], ck["nfe_forward"], ck["train_seconds"]
        nll_initial = ck["test_nll_initial"]
        torch.set_rng_state(ck["torch_rng"])
        if "cuda_rng" in ck and device.type == "cuda":
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        rng.bit_generator.state = ck["numpy_rng"]
    else:
        nll_initial = test_nll(flow, density, test, args.eval_chunk)["nll"]

    flow.train()
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc=args.data,
               disable=args.no_progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for it in bar:
        batch = toy.sample(args.data, args.batch_size, seed=rng).to(device)
        loss = -density.log_prob(batch).mean()
        total = loss if flow.regularization is None else loss + flow.regularization
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(loss.item())
        nfes.append(flow.nfe_forward)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", nfe=nfes[-1], refresh=False)
        done = it + 1
        if done == args.iters or (args.checkpoint_every and done % args.checkpoint_every == 0):
            now = time.perf_counter()
            train_seconds += now - t0
            checkpoint(ckpt_path, flow, optimizer, done, losses, nfes, train_seconds, nll_initial, rng, args)
            t0 = time.perf_counter()  # checkpoint writing is not training time
    bar.close()
    if start >= args.iters and not os.path.exists(ckpt_path):  # --iters 0: still leave a checkpoint
        checkpoint(ckpt_path, flow, optimizer, start, losses, nfes, train_seconds, nll_initial, rng, args)

    t_eval = time.perf_counter()
    res = test_nll(flow, density, test, args.eval_chunk)
    eval_seconds = time.perf_counter() - t_eval
    res_train = test_nll(flow, density, test, args.eval_chunk, mode="train")
    iterations = max(start, args.iters)
    tail = losses[-min(len(losses), 100):]
    stats = {"iterations": iterations, "train_seconds": train_seconds, "test_nll": res["nll"]}
    pictures = make_pictures(args, flow, density, stats)

    config = {k: v for k, v in vars(args).items()}
    flow_options = dict(vars(flow.config))
    flow_options.update(hidden_dims=list(args.hidden), activation=args.activation,
                        time_embedding="concatsquash", zero_init=args.zero_init)
    results = {
        "data": args.data,
        "iterations": iterations,
        "resumed_from": resumed_from,
        "train_seconds": train_seconds,
        "seconds_per_iteration": train_seconds / len(losses) if losses else None,
        "eval_seconds": eval_seconds,
        "picture_seconds": pictures["seconds"],
        "wall_seconds": time.perf_counter() - start_wall,
        "test_nll": res["nll"],
        "test_nll_se": res["se"],
        "test_nll_initial": nll_initial,
        "test_nll_training_solver": res_train["nll"],
        "test_nll_training_solver_note": "the same points scored in training mode (--solver, --steps, "
                                         "--trace); far below test_nll means the flow fits its "
                                         "discretisation, not the ODE: use more --steps or RNODE weights",
        "test_points": args.test_points,
        "test_finite": res["finite"],
        "evaluation": "flow.eval(): exact trace, dopri5 atol = rtol = --tol; mean -log p over held-out "
                      f"points drawn with seed {TEST_SEED}",
        "train_loss_last100": sum(tail) / len(tail) if tail else None,
        "nfe_forward_mean": sum(nfes) / len(nfes) if nfes else None,
        "nfe_forward_last": nfes[-1] if nfes else None,
        "nfe_forward_eval": res["nfe_forward_eval"],
        "params": sum(p.numel() for p in flow.parameters()),
        "config": config,
        "flow_options": flow_options,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "losses": losses,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not args.no_progress:
        print(
            f"{args.data}: {iterations} iterations in {train_seconds:.1f} s "
            f"({results['nfe_forward_mean'] or 0:.1f} NFE/iteration), test NLL {res['nll']:.3f} "
            f"± {res['se']:.3f} nats (untrained {nll_initial:.3f}); pictures in {args.out}"
        )
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", choices=toy.NAMES, default="pinwheel")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default 3000; --quick 20)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam (5e-3 and 2e-3 diverged)")
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0, help="initialisation and training batches")
    p.add_argument("--out", default=os.path.join("out", "toy_density"))
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=500, help="iterations (0: at the end only)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: free cores)")
    p.add_argument("--quick", action="store_true", help="tiny budget for tests (seconds)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, no summary line")
    f = p.add_argument_group("flow")
    f.add_argument("--hidden", type=int, nargs="+", default=[64, 64, 64], help="hidden widths of f")
    f.add_argument("--activation", default="tanh")
    f.add_argument("--zero-init", action="store_true", help="start as the identity map")
    f.add_argument("--T", type=float, default=0.5, help="end time")
    f.add_argument("--trace", choices=("exact", "hutchinson"), default="exact", help="in training")
    f.add_argument("--solver", default="rk4", help="training solver (torchdiffeq method)")
    f.add_argument("--steps", type=int, default=3, help="steps of a fixed-step training solver")
    f.add_argument("--tol", type=float, default=1e-5, help="atol = rtol of dopri5 (evaluation)")
    f.add_argument("--adjoint", action="store_true", help="adjoint gradients (less memory, slower)")
    f.add_argument("--kinetic", type=float, default=0.05, help="RNODE kinetic-energy weight")
    f.add_argument("--jacobian", type=float, default=0.05, help="RNODE Jacobian-norm weight")
    e = p.add_argument_group("evaluation")
    e.add_argument("--test-points", type=int, default=None, help="held-out points (default 2000)")
    e.add_argument("--grid", type=int, default=None, help="density grid side (default 100)")
    e.add_argument("--picture-samples", type=int, default=None, help="data and model samples (20000)")
    e.add_argument("--trajectory-points", type=int, default=None, help="default 2000")
    e.add_argument("--trajectory-panels", type=int, default=6)
    e.add_argument("--eval-chunk", type=int, default=2500, help="points per evaluation solve")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
