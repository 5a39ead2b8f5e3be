"""The speed race on 2-D toys: time to reach the reference configuration's quality.

For each data set, in one run on one machine, with batch 100 and Adam 1e-3 (weight decay
1e-5) like the reference code:

(a) our library configured like the reference code's defaults (adjoint, exact trace, dopri5
    1e-5/1e-5, 64-64-64 concatsquash tanh, T = 0.5);
(b) ``FFJORD(2)`` with every default (``--fast`` names another variant, e.g. ``fast``);
(c) zuko's CNF with its defaults;
plus any lever variants named with ``--variants``.

Every 50 iterations each model is scored on the same held-out points with the exact trace
(evaluation time is not counted). The target is (a)'s test NLL after ``--iters`` iterations;
we record the training wall time at which each contender first reaches it, NFE per iteration
(forward and adjoint backward), and the final NLL.

    python benchmarks/toy_race.py --out benchmarks/results/toy_race.json
    python benchmarks/toy_race.py --data pinwheel --skip-reference --target 2.6 \
        --variants fast exact_direct hutch_direct rk4_8 --iters 400   # a quick lever sweep
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pyro_ffjord import runs
from pyro_ffjord.datasets import toy

from common import (REFERENCE_OPTIONS, VARIANTS, OurFFJORD, ZukoCNF, backward, bench_parser, markdown_table,
                    write_results)


def make(name: str):
    if name == "reference":
        return OurFFJORD("(a) reference config", **REFERENCE_OPTIONS)
    if name == "zuko":
        return ZukoCNF("(c) zuko CNF")
    return OurFFJORD(name, **VARIANTS[name])


def train(name, data, args, target=None, min_iters=None, max_iters=None, device="cpu"):
    torch.manual_seed(args.seed)
    model = make(name)
    model.module.to(device)
    optimizer = torch.optim.Adam(model.module.parameters(), lr=args.lr, weight_decay=1e-5)
    rng = np.random.default_rng(args.seed)
    test = toy.sample(data, args.test_size, np.random.default_rng(10_000 + args.seed)).to(device)
    min_iters = min_iters or args.iters
    max_iters = max_iters or args.iters
    curve, reached, seconds = [], None, 0.0
    it = 0
    while it < max_iters:
        batch = toy.sample(data, args.batch_size, rng).to(device)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = model.loss(batch)
        backward(model, loss)
        optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        it += 1
        if it % args.eval_every == 0:
            nll = model.test_nll(test)
            curve.append({"iter": it, "seconds": seconds, "test_nll": nll})
            if target is not None and reached is None and nll <= target:
                reached = {"iter": it, "seconds": seconds}
            print(f"  {model.name:>24} it {it:5d}  {seconds:7.1f}s  test NLL {nll:.3f}", flush=True)
            if it >= min_iters and (target is None or reached is not None):
                break
    nfe = model.nfe()
    return {
        "name": model.name,
        "variant": name,
        "options": getattr(model, "options", {}),
        "iters": it,
        "seconds": seconds,
        "it_per_s": it / seconds,
        "nfe_forward_per_it": nfe["forward"] / it,
        "nfe_backward_per_it": nfe["backward"] / it,
        "final_test_nll": curve[-1]["test_nll"],
        "reached_target": reached,
        "curve": curve,
    }


def race(data, args):
    print(f"== {data}", flush=True)
    rows = []
    target = args.target
    if not args.skip_reference:
        ref = train("reference", data, args, device=args.device)
        target = ref["final_test_nll"] if target is None else target
        ref["reached_target"] = {"iter": ref["iters"], "seconds": ref["seconds"]}
        rows.append(ref)
    names = [args.fast] + list(args.variants) + ([] if args.skip_zuko else ["zuko"])
    for name in dict.fromkeys(names):
        rows.append(train(name, data, args, target, max_iters=args.max_iters, device=args.device))
    base = {r["variant"]: r for r in rows}
    for r in rows:
        t = r["reached_target"]["seconds"] if r["reached_target"] else None
        r["time_to_target"] = t
        for other, key in (("reference", "x_reference"), ("zuko", "x_zuko")):
            o = base.get(other)
            ot = o and o["reached_target"] and o["reached_target"]["seconds"]
            r[key] = t / ot if (t and ot) else None
    return {"data": data, "target_nll": target, "rows": rows}


def table(result) -> str:
    def fmt(x, spec=".2f"):
        return "-" if x is None else format(x, spec)

    return markdown_table(
        result["rows"],
        {
            "configuration": lambda r: r["name"],
            "time to target (s)": lambda r: fmt(r["time_to_target"], ".1f"),
            "x (a)": lambda r: fmt(r["x_reference"]),
            "x (c)": lambda r: fmt(r["x_zuko"]),
            "it/s": lambda r: fmt(r["it_per_s"]),
            "NFE fwd/it": lambda r: fmt(r["nfe_forward_per_it"], ".1f"),
            "NFE bwd/it": lambda r: fmt(r["nfe_backward_per_it"], ".1f"),
            "final NLL": lambda r: f"{r['final_test_nll']:.3f} @ {r['iters']}",
        },
    )


def main(args):
    torch.set_num_threads(args.threads or runs.free_cores())
    results = []
    for data in args.data:
        result = race(data, args)
        result["table"] = table(result)
        target = "none" if result["target_nll"] is None else f"{result['target_nll']:.3f}"
        print(f"\n{data}: target NLL {target}\n{result['table']}\n", flush=True)
        results.append(result)
    return write_results("toy_race", args, {"results": results}, device=args.device)


def parser():
    p = bench_parser(__doc__, "benchmarks/results/toy_race.json", iters=1000, batch_size=100, test_size=1000,
                     iters_help="(a)'s budget; the target is its NLL")
    p.add_argument("--data", nargs="+", default=["pinwheel", "8gaussians"], choices=toy.NAMES)
    p.add_argument("--max-iters", type=int, default=2000, help="cap for the other contenders")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--fast", default="default", choices=sorted(VARIANTS), help="(b): the default FFJORD(2)")
    p.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS))
    p.add_argument("--target", type=float, default=None, help="fixed target NLL")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--skip-zuko", action="store_true")
    p.add_argument("--device", default="cpu")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
