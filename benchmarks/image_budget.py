"""Image budget: the paper's and the fast MNIST configuration at an equal wall-time training budget.

Contenders: the two configurations of ``examples/image_density.py`` (``image_model.PAPER``: the
reference's multiscale model trained through dopri5 at 1e-5 with adjoint gradients and T = 1
learned; ``image_model.FAST``: the same model trained through 3 fixed rk4 steps, T = 0.5, RNODE
weights 0.01), each trained for ``--seconds`` of training time on the same stream of batches
(the same images and the same dequantization noise, one generator seeded with ``--seed``), with
Adam at ``--lr`` warmed up over ``--warmup-iters`` (both the reference's by default), one after
the other in one run. At the start and at ``--scores`` evenly spaced points of the budget each
is scored on the same ``--test-size`` test images by the example's score (``image_model.score``:
eval mode, dopri5 at 1e-5 for both, Hutchinson with ``--probes`` seeded probes per image, bits/dim
± its standard error); scoring is not training time. Reported per configuration: seconds per
iteration, NFE per training solve and per eval solve, and bits/dim against training time
(JSON, and a PNG beside it).

The projection (a projection, not a measurement): the time to the paper's 0.99 bits/dim on a
GPU, assuming (1) both configurations need ``--target-epochs`` epochs of 50,000 images in
batches of 200 to get there (an assumption: ffjord-facts.md gives no training length, and a CPU
budget gets nowhere near 0.99, so nothing here measures it); (2) a GPU processes images
``--gpu-speedup`` times faster than this run did, at the NFE measured here (with ``--device
cuda`` the rate is measured and the factor is 1); (3) seconds per image do not depend on the
batch size. The paper configuration's NFE grows as it trains (an adaptive solve of a field
that gets stiffer), so its projection is a lower bound; the fast one's grid is fixed unless the
drift check refines it. The ratio of the two projections depends on (2) and (3) only.

On one CPU thread a batch of 200 costs minutes per iteration: the default 10 minutes shows the
rates, not learning (for curves, e.g. ``--batch-size 20 --warmup-iters 50``, the same for both).

    python benchmarks/image_budget.py --seconds 600 --out benchmarks/results/image_budget.json
"""

from __future__ import annotations

import math
import os
import time

import torch

from common import bench_parser, example_modules, markdown_table, write_results
from pyro_ffjord import bits_per_dim, dequantize, runs

# the example's configurations, data and score, and its figure helper
density_common, model = example_modules("density_common", "image_model")
save_figure = density_common.save_figure

TRAIN_IMAGES, PAPER_BATCH = 50_000, 200


def race(config: str, train: torch.Tensor, test: torch.Tensor, args, device: torch.device) -> dict:
    options = model.flow_options(config, args.hidden, args.scales, args.blocks)
    torch.manual_seed(args.seed)  # initialisation and training probes
    flow, density = model.build(options, device)
    optimizer = torch.optim.Adam(flow.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)  # the batches and their dequantization: the same for both
    marks = [args.seconds * (k + 1) / args.scores for k in range(args.scores)]
    iters, spent, nfe, adjoint, curve = 0, 0.0, [], [], []

    def score() -> None:
        s = model.score(flow, density, test, args.probes, args.eval_batch_size)
        curve.append({"train_seconds": spent, "iterations": iters, "test_bpd": s["bpd"], "test_se": s["se"],
                      "nfe_eval_per_solve": s["nfe_per_solve"], "finite": s["finite"]})

    score()
    flow.train()
    while marks:
        idx = torch.randint(len(train), (args.batch_size,), generator=g)
        x = dequantize(train[idx], generator=g).to(device)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (iters + 1) / args.warmup_iters) if args.warmup_iters else args.lr
        t0 = time.perf_counter()
        loss = bits_per_dim(density.log_prob(x), model.NUM_DIMS).mean()
        optimizer.zero_grad()
        (loss + flow.regularization).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        spent += time.perf_counter() - t0
        iters += 1
        nfe.append(sum(f.nfe_forward for f in flow.flows) / len(flow.flows))
        adjoint.append(sum(f.nfe_backward for f in flow.flows) / len(flow.flows))
        if spent >= marks[0] or not math.isfinite(loss.item()):
            while marks and marks[0] <= spent:
                marks.pop(0)
            score()
            if not math.isfinite(loss.item()):
                break
    per_image = spent / iters / args.batch_size
    speedup = 1.0 if device.type == "cuda" else args.gpu_speedup
    gpu_per_iteration = per_image * PAPER_BATCH / speedup
    target_iters = args.target_epochs * TRAIN_IMAGES / PAPER_BATCH
    return {"config": config, "options": model.describe(flow, options), "estimator": model.estimator(flow, args.probes),
            "iterations": iters, "train_seconds": spent,
            "seconds_per_iteration": spent / iters, "seconds_per_image": per_image,
            "nfe_train_per_solve": sum(nfe) / len(nfe), "nfe_train_last": nfe[-1],
            "nfe_adjoint_per_solve": sum(adjoint) / len(adjoint), "nfe_eval_per_solve": curve[-1]["nfe_eval_per_solve"],
            "final_test_bpd": curve[-1]["test_bpd"], "final_test_se": curve[-1]["test_se"], "curve": curve,
            "projection": {"label": "PROJECTION, not a measurement (assumptions in 'assumptions')",
                           "gpu_seconds_per_iteration_batch_200": gpu_per_iteration,
                           "iterations_to_0.99": target_iters,
                           "gpu_hours_to_0.99": target_iters * gpu_per_iteration / 3600}}


