"""One CPU machine, two ways to use its cores: 1 process x N threads against N processes x 1
thread (``torchrun``, gloo, DistributedDataParallel), on the examples that train data-parallel.

Each example runs twice with the same options, global batch and seed, one run after the other:
``python examples/X.py --threads N`` and ``torchrun --standalone --nproc_per_node=N
examples/X.py --threads 1``. Read back from each run's ``results.json``: optimizer steps, training
seconds (start-up, validation and the final test excluded), steps per second, the mean training
loss of the last tenth of the steps and the example's test figure. ``tabular`` and ``image``
train for ``--seconds`` (their ``--max-minutes``): loss and test figure after a fixed time. The
2-D demo and the VAE train a fixed number of steps (they have no time budget): the same steps,
so their losses differ only by the noise each rank draws, and the time tells the speed.

    python benchmarks/distributed_cpu.py --out benchmarks/results/distributed_cpu.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import bench_parser, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"

# name: (script, options, whether it trains for --seconds, the test figure's key and unit)
EXAMPLES = {
    "tabular": ("tabular_density.py", ["--dataset", "breast_cancer", "--config", "default", "--batch-size", "128",
                                       "--iters", "1000000", "--valid-every", "500"], True, ("test_nll", "nats")),
    "image": ("image_density.py", ["--config", "fast", "--data-dir", str(MNIST), "--batch-size", "20",
                                   "--warmup-iters", "50", "--iters", "1000000", "--valid-every", "1000000",
                                   "--valid-points", "10", "--test-points", "20", "--probes", "1", "--samples", "4"],
              True, ("test_bpd", "bits/dim")),
    "toy": ("toy_density.py", ["--iters", "{steps}", "--test-points", "1000", "--grid", "24",
                               "--picture-samples", "400", "--trajectory-points", "100"], False, ("test_nll", "nats")),
    "vae": ("vae.py", ["--dataset", "mnist", "--data-dir", str(MNIST), "--flow", "ffjord", "--subset", "{vae_rows}",
                       "--epochs", "1", "--batch-size", "100", "--valid-points", "100", "--test-points", "100",
                       "--is-samples", "0"], False, ("test_neg_elbo_nats", "nats")),
}


def command(name: str, procs: int, threads: int, out: Path, args) -> list:
    script, options, timed, _ = EXAMPLES[name]
    filled = [o.format(steps=args.steps, vae_rows=args.vae_rows) for o in options]
    budget = ["--max-minutes", f"{args.seconds / 60:.6g}"] if timed else []
    launcher = [sys.executable] if procs == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={procs}"]
    return [*launcher, str(ROOT / "examples" / script), *filled, *budget, "--out", str(out), "--no-progress",
            "--threads", str(threads), "--seed", str(args.seed)]


def losses_of(res: dict) -> list:
    if "losses" in res:
        return res["losses"]
    return [v for h in res["history"] for v in h.get("train_losses", [])]  # the VAE's epochs


def summary(name: str, procs: int, threads: int, res: dict, wall: float) -> dict:
    key, unit = EXAMPLES[name][3]
    losses = losses_of(res)
    tail = losses[-max(1, len(losses) // 10):]
    steps = len(losses)
    seconds = res["train_seconds"]
    return {"example": name, "processes": procs, "threads_per_process": threads, "world_size": res["world_size"],
            "per_rank_batch": res["per_rank_batch"], "steps": steps, "train_seconds": seconds,
            "steps_per_second": steps / seconds, "final_loss": sum(tail) / len(tail), "test": res.get(key),
            "test_unit": unit, "wall_seconds": wall}


def run_one(name: str, procs: int, threads: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        proc = subprocess.run(command(name, procs, threads, out, args), capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=args.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"{name} on {procs} process(es) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        res = json.loads((out / "results.json").read_text())
    return summary(name, procs, threads, res, wall)


def main(args):
    rows = []
    for name in args.examples:
        pair = [run_one(name, 1, args.cores, args), run_one(name, args.cores, 1, args)]
        pair[1]["x_steps_per_second"] = pair[1]["steps_per_second"] / pair[0]["steps_per_second"]
        pair[0]["x_steps_per_second"] = 1.0
        for row in pair:
            print(f"{name}: {row['processes']} x {row['threads_per_process']}: {row['steps']} steps in "
                  f"{row['train_seconds']:.1f} s ({row['steps_per_second']:.2f}/s), loss {row['final_loss']:.3f}, "
                  f"test {row['test']}", flush=True)
        rows += pair
    table = markdown_table(rows, {
        "example": lambda r: r["example"] + (f" ({args.seconds:.0f} s)" if EXAMPLES[r["example"]][2]
                                             else f" ({r['steps']} steps)"),
        "processes x threads": lambda r: f"{r['processes']} x {r['threads_per_process']}",
        "batch per process": lambda r: str(r["per_rank_batch"]),
        "steps": lambda r: str(r["steps"]), "steps/s": lambda r: f"{r['steps_per_second']:.2f}",
        "x 1 process": lambda r: f"{r['x_steps_per_second']:.2f}",
        "training loss (last tenth)": lambda r: f"{r['final_loss']:.3f}",
        "test": lambda r: "-" if r["test"] is None else f"{r['test']:.3f} {r['test_unit']}",
    })
    print(table)
    write_results("distributed_cpu", args, {"rows": rows, "table": table})


def parser():
    p = bench_parser(__doc__, out="", iters=0, batch_size=0, test_size=0)
    p.add_argument("--examples", nargs="+", choices=list(EXAMPLES), default=list(EXAMPLES))
    p.add_argument("--cores", type=int, default=2, help="N: threads of the one process, processes of the other")
    p.add_argument("--seconds", type=float, default=90.0, help="training time of tabular and image")
    p.add_argument("--steps", type=int, default=600, help="steps of the 2-D demo")
    p.add_argument("--vae-rows", type=int, default=2000, help="training images of the VAE's one epoch (batch 100)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before a run counts as hung")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
