"""pyro_ffjord.distributed and the examples under torchrun (two CPU processes, gloo): each rank's
share of a batch, the loss weights, a single process left exactly as it was; two processes
training the same run as one (same global batches and seed), one results file and one
checkpoint, resume across world sizes (2 -> 1 and 1 -> 2), and a failed rank ending the job.

Tolerances. ``tabular_density --config fast`` and the 2-D demo train with the exact trace through
fixed rk4 steps, so one process and two compute the same thing except for the order of float32
sums (a mean over 64 rows against two means over 32, DDP's all-reduce): measured, the losses of
6 iterations agree to 1e-7 relative (4e-6 nats on 42). ``rtol=1e-5`` leaves 100x for other
CPUs and BLAS builds, and stays 40x below what a broken DDP gives (ranks not synchronised: each
starts from its own initialisation, 4e-4 relative at the first step, measured). The VAE draws its
reparameterised ``z`` per rank (rank 1 from seed + 1), so there the losses differ by Monte Carlo
noise: at initialisation the -ELBO of a batch of 20 has a standard deviation of 0.005 nats over
redraws of z (30 redraws measured; rank 1 redraws half the batch: ~0.004), and over 10 steps
the two runs drifted apart by 0.013 nats at most (measured). ``abs=0.1`` nats per image is 25
such standard deviations, and far below the 40 nats of unsynchronised ranks (measured) or the
80 nats between two seeds. ``image_density --quick`` draws dequantization noise and Hutchinson
probes per rank: the bits/dim of its first batch (8 images) has a standard deviation of 0.11 over
redraws of that noise at one initialisation (12 redraws measured), so two runs whose noise is
drawn apart differ by ~0.16 per batch; ``abs=1.0`` on the training losses is 6 such deviations
(measured: 0.33 at most). Its validation bits/dim uses fixed dequantization and probe seeds, so
only the parameters differ there: measured 0.005, against 0.37 between two seeds; ``abs=0.05``.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import image_density
import tabular_density
import toy_density
import vae
from pyro_ffjord import distributed, runs

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
needs_mnist = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="no MNIST copy")
TABULAR = ("--quick", "--config", "fast", "--valid-every", "3")
VAE = ("--dataset", "mnist", "--data-dir", str(MNIST), "--flow", "planar", "--quick", "--batch-size", "20",
       "--is-samples", "0")
IMAGE = ("--quick", "--data-dir", str(MNIST))
TOY = ("--quick", "--test-points", "50", "--grid", "8", "--picture-samples", "50", "--trajectory-points", "20")


def torchrun(script, out, *argv, procs=2, env=None, timeout=180) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=procs examples/script --out out ...``; a job that
    hangs fails the test at ``timeout`` seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           str(ROOT / "examples" / script), "--out", str(out), "--no-progress", "--threads", "1", *argv]
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment, cwd=ROOT)


def launched_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr


def in_process(module, out, *argv):
    return module.main(module.parse_args(["--out", str(out), "--no-progress", "--threads", "1", *argv]))


def results(out) -> dict:
    return json.loads((pathlib.Path(out) / "results.json").read_text())


def checkpoint_model(out) -> dict:
    return torch.load(pathlib.Path(out) / "checkpoint.pt", weights_only=True)["model"]


def assert_one_run_of_files(out, pictures) -> None:
    """Rank 0 alone wrote: one results file, one checkpoint (no temporary left), its pictures."""
    assert sorted(p.name for p in pathlib.Path(out).iterdir()) == sorted(["results.json", "checkpoint.pt", *pictures])


# -- the pieces ----------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("rows", [1, 5, 8, 64, 65])
def test_shares_are_contiguous_disjoint_and_cover_the_batch(world_size, rows):
    batch = torch.arange(rows)
    shares = [distributed.World(rank=r, world_size=world_size, backend="gloo").share(batch) for r in range(world_size)]
    assert torch.equal(torch.cat(shares), batch)  # in order: rank r's block is the r-th
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_a_single_process_world_changes_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    args = tabular_density.parse_args(["--quick"])
    world = distributed.setup(args)
    assert not world.distributed and world.is_main and (world.rank, world.world_size) == (0, 1)
    batch, loss, module = torch.randn(7, 2), torch.tensor(3.0, requires_grad=True), nn.Linear(2, 1)
    assert world.share(batch) is batch and world.scale(loss, 3, 7) is loss and world.wrap(module) is module
    assert world.mean(1.25, 3) == 1.25 and world.broadcast({"stop": True}) == {"stop": True}
    assert world.per_rank(63) == 63 and world.describe(5, 63)["rank_seeds"] == [5]
    assert not dist.is_initialized()


def test_the_global_batch_must_split_evenly():
    world = distributed.World(rank=0, world_size=4, backend="gloo")
    assert world.per_rank(64) == 16 and world.per_rank(64, rows=462) == 16  # last batch: 14 rows, 4 shares
    with pytest.raises(runs.RunError, match=r"--batch-size 66 is the global batch, split over 4 processes: use a "
                                            r"multiple of 4 \(64, 68"):
        world.per_rank(66)
    with pytest.raises(runs.RunError, match="the last batch of each epoch has 2 of the 130"):
        world.per_rank(64, rows=130)


def test_weights_make_the_ranks_average_the_global_mean():
    losses = torch.randn(11)  # a last batch of 11 rows on 3 ranks: shares of 4, 4, 3
    worlds = [distributed.World(rank=r, world_size=3, backend="gloo") for r in range(3)]
    weighted = [w.scale(w.share(losses).mean(), len(w.share(losses)), len(losses)) for w in worlds]
    assert float(sum(weighted) / 3) == pytest.approx(float(losses.mean()), rel=1e-6)  # what DDP's average gives


# -- the examples on two processes ---------------------------------------------------------------
def test_tabular_on_two_processes_is_the_one_process_run_and_resumes_across_world_sizes(tmp_path):
    whole = in_process(tabular_density, tmp_path / "whole", *TABULAR, "--iters", "6")
    # two processes for 3 iterations, then one to 6
    launched_ok(torchrun("tabular_density.py", tmp_path / "two", *TABULAR, "--iters", "3"))
    two = results(tmp_path / "two")
    assert_one_run_of_files(tmp_path / "two", ["nll_curve.png"])
    assert (two["world_size"], two["rank_seeds"], two["per_rank_batch"], two["batch_size"]) == (2, [0, 1], 32, 64)
    assert two["distributed"]["backend"] == "gloo" and whole["world_size"] == 1 and whole["distributed"] is None
    assert two["losses"] == pytest.approx(whole["losses"][:3], rel=1e-5)
    assert two["valid_history"][0]["valid_nll"] == pytest.approx(whole["valid_history"][0]["valid_nll"], rel=1e-5)
    model = checkpoint_model(tmp_path / "two")
    assert model.keys() == checkpoint_model(tmp_path / "whole").keys()  # the module's, not DDP's "module."
    resumed = in_process(tabular_density, tmp_path / "two", *TABULAR, "--iters", "6", "--resume")
    assert resumed["resumed_from"] == 3 and [s["world_size"] for s in resumed["segments"]] == [2, 1]
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert resumed["test_nll"] == pytest.approx(whole["test_nll"], rel=1e-5)
    # one process for 3 iterations, then two to 6
    in_process(tabular_density, tmp_path / "one", *TABULAR, "--iters", "3")
    launched_ok(torchrun("tabular_density.py", tmp_path / "one", *TABULAR, "--iters", "6", "--resume"))
    again = results(tmp_path / "one")
    assert again["resumed_from"] == 3 and [s["world_size"] for s in again["segments"]] == [1, 2]
    assert again["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert [h["valid_nll"] for h in again["valid_history"]] == pytest.approx(
        [h["valid_nll"] for h in whole["valid_history"]], rel=1e-5)
    for name, value in checkpoint_model(tmp_path / "whole").items():
        if torch.is_tensor(value):
            torch.testing.assert_close(checkpoint_model(tmp_path / "one")[name], value, rtol=1e-4, atol=1e-6)


@needs_mnist
def test_vae_on_two_processes_then_resumed_on_one(tmp_path):
    whole = in_process(vae, tmp_path / "whole", *VAE, "--epochs", "2")
    launched_ok(torchrun("vae.py", tmp_path / "split", *VAE, "--epochs", "1"))
    assert_one_run_of_files(tmp_path / "split", [])
    two = results(tmp_path / "split")
    assert (two["world_size"], two["rank_seeds"], two["per_rank_batch"]) == (2, [0, 1], 10)
    assert two["history"][0]["train_losses"] == pytest.approx(whole["history"][0]["train_losses"], abs=0.1)
    resumed = in_process(vae, tmp_path / "split", *VAE, "--epochs", "2", "--resume")
    assert [s["world_size"] for s in resumed["segments"]] == [2, 1] and resumed["world_size"] == 1
    losses = [x for h in resumed["history"] for x in h["train_losses"]]
    assert len(losses) == 10 and losses == pytest.approx([x for h in whole["history"] for x in h["train_losses"]],
                                                        abs=0.1)
    assert resumed["test_neg_elbo"] == pytest.approx(whole["test_neg_elbo"], abs=0.1)


def test_toy_demo_resumed_on_two_processes(tmp_path):
    whole = in_process(toy_density, tmp_path / "whole", *TOY, "--iters", "6")
    in_process(toy_density, tmp_path / "split", *TOY, "--iters", "3")
    launched_ok(torchrun("toy_density.py", tmp_path / "split", *TOY, "--iters", "6", "--resume"))
    assert_one_run_of_files(tmp_path / "split", ["density.png", "trajectory.png"])
    resumed = results(tmp_path / "split")
    assert (resumed["world_size"], resumed["per_rank_batch"], resumed["resumed_from"]) == (2, 128, 3)
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert resumed["test_nll"] == pytest.approx(whole["test_nll"], rel=1e-5)


@needs_mnist
def test_image_density_on_two_processes(tmp_path):
    whole = in_process(image_density, tmp_path / "whole", *IMAGE)
    launched_ok(torchrun("image_density.py", tmp_path / "two", *IMAGE))
    assert_one_run_of_files(tmp_path / "two", ["samples.png", "bpd_curve.png"])
    two = results(tmp_path / "two")
    assert (two["world_size"], two["rank_seeds"], two["per_rank_batch"], two["iterations"]) == (2, [0, 1], 4, 6)
    assert two["losses"] == pytest.approx(whole["losses"], abs=1.0)
    assert [h["valid_bpd"] for h in two["valid_history"]] == pytest.approx(
        [h["valid_bpd"] for h in whole["valid_history"]], abs=0.05)
    assert checkpoint_model(tmp_path / "two").keys() == checkpoint_model(tmp_path / "whole").keys()


def test_a_failed_rank_ends_the_job_with_its_message(tmp_path):
    # Rank 1 fails at its first batch while rank 0 waits for it in DDP's first all-reduce. With a
    # 10-minute --dist-timeout, only torchrun tearing rank 0 down ends the job before the timeout.
    proc = torchrun("tabular_density.py", tmp_path, *TABULAR, "--iters", "6", "--dist-timeout", "10",
                    env={distributed.FAIL_ENV: "1"}, timeout=120)
    assert proc.returncode != 0
    assert f"error: rank 1 of 2: failure injected by {distributed.FAIL_ENV}" in proc.stderr
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "checkpoint.pt").exists()
