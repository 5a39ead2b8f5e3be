"""Tabular race: FFJORD against discrete flows on real tabular data at equal wall-time budgets.

Data: a table from :mod:`pyro_ffjord.datasets.tabular` (default: scikit-learn's bundled
breast-cancer table, 30-D, MAF's split and normalisation; ``--dataset power --data-dir data``
for MAF's files). Contenders, each trained with Adam (lr 1e-3) on the same stream of batches
for the same training time, in one run on one thread:

- ``FFJORD(D)`` with every default, and with ``preset="fast"`` (exact trace in training);
- Pyro's eight affine couplings and eight spline couplings (a permutation between layers);
- zuko's MAF and NSF with their defaults.

Every tenth of the budget each is scored on the validation and test splits (FFJORD in eval
mode: exact trace, dopri5); the figure reported is the test NLL (nats) at the best validation
NLL, as in the paper's protocol (early stopping), with the test NLL at the end beside it.

    python benchmarks/tabular_race.py --seconds 60 --out benchmarks/results/tabular_race.json
"""

from __future__ import annotations

import math
import time

import torch

from pyro_ffjord import runs
from pyro_ffjord.datasets import tabular

from common import Discrete, OurFFJORD, bench_parser, markdown_table, minibatches, optimizer_step, write_results


def score(contender, data) -> tuple:
    """Mean NLL of ``data`` and its standard error (FFJORD: eval mode, exact); NaN if the flow
    cannot score it (non-finite parameters)."""
    try:
        return nll_se(contender, data)
    except ValueError:
        return math.nan, math.nan


def nll_se(contender, data) -> tuple:
    if isinstance(contender, OurFFJORD):
        contender.module.eval()
        try:
            with torch.no_grad():
                lp = contender.dist.log_prob(data)
        finally:
            contender.module.train()
    else:
        with torch.no_grad():
            lp = contender.dist().log_prob(data)
    return float(-lp.mean()), float(lp.std() / math.sqrt(len(lp)))


def race(contender, data, args) -> dict:
    optimizer = torch.optim.Adam(contender.module.parameters(), lr=args.lr)
    batches = minibatches(data.train, args.batch_size, args.seed)
    marks = [args.seconds * (k + 1) / args.scores for k in range(args.scores)]
    iters, spent, curve, diverged = 0, 0.0, [], None
    while marks:
        batch = next(batches)
        t0 = time.perf_counter()
        try:  # a flow whose parameters went non-finite fails Pyro's support check: it diverged
            loss = contender.loss(batch)
            if not math.isfinite(loss.item()):
                raise ValueError(f"loss {loss.item()}")
        except ValueError as exc:
            diverged = {"iteration": iters + 1, "train_seconds": spent, "error": str(exc).splitlines()[0][:200]}
            break
        optimizer_step(contender, optimizer, loss)
        spent += time.perf_counter() - t0
        iters += 1
        if spent >= marks[0]:
            marks.pop(0)
            valid, test = score(contender, data.valid), score(contender, data.test)
            curve.append({"train_seconds": spent, "iterations": iters, "valid_nll": valid[0],
                          "test_nll": test[0], "test_se": test[1]})
    nan = {"train_seconds": spent, "valid_nll": math.nan, "test_nll": math.nan, "test_se": math.nan}
    finite = [c for c in curve if math.isfinite(c["valid_nll"])]
    best = min(finite, key=lambda c: c["valid_nll"]) if finite else nan
    return {"name": contender.name, "iterations": iters, "train_seconds": spent, "diverged": diverged,
            "seconds_per_iteration": spent / max(iters, 1), "params": sum(p.numel() for p in contender.module.parameters()),
            "best_valid_nll": best["valid_nll"], "test_nll_at_best_valid": best["test_nll"],
            "test_se_at_best_valid": best["test_se"], "best_at_seconds": best["train_seconds"],
            "final_test_nll": (curve[-1] if curve else nan)["test_nll"], "curve": curve}


def main(args):
    torch.set_num_threads(args.threads or runs.free_cores())
    data = tabular.load(args.dataset, args.data_dir)
    dim = data.dim
    contenders = [
        lambda: OurFFJORD("FFJORD(D) default", dim=dim),
        lambda: OurFFJORD('FFJORD(D, preset="fast")', dim=dim, preset="fast"),
        lambda: Discrete("8 affine couplings (Pyro)", dim, "affine"),
        lambda: Discrete("8 spline couplings (Pyro)", dim, "spline"),
        lambda: Discrete("zuko MAF", dim, "maf"),
        lambda: Discrete("zuko NSF", dim, "nsf"),
    ]
    rows = []
    for make in contenders:
        torch.manual_seed(args.seed)
        row = race(make(), data, args)
        rows.append(row)
        print(f"{row['name']}: {row['iterations']} it" + (f" (diverged: {row['diverged']['error']})"
              if row["diverged"] else "") + f", {1e3 * row['seconds_per_iteration']:.1f} ms/it, test NLL "
              f"{row['test_nll_at_best_valid']:.3f} ± {row['test_se_at_best_valid']:.3f} at best valid "
              f"({row['best_at_seconds']:.0f} s), final {row['final_test_nll']:.3f}", flush=True)
    table = markdown_table(rows, {
        "model": lambda r: r["name"], "ms/it": lambda r: f"{1e3 * r['seconds_per_iteration']:.1f}",
        "iterations": lambda r: str(r["iterations"]), "params": lambda r: str(r["params"]),
        "valid NLL (best)": lambda r: f"{r['best_valid_nll']:.3f}",
        "test NLL at best valid": lambda r: f"{r['test_nll_at_best_valid']:.3f} ± {r['test_se_at_best_valid']:.3f}",
        "at s": lambda r: f"{r['best_at_seconds']:.0f}", "final test NLL": lambda r: f"{r['final_test_nll']:.3f}",
        "diverged at iteration": lambda r: str(r["diverged"]["iteration"]) if r["diverged"] else "",
    })
    print(table)
    write_results("tabular_race", args, {"dataset": args.dataset, "dim": dim, "sizes": list(data.sizes),
                                         "rows": rows, "table": table})


def parser():
    p = bench_parser(__doc__, out="", iters=0, batch_size=128, test_size=0)
    p.add_argument("--dataset", default="breast_cancer", choices=tabular.NAMES)
    p.add_argument("--data-dir", default=None, help="MAF's data/ folder (not needed for breast_cancer)")
    p.add_argument("--seconds", type=float, default=60.0, help="training wall time per contender")
    p.add_argument("--scores", type=int, default=10, help="validation/test scorings per contender")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
