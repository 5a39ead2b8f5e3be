"""Torch threads: time per training iteration of the default FFJORD on 1 and on 2 threads.

At each D (batch 100 at D = 2, 256 above; pinwheel at D = 2, Gaussian data above: the cost
does not depend on the values), ``ffjord(D)`` with every default trains with Adam for
``--seconds`` on each thread count, on the same batches; reported: milliseconds per iteration
and the speed-up of two threads over one. What it answers: whether the examples' and
benchmarks' thread defaults (one thread for small fields) are right on this machine.

    python benchmarks/threads.py --out benchmarks/results/threads.json
"""

from __future__ import annotations

import time

import pyro.distributions as dist
import torch

from pyro_ffjord import ffjord
from pyro_ffjord.datasets import toy

from common import bench_parser, markdown_table, write_results


def ms_per_iteration(dim: int, batch: int, threads: int, seconds: float, seed: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    flow = ffjord(dim)
    model = dist.TransformedDistribution(dist.Normal(torch.zeros(dim), 1.0).to_event(1), [flow])
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    data = toy.sample("pinwheel", 20 * batch, seed=seed) if dim == 2 else torch.randn(20 * batch, dim)

    def step(i: int) -> None:
        loss = -model.log_prob(data[(i % 20) * batch : (i % 20 + 1) * batch]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(5):  # warm-up
        step(i)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step(done)
        done += 1
    return 1e3 * (time.perf_counter() - start) / done


def main(args):
    rows = []
    for dim in args.dims:
        batch = 100 if dim == 2 else args.batch_size
        one, two = (ms_per_iteration(dim, batch, t, args.seconds, args.seed) for t in (1, 2))
        rows.append({"dim": dim, "batch": batch, "ms_1_thread": one, "ms_2_threads": two, "speedup_2_over_1": one / two})
        print(rows[-1], flush=True)
    table = markdown_table(rows, {
        "D": lambda r: str(r["dim"]), "batch": lambda r: str(r["batch"]),
        "ms/it, 1 thread": lambda r: f"{r['ms_1_thread']:.1f}", "ms/it, 2 threads": lambda r: f"{r['ms_2_threads']:.1f}",
        "2 threads' speed-up": lambda r: f"{r['speedup_2_over_1']:.2f}x",
    })
    print(table)
    write_results("threads", args, {"rows": rows, "table": table})


def parser():
    p = bench_parser(__doc__, out="", iters=0, batch_size=256, test_size=0)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32, 64])
    p.add_argument("--seconds", type=float, default=8.0, help="timed training per dimension and thread count")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
