"""Flow matching against maximum likelihood: the same FFJORD field, trained with and without a solve.

Problems: pinwheel and 8gaussians (2-D), scikit-learn's bundled breast-cancer table (30-D,
MAF's split and normalisation) and MNIST made D-dimensional as in ``dim_sweep.py`` (dequantized,
logit-transformed, first D principal components, standardized; ``--mnist-dim``). Contenders,
each an ``FFJORD(D, T=1)`` with the default field, trained with Adam (lr 1e-3) on the same
stream of batches for the same training time, in one run on one thread:

- maximum likelihood with every default (3 rk4 steps, Hutchinson above D = 4);
- maximum likelihood with ``preset="fast"`` (the exact trace at every D);
- flow matching, independent coupling, and flow matching with the minibatch OT coupling
  (``pyro_ffjord.flow_matching_loss``: no solve in training);
- a mixed schedule: flow matching (independent) for the first ``--switch`` of the budget, then
  maximum likelihood with the defaults (a fresh Adam: the two losses' gradient scales differ).

At ``--scores`` training times spaced geometrically from ``--seconds / 64`` to ``--seconds`` (so
a contender that is many times faster is resolved, not rounded up to the first scoring) each is
scored on the same held-out points in eval mode (exact trace, dopri5: the same exact
log-likelihood for every objective). Scoring is not training time.
Reported: the test NLL reached at the end (equal time), the training time at which each first
reached the best NLL that maximum likelihood with the defaults reached, the ratio of that time
to maximum likelihood's, and the eval NFE per solve of the trained field.

    python benchmarks/flow_matching.py --seconds 60 --mnist-dims 16 64 --out benchmarks/results/flow_matching.json
"""

from __future__ import annotations

import math
import os
import time

import torch

from pyro_ffjord import flow_matching_loss, runs
from pyro_ffjord.datasets import tabular, toy

from common import OurFFJORD, bench_parser, markdown_table, minibatches, optimizer_step, write_results

MNIST_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def problems(args):
    """(name, train, test) for every problem asked for."""
    for name in args.problems:
        if name in toy.NAMES:
            yield name, toy.sample(name, 50_000, seed=args.seed), toy.sample(name, args.test_size, seed=args.seed + 1)
        elif name == "breast_cancer":
            data = tabular.load("breast_cancer")
            yield name, data.train, torch.cat([data.valid, data.test])
        elif name == "mnist":
            from dim_sweep import realistic

            for dim in args.mnist_dims:
                train, test = realistic(dim, args.test_size, args.mnist_dir, args.seed)
                yield f"mnist-{dim}", train, test
        else:
            raise ValueError(f"unknown problem {name!r}")


class Contender(OurFFJORD):
    """An FFJORD(D, T=1) trained by maximum likelihood or by flow matching (``"fm"``), or by
    flow matching until ``switch`` seconds of training and by maximum likelihood after."""

    def __init__(self, name: str, dim: int, objective: str, coupling: str = "independent", switch: float = None,
                 **options) -> None:
        super().__init__(name, dim=dim, T=1.0, **options)
        self.objective, self.coupling, self.switch = objective, coupling, switch

    def loss(self, batch):
        if self.objective == "fm":
            return flow_matching_loss(self.module, batch, coupling=self.coupling)
        return super().loss(batch)


def scoring_times(seconds: float, scores: int) -> list:
    """``scores`` times from ``seconds / 64`` to ``seconds``, geometrically spaced."""
    return [seconds * 64.0 ** ((k + 1) / scores - 1) for k in range(scores)]


