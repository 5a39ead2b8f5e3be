"""First benchmark: fit 8gaussians with our default FFJORD, our "fast" preset, our library
configured like the reference code's defaults, and zuko's CNF, side by side in one run.

Every contender sees the same batches (batch 256, 200 iterations, Adam 1e-3) and is scored by
the exact-trace log-likelihood of the same 2000 held-out points. Reports iterations per
second, function evaluations per iteration and test log-likelihood, with ratios to the
reference configuration, and writes JSON with the machine and date.

    python benchmarks/fit_8gaussians.py --out benchmarks/results/fit_8gaussians.json
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pyro_ffjord import runs
from pyro_ffjord.datasets import toy

from common import REFERENCE_OPTIONS, OurFFJORD, ZukoCNF, backward, bench_parser, markdown_table, write_results


def contenders(names):
    make = {
        "ours (default)": lambda: OurFFJORD("ours (default)"),
        "ours (reference config)": lambda: OurFFJORD("ours (reference config)", **REFERENCE_OPTIONS),
        'ours (preset="fast")': lambda: OurFFJORD('ours (preset="fast")', preset="fast"),
        "zuko CNF": lambda: ZukoCNF("zuko CNF"),
    }
    return [make[n] for n in names]


def run(contender, args) -> dict:
    torch.manual_seed(args.seed)
    model = contender()
    rng = np.random.default_rng(args.seed)
    optimizer = torch.optim.Adam(model.module.parameters(), lr=args.lr)
    batches = [toy.sample(args.data, args.batch_size, rng) for _ in range(args.iters)]
    start = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad()
        loss = model.loss(batch)
        backward(model, loss)
        optimizer.step()
    seconds = time.perf_counter() - start
    test = toy.sample(args.data, args.test_size, np.random.default_rng(args.seed + 1))
    nfe = model.nfe()
    return {
        "name": model.name,
        "options": {k: v for k, v in getattr(model, "options", {}).items()},
        "seconds": seconds,
        "it_per_s": args.iters / seconds,
        "nfe_forward_per_it": nfe["forward"] / args.iters,
        "nfe_backward_per_it": nfe["backward"] / args.iters,
        "test_loglik": -model.test_nll(test),
        "final_train_loss": loss.item(),
    }


def main(args):
    torch.set_num_threads(args.threads or runs.free_cores())
    names = ["ours (default)", 'ours (preset="fast")', "ours (reference config)", "zuko CNF"]
    rows = []
    for name, contender in zip(names, contenders(names)):
        row = run(contender, args)
        rows.append(row)
        print(f"{name}: {row['it_per_s']:.2f} it/s, test log-lik {row['test_loglik']:.3f}", flush=True)
    ref = next(r for r in rows if r["name"] == "ours (reference config)")
    for r in rows:
        r["speed_vs_reference"] = r["it_per_s"] / ref["it_per_s"]
    table = markdown_table(
        rows,
        {
            "configuration": lambda r: r["name"],
            "it/s": lambda r: f"{r['it_per_s']:.2f}",
            "x reference": lambda r: f"{r['speed_vs_reference']:.2f}",
            "NFE fwd/it": lambda r: f"{r['nfe_forward_per_it']:.1f}",
            "NFE bwd/it": lambda r: f"{r['nfe_backward_per_it']:.1f}",
            "test log-lik": lambda r: f"{r['test_loglik']:.3f}",
        },
    )
    print(table)
    return write_results("fit_8gaussians", args, {"results": rows, "table": table})


def parser():
    p = bench_parser(__doc__, "benchmarks/results/fit_8gaussians.json", iters=200, batch_size=256, test_size=2000)
    p.add_argument("--data", default="8gaussians", choices=toy.NAMES)
    return p


if __name__ == "__main__":
    main(parser().parse_args())
