"""Dimension sweep: the default FFJORD against discrete flows at D = 2, 8, 32, 64, equal batch.

Data: pinwheel at D = 2; at D > 2 real images made D-dimensional: MNIST intensities,
dequantized, logit-transformed and projected on their first D principal components (fitted on
the training split), then standardized. Contenders, each trained with Adam on the same
batches for the same wall-clock budget and scored on the same held-out points:

- ``FFJORD(D)`` with every default (``ffjord(D)``; exact log-density in eval mode);
- Pyro's eight affine-coupling layers with a permutation between each (``affine_coupling``);
- zuko's MAF with its defaults.

Reports time per training iteration, iterations done and the test NLL (nats) reached at the
equal wall time, with the ratio of time per iteration to the coupling stack.

    python benchmarks/dim_sweep.py --threads 1 --seconds 30 --out benchmarks/results/dim_sweep.json
"""

from __future__ import annotations

import os
import time

import torch

from pyro_ffjord import runs
from pyro_ffjord.datasets import mnist, toy

from common import Discrete, OurFFJORD, bench_parser, markdown_table, minibatches, optimizer_step, write_results

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")


def realistic(dim: int, n_test: int, data_dir: str, seed: int):
    """(train, test) of D-dimensional real data (see the module's docstring)."""
    if dim == 2:
        return toy.sample("pinwheel", 50_000, seed=seed), toy.sample("pinwheel", n_test, seed=seed + 1)
    splits = mnist.load(data_dir, binarization="none", dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)

    def logit(x):
        x = (x * 255 + torch.rand(x.shape, generator=g, dtype=x.dtype)) / 256  # dequantize
        x = 1e-6 + (1 - 2e-6) * x
        return x.log() - (-x).log1p()

    train, test = logit(splits.train), logit(splits.test[:n_test])
    mean = train.mean(0)
    _, _, v = torch.linalg.svd(train[:10_000] - mean, full_matrices=False)
    project = v[:dim].T
    train, test = (train - mean) @ project, (test - mean) @ project
    scale = train.std(0)
    return (train / scale).float(), (test / scale).float()


def run(contender, train, test, args) -> dict:
    optimizer = torch.optim.Adam(contender.module.parameters(), lr=args.lr)
    batches = minibatches(train, args.batch_size, args.seed)
    iters, spent = 0, 0.0
    while spent < args.seconds:
        batch = next(batches)
        t0 = time.perf_counter()
        optimizer_step(contender, optimizer, contender.loss(batch))
        spent += time.perf_counter() - t0
        iters += 1
    t0 = time.perf_counter()
    nll = contender.test_nll(test)
    return {"name": contender.name, "iterations": iters, "train_seconds": spent, "seconds_per_iteration": spent / iters,
            "test_nll": nll, "eval_seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in contender.module.parameters())}


def main(args):
    torch.set_num_threads(args.threads or runs.free_cores())
    rows = []
    for dim in args.dims:
        train, test = realistic(dim, args.test_size, args.data_dir, args.seed)
        contenders = [OurFFJORD("ffjord(D) default", dim=dim), Discrete("8 affine couplings (Pyro)", dim, "coupling"),
                      Discrete("zuko MAF", dim, "maf")]
        base = None
        for c in contenders:
            torch.manual_seed(args.seed)
            row = {"dim": dim, **run(c, train, test, args)}
            if c.name.startswith("8 affine"):
                base = row["seconds_per_iteration"]
            rows.append(row)
            print(f"D={dim} {row['name']}: {row['iterations']} it, {1e3 * row['seconds_per_iteration']:.1f} ms/it, "
                  f"test NLL {row['test_nll']:.3f} (eval {row['eval_seconds']:.1f} s)", flush=True)
        for row in rows:
            if row["dim"] == dim:
                row["x_coupling_time_per_iteration"] = row["seconds_per_iteration"] / base
    print(markdown_table(rows, {
        "D": lambda r: str(r["dim"]), "model": lambda r: r["name"],
        "ms/it": lambda r: f"{1e3 * r['seconds_per_iteration']:.1f}",
        "x coupling": lambda r: f"{r['x_coupling_time_per_iteration']:.2f}",
        "iterations": lambda r: str(r["iterations"]), "test NLL": lambda r: f"{r['test_nll']:.3f}",
        "eval s": lambda r: f"{r['eval_seconds']:.1f}",
    }))
    write_results("dim_sweep", args, {"rows": rows})


def parser():
    p = bench_parser(__doc__, out="", iters=0, batch_size=256, test_size=1000)
    p.add_argument("--seconds", type=float, default=30.0, help="training wall time per contender")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 64])
    p.add_argument("--data-dir", default=DATA_DIR, help="folder with the MNIST IDX files")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