def race(contender: Contender, train, test, args) -> dict:
    def adam():
        return torch.optim.Adam(contender.module.parameters(), lr=args.lr)

    optimizer = adam()
    objective = contender.objective
    batches = minibatches(train, args.batch_size, args.seed)
    marks = scoring_times(args.seconds, args.scores)
    iters, spent, curve = 0, 0.0, []
    while marks:
        if contender.switch is not None and contender.objective == "fm" and spent >= contender.switch:
            contender.objective, optimizer = "mle", adam()
        batch = next(batches)
        t0 = time.perf_counter()
        optimizer_step(contender, optimizer, contender.loss(batch))
        spent += time.perf_counter() - t0
        iters += 1
        if spent >= marks[0]:
            marks.pop(0)
            stats = contender.module.stats
            before = (stats.nfe_forward_total, stats.solves)
            nll = contender.test_nll(test)
            nfe = (stats.nfe_forward_total - before[0]) / max(1, stats.solves - before[1])
            curve.append({"train_seconds": spent, "iterations": iters, "test_nll": nll, "eval_nfe_per_solve": nfe})
    return {"name": contender.name, "objective": objective if contender.switch is None else "fm, then mle",
            "switch_seconds": contender.switch, "iterations": iters, "train_seconds": spent,
            "seconds_per_iteration": spent / iters, "final_test_nll": curve[-1]["test_nll"],
            "eval_nfe_per_solve": curve[-1]["eval_nfe_per_solve"], "curve": curve}


def first_time(row: dict, target: float) -> float:
    """Training seconds at the first scoring at or below ``target`` (NaN if never)."""
    return next((c["train_seconds"] for c in row["curve"] if c["test_nll"] <= target), math.nan)


def main(args):
    torch.set_num_threads(args.threads or runs.free_cores())
    rows = []
    for name, train, test in problems(args):
        dim = train.shape[-1]
        contenders = [lambda: Contender("maximum likelihood, default", dim, "mle"),
                      lambda: Contender('maximum likelihood, preset="fast"', dim, "mle", preset="fast"),
                      lambda: Contender("flow matching, independent", dim, "fm", "independent"),
                      lambda: Contender("flow matching, OT", dim, "fm", "ot"),
                      lambda: Contender(f"flow matching for {args.switch:.0%}, then maximum likelihood", dim, "fm",
                                        switch=args.switch * args.seconds)]
        group = []
        for make in contenders:
            torch.manual_seed(args.seed)
            row = dict(problem=name, dim=dim, **race(make(), train, test, args))
            group.append(row)
            print(f"{name}: {row['name']}: {row['iterations']} it, {1e3 * row['seconds_per_iteration']:.1f} ms/it, "
                  f"test NLL {row['final_test_nll']:.3f}, eval NFE {row['eval_nfe_per_solve']:.1f}", flush=True)
        target = min(c["test_nll"] for c in group[0]["curve"])  # the best the default MLE reached
        mle_time = first_time(group[0], target)
        for row in group:
            row["target_nll"] = target
            row["time_to_target"] = first_time(row, target)
            row["x_mle_time_to_target"] = row["time_to_target"] / mle_time
        rows += group
    table = markdown_table(rows, {
        "problem": lambda r: f"{r['problem']} (D = {r['dim']})", "training": lambda r: r["name"],
        "ms/it": lambda r: f"{1e3 * r['seconds_per_iteration']:.1f}", "iterations": lambda r: str(r["iterations"]),
        "test NLL at the end": lambda r: f"{r['final_test_nll']:.3f}",
        "time to MLE's best (s)": lambda r: f"{r['time_to_target']:.0f}" if math.isfinite(r["time_to_target"]) else "-",
        "x MLE's time": lambda r: f"{r['x_mle_time_to_target']:.2f}" if math.isfinite(r["x_mle_time_to_target"])
        else "-",
        "eval NFE": lambda r: f"{r['eval_nfe_per_solve']:.1f}",
    })
    print(table)
    write_results("flow_matching", args, {"rows": rows, "table": table})


def parser():
    p = bench_parser(__doc__, out="", iters=0, batch_size=256, test_size=1000)
    p.add_argument("--problems", nargs="+", default=["pinwheel", "8gaussians", "breast_cancer", "mnist"])
    p.add_argument("--seconds", type=float, default=60.0, help="training time per contender and problem")
    p.add_argument("--scores", type=int, default=13, help="test scorings per contender (geometric times)")
    p.add_argument("--switch", type=float, default=0.5, help="the mixed schedule's flow-matching share")
    p.add_argument("--mnist-dims", type=int, nargs="+", default=[16, 64], help="principal components of MNIST")
    p.add_argument("--mnist-dir", default=MNIST_DIR, help="folder of MNIST's IDX files")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
