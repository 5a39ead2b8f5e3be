"""Learned FFJORD priors in Pyro models: the VAE example in quick mode, and a prior fitted by SVI
that recovers a known 2-D density."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

import pyro
import pyro.distributions as dist
from pyro.infer import SVI, Trace_ELBO

import flow_prior as fp
from pyro_ffjord import FFJORD, runs

MNIST = Path(__file__).parents[2] / "shared/data/mnist"
STEPS, LR = 300, 1e-2


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"{MNIST} absent")
def test_example_quick_writes_json_png_and_resumes(tmp_path):
    argv = ["--quick", "--out", str(tmp_path), "--data-dir", str(MNIST), "--no-progress", "--seed", "1"]
    payload = fp.main(fp.parse_args(argv))
    saved = json.loads((tmp_path / "flow_prior.json").read_text())
    assert saved["results"] == payload["results"]
    assert [r["prior"] for r in saved["results"]] == ["normal", "ffjord"]
    for r in saved["results"]:
        assert math.isfinite(r["test_neg_elbo"]) and r["test_neg_elbo"] > 0
        assert r["test_neg_elbo"] == pytest.approx(-r["test_rec"] + r["test_kl"], rel=1e-5)
        assert r["seconds_per_epoch"] > 0 and len(r["train_neg_elbo_per_epoch"]) == 1
    flow = saved["results"][1]
    assert flow["prior_params"] > 0 and flow["train_nfe_per_solve"] == 12  # 3 rk4 steps
    # scored with the training discretisation, the model barely moves
    assert abs(flow["test_neg_elbo_training_solver"] - flow["test_neg_elbo"]) < 0.5
    assert saved["data"]["train_images"] == 200 and saved["machine"]["torch"] == torch.__version__
    png = tmp_path / "flow_prior_samples.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "checkpoint_ffjord.pt").exists()

    # --resume picks up the checkpoints (torch.load(weights_only=True)) and re-evaluates them
    again = fp.main(fp.parse_args(argv + ["--resume", "--prior", "ffjord"]))
    assert again["results"][0]["test_neg_elbo"] == pytest.approx(flow["test_neg_elbo"], abs=1e-4)
    with pytest.raises(runs.RunError, match=r"written with other options \(--lr 0\.001 -> 0\.5\)"):
        fp.main(fp.parse_args(argv + ["--resume", "--prior", "ffjord", "--lr", "0.5"]))
    # one epoch, then --resume to two: the same numbers as two epochs in one go (the checkpoint
    # restores the model, Adam's state and the random state); an explicit --epochs beats --quick's
    resumed = fp.main(fp.parse_args(argv + ["--resume", "--prior", "ffjord", "--epochs", "2"]))["results"][0]
    straight_argv = argv[:2] + [str(tmp_path / "straight")] + argv[3:]
    straight = fp.main(fp.parse_args(straight_argv + ["--prior", "ffjord", "--epochs", "2"]))["results"][0]
    assert len(straight["train_neg_elbo_per_epoch"]) == 2
    assert resumed["train_neg_elbo_per_epoch"] == straight["train_neg_elbo_per_epoch"]
    assert resumed["test_neg_elbo"] == straight["test_neg_elbo"]

    # --time-options: ms per SVI step for each candidate flow configuration
    timed = fp.main(fp.parse_args(argv + ["--time-options"]))
    assert len(timed["rows"]) == len(fp.TIMED_OPTIONS)
    assert all(r["ms_per_step"] > 0 for r in timed["rows"])
    assert [r["nfe_per_solve"] for r in timed["rows"][:3]] == [0.0, 12.0, 12.0]  # none, then 3 rk4 steps
    assert (tmp_path / "time_options.json").exists()


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"{MNIST} absent")
def test_ctrl_c_mid_epoch_then_resume_equals_a_straight_run(tmp_path, monkeypatch, capsys,
                                                            ctrl_c_must_be_handled):
    argv = ["--quick", "--data-dir", str(MNIST), "--no-progress", "--prior", "ffjord", "--epochs", "2",
            "--test-subset", "50", "--subset", "100"]  # 2 SVI steps per epoch
    straight = fp.main(fp.parse_args(argv + ["--out", str(tmp_path / "a")]))["results"][0]
    step, calls = pyro.infer.SVI.step, []

    def interrupting(self, *args, **kwargs):  # Ctrl-C during the 3rd SVI step (epoch 2, step 1)
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(pyro.infer.SVI, "step", interrupting)
    with pytest.raises(SystemExit) as exit:
        fp.main(fp.parse_args(argv + ["--out", str(tmp_path / "b")]))
    assert exit.value.code == 130 and "checkpoint at step 3 written" in capsys.readouterr().err
    ck = torch.load(tmp_path / "b" / "checkpoint_ffjord.pt", weights_only=True)
    assert (ck["epoch"], ck["batch"]) == (1, 1)  # mid-epoch
    monkeypatch.undo()
    titles = {}
    monkeypatch.setattr(fp, "plot_samples", lambda samples, given, path: titles.update(given))
    resumed = fp.main(fp.parse_args(argv + ["--out", str(tmp_path / "b"), "--resume"]))["results"][0]
    assert "(resumed: " in titles["ffjord"]  # the picture says so, with each segment's seconds
    assert resumed["train_neg_elbo_per_epoch"] == straight["train_neg_elbo_per_epoch"]
    assert resumed["test_neg_elbo"] == straight["test_neg_elbo"]
    assert resumed["train_nfe_per_solve"] == straight["train_nfe_per_solve"] == 12
    assert resumed["resumed"] and not straight["resumed"]
    assert [(g["start"], g["end"]) for g in resumed["segments"]] == [(0, 3), (3, 4)]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fp.main(fp.parse_args(argv + ["--out", str(tmp_path / "c"), "--resume"]))


@pytest.mark.parametrize("argv", [["--epochs", "-1"], ["--subset", "0"], ["--latent-dim", "0"], ["--hidden", "0"],
                                  ["--batch-size", "0"], ["--lr", "0"], ["--flow-hidden", "0"], ["--steps", "0"],
                                  ["--T", "0"], ["--kinetic", "-1"], ["--eval-batch-size", "0"], ["--device", "cuda:9"]])
def test_bad_values_are_usage_errors(argv, capsys):
    if argv[0] == "--device" and torch.cuda.device_count() > 9:
        pytest.skip("ten GPUs")
    with pytest.raises(SystemExit) as exit:
        fp.parse_args(argv)
    assert exit.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_defaults_one_thread_and_a_quick_folder():
    assert fp.parse_args([]).threads == 1
    assert fp.parse_args(["--quick"]).out == "out/flow_prior-quick"


MEAN = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]])


def fit_known_density(seed: int = 0, steps: int = STEPS, lr: float = LR) -> dict:
    """z ~ FFJORD prior (2-D), x | z ~ N(z, 0.05): fit the prior's parameters by SVI on noisy
    draws of a known correlated Gaussian; return the fitted prior's moments and held-out NLL."""
    torch.manual_seed(seed)
    truth = dist.MultivariateNormal(MEAN, COV)
    noise = 0.05
    data = truth.sample((2048,))
    data = data + noise * torch.randn_like(data)

    flow = FFJORD(2, hidden_dims=[32, 32], preset="fast")

    def model(x):
        pyro.module("prior_flow", flow)
        with pyro.plate("data", len(x)):
            base = dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1)
            z = pyro.sample("z", dist.TransformedDistribution(base, [flow]))
            pyro.sample("x", dist.Normal(z, noise).to_event(1), obs=x)

    def guide(x):  # the posterior of z is ~N(x, 0.05^2) for any prior smooth on that scale
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(x, noise).to_event(1))

    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)})  # decays 10x overall
    svi = SVI(model, guide, optim, Trace_ELBO())
    losses = []
    for step in range(steps):
        batch = data[torch.randint(len(data), (256,))]
        losses.append(svi.step(batch) / len(batch))

    flow.eval()  # exact dopri5 solves for the checks
    prior = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    with torch.no_grad():
        z = prior.sample((4000,))
        held_out = truth.sample((2000,))
        nll = -prior.log_prob(held_out).mean()
        true_nll = -truth.log_prob(held_out).mean()
    centred = z - z.mean(0)
    return {
        "loss_first": sum(losses[:20]) / 20,
        "loss_last": sum(losses[-20:]) / 20,
        "mean": z.mean(0),
        "cov": centred.T @ centred / (len(z) - 1),
        "nll_gap": float(nll - true_nll),
    }


def test_learned_prior_recovers_a_known_density():
    fit = fit_known_density()
    assert fit["loss_last"] < fit["loss_first"]
    # data seeds 0..5 gave mean errors <= 0.05, covariance errors <= 0.13, NLL gaps <= 0.013
    assert torch.allclose(fit["mean"], MEAN, atol=0.1), fit["mean"]
    assert torch.allclose(fit["cov"], COV, atol=0.2), fit["cov"]
    # held-out NLL within 0.05 nats of the truth's (its entropy, 2.33 nats); N(0, I) is 1.14
    # nats off, the flow at initialisation about as far
    assert fit["nll_gap"] < 0.05, fit["nll_gap"]