def plot(path: str, rows, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for k, row in enumerate(rows):
        c = row["curve"]
        ax.errorbar([p["train_seconds"] for p in c], [p["test_bpd"] for p in c], [p["test_se"] for p in c],
                    marker="o", ms=3, capsize=2, color=f"C{k}", label=f"{row['config']} "
                    f"({row['seconds_per_iteration']:.2f} s/it, NFE {row['nfe_train_per_solve']:.0f} per solve)")
    ax.axhline(model.PAPER_BPD, color="k", ls=":", lw=1, label=f"paper ({model.PAPER_BPD})")
    ax.set(xlabel="training time (s; scoring excluded)", ylabel="test bits/dim (Hutchinson, ± se)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, title)


def main(args):
    torch.set_num_threads(args.threads or runs.free_cores())
    device = torch.device(args.device)
    data = model.load(args.data_dir)
    test = dequantize(data.test[: args.test_size], torch.Generator().manual_seed(model.TEST_SEED)).to(device)
    rows = []
    for config in args.configs:
        row = race(config, data.train, test, args, device)
        rows.append(row)
        print(f"{config}: {row['iterations']} it in {row['train_seconds']:.0f} s ({row['seconds_per_iteration']:.2f} "
              f"s/it, NFE {row['nfe_train_per_solve']:.1f} per training solve, {row['nfe_eval_per_solve']:.1f} per "
              f"eval solve), test {row['final_test_bpd']:.3f} ± {row['final_test_se']:.3f} bits/dim; projected "
              f"{row['projection']['gpu_hours_to_0.99']:.1f} GPU hours to 0.99", flush=True)
    table = markdown_table(rows, {
        "config": lambda r: r["config"], "s/it": lambda r: f"{r['seconds_per_iteration']:.2f}",
        "iterations": lambda r: str(r["iterations"]), "NFE/solve (train)": lambda r: f"{r['nfe_train_per_solve']:.1f}",
        "NFE/solve (eval)": lambda r: f"{r['nfe_eval_per_solve']:.1f}",
        "test bits/dim": lambda r: f"{r['final_test_bpd']:.3f} ± {r['final_test_se']:.3f}",
        "projected GPU hours to 0.99": lambda r: f"{r['projection']['gpu_hours_to_0.99']:.1f}",
    })
    print(table)
    assumptions = (f"projection only: both configurations assumed to need {args.target_epochs:g} epochs of "
                   f"{TRAIN_IMAGES} images at batch {PAPER_BATCH}; a GPU assumed "
                   f"{1.0 if device.type == 'cuda' else args.gpu_speedup:g}x this run's images per second at the NFE "
                   "measured here (the paper config's NFE grows in training: a lower bound); seconds per image "
                   "assumed independent of the batch size")
    payload = write_results("image_budget", args, {"dataset": "mnist", "test_points": len(test), "rows": rows,
                                                   "table": table, "assumptions": assumptions}, device=str(device))
    if args.out:
        plot(os.path.splitext(args.out)[0] + ".png", rows, f"MNIST, {args.seconds:g} s of training each "
             f"(batch {args.batch_size}, {args.threads or runs.free_cores()} thread(s), {device})")
    return payload


def parser():
    p = bench_parser(__doc__, out="", iters=0, batch_size=PAPER_BATCH, test_size=200)
    p.add_argument("--seconds", type=float, default=600.0, help="training time per configuration")
    p.add_argument("--scores", type=int, default=5, help="test scorings per configuration (and one at the start)")
    p.add_argument("--configs", nargs="+", choices=model.CONFIGS, default=list(model.CONFIGS))
    p.add_argument("--data-dir", default=model.default_data_dir(), help="folder of MNIST's IDX files")
    p.add_argument("--device", type=runs.device_option, default="cpu")
    p.add_argument("--warmup-iters", type=int, default=model.TRAINING["warmup_iters"], help="linear lr warm-up")
    p.add_argument("--probes", type=int, default=2, help="Hutchinson probes per test image")
    p.add_argument("--eval-batch-size", type=int, default=200, help="rows (images x probes) per eval solve")
    p.add_argument("--gpu-speedup", type=float, default=100.0,
                   help="ASSUMED ratio of a GPU's images/s to this run's (not measured; 1 with --device cuda)")
    p.add_argument("--target-epochs", type=float, default=100.0, help="ASSUMED epochs to reach 0.99 bits/dim")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="smoke tests only: field channels")
    p.add_argument("--scales", type=int, default=None, help="smoke tests only")
    p.add_argument("--blocks", type=int, default=None, help="smoke tests only: CNFs per block")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
