"""SVI guides side by side: the default FFJORD guide against the guides a Pyro user would pick.

Targets with a normalized density and no data, so that KL(q || p) = -ELBO exactly:

- banana (2-D): x1 ~ N(0, 2^2), x2 | x1 ~ N((x1^2 - 4) / 2, 1);
- funnel (10-D): v ~ N(0, 3^2), x_1..9 | v ~ N(0, e^v).

Guides, each trained with Adam at every ``--lrs`` for ``--steps`` steps on the same vectorized
particles, then scored in eval mode (for FFJORD: exact trace, adaptive dopri5):

- ``AutoNormalizingFlow(model, partial(iterated, 1, ffjord))``: FFJORD with every default;
- ``AutoNormal``, ``AutoMultivariateNormal``, ``AutoIAFNormal`` (Pyro's defaults);
- two spline autoregressive layers: ``AutoNormalizingFlow(model, partial(iterated, 2,
  spline_autoregressive))``.

Reports KL(q || p) (mean and standard error over ``--eval-batches`` batches of particles),
training wall time, and the time ratio to the spline guide.

    python benchmarks/svi_race.py --threads 1 --out benchmarks/results/svi_race.json
"""

from __future__ import annotations

import time
from functools import partial

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import iterated, spline_autoregressive
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal, AutoNormalizingFlow

from pyro_ffjord import ffjord, runs

from common import bench_parser, markdown_table, write_results


def banana():
    x1 = pyro.sample("x1", dist.Normal(0.0, 2.0))
    pyro.sample("x2", dist.Normal((x1**2 - 4) / 2, 1.0))


def funnel():
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(9), (v / 2).exp().unsqueeze(-1)).to_event(1))  # particles batch v


TARGETS = {"banana": banana, "funnel": funnel}
GUIDES = {
    "FFJORD (default)": lambda m: AutoNormalizingFlow(m, partial(iterated, 1, ffjord)),
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoIAFNormal": AutoIAFNormal,
    "spline AR x2": lambda m: AutoNormalizingFlow(m, partial(iterated, 2, spline_autoregressive)),
}


def kl(model, guide, batches: int, particles: int):
    """KL(q || p) = -ELBO (the targets are normalized), mean and standard error over batches."""
    guide.eval()
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=0)
    with torch.no_grad():
        values = torch.tensor([elbo.loss(model, guide) for _ in range(batches)])
    guide.train()
    return float(values.mean()), float(values.std() / batches**0.5)


def run(target: str, guide_name: str, lr: float, args) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = TARGETS[target]
    guide = GUIDES[guide_name](model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}),
              Trace_ELBO(num_particles=args.particles, vectorize_particles=True, max_plate_nesting=0))
    start = time.perf_counter()
    for _ in range(args.steps):
        svi.step()
    seconds = time.perf_counter() - start
    pyro.set_rng_seed(args.seed + 1)
    value, se = kl(model, guide, args.eval_batches, args.eval_particles)
    return {"target": target, "guide": guide_name, "lr": lr, "train_seconds": seconds, "kl": value, "kl_se": se}


def main(args):
    torch.set_num_threads(args.threads or runs.free_cores())
    rows = []
    for target in args.targets:
        for lr in args.lrs:
            group = []
            for name in GUIDES:
                row = run(target, name, lr, args)
                group.append(row)
                print(f"{target} lr={lr:g} {name}: KL {row['kl']:.3f} ± {row['kl_se']:.3f} in {row['train_seconds']:.1f} s",
                      flush=True)
            spline = next(r for r in group if r["guide"] == "spline AR x2")["train_seconds"]
            best_other = min(r["kl"] for r in group if not r["guide"].startswith("FFJORD"))
            for r in group:
                r["x_spline_time"] = r["train_seconds"] / spline
                r["kl_minus_best_other"] = r["kl"] - best_other
            rows += group
    table = markdown_table(rows, {
        "target": lambda r: r["target"], "lr": lambda r: f"{r['lr']:g}", "guide": lambda r: r["guide"],
        "KL(q‖p)": lambda r: f"{r['kl']:.3f} ± {r['kl_se']:.3f}", "train s": lambda r: f"{r['train_seconds']:.1f}",
        "x spline time": lambda r: f"{r['x_spline_time']:.2f}",
    })
    print(table)
    return write_results("svi_race", args, {"rows": rows, "table": table})


def parser():
    p = bench_parser(__doc__, out="", iters=0, batch_size=0, test_size=0)
    p.add_argument("--steps", type=int, default=800, help="SVI steps per guide")
    p.add_argument("--particles", type=int, default=8, help="vectorized ELBO particles per step")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-2, 1e-3])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--eval-particles", type=int, default=1000)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
