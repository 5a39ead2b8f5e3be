"""examples/vae.py: quick runs of every posterior flow, learning, warm-up, resume, Sylvester
log-det, and the FFJORD posteriors (the paper's and the lean configuration) as built."""

import json
import math
import os
import pathlib
import signal

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import vae
import vae_flows
import vae_model
from pyro_ffjord import ConditionalFFJORD, runs
from pyro_ffjord.nets import ConcatLinear

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MNIST = DATA / "mnist"
DOCS = (ROOT / "docs" / "vae.md").read_text()

needs_mnist = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="no MNIST copy")

REQUIRED = (
    "dataset", "flow", "epochs", "params", "device", "wall_s", "test_neg_elbo", "test_nll_is", "unit",
    "data", "budget", "seconds_per_epoch", "test_neg_elbo_nats", "machine",
)


@pytest.fixture(autouse=True, scope="module")
def _cached_data(cached_loader):
    # The example reads and binarizes all of MNIST each run; the tests read it once.
    cached_loader(vae, "load", maxsize=4)


def run(tmp_path, *argv):
    args = vae.parse_args(["--out", str(tmp_path), "--no-progress", "--threads", "1", *argv])
    return vae.main(args)


@needs_mnist
@pytest.mark.parametrize("flow", vae_flows.FLOWS)
def test_quick_run_writes_results(tmp_path, flow):
    res = run(tmp_path, "--dataset", "mnist", "--data-dir", str(MNIST), "--flow", flow, "--quick")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["flow"] == flow and saved["dataset"] == "mnist"
    for key in REQUIRED:
        assert key in saved, key
    for key in ("test_neg_elbo", "test_nll_is", "wall_s", "seconds_per_epoch"):
        assert math.isfinite(saved[key]) and saved[key] > 0, key
    assert saved["unit"] == "nats" and saved["epochs_trained"] == 1
    assert saved["params"] == saved["params_encoder"] + saved["params_decoder"] + saved["params_flow"]
    assert (saved["params_flow"] > 0) == (flow != "none")
    # Importance sampling with K samples is never worse on average than one sample (same q).
    assert saved["test_nll_is"] <= saved["test_neg_elbo"] + 5.0
    assert res["test_neg_elbo"] == saved["test_neg_elbo"] and saved["example"] == "vae"
    if flow == "ffjord":
        assert saved["ffjord"]["eval_trace"] == "exact" and saved["ffjord"]["trace"] == "hutchinson"
        assert saved["history"][0]["nfe_forward_per_step"] > 0


@needs_mnist
def test_elbo_decreases(tmp_path):
    res = run(
        tmp_path, "--dataset", "mnist", "--data-dir", str(MNIST), "--flow", "ffjord", "--subset", "200",
        "--epochs", "3", "--width", "0.125", "--batch-size", "20", "--lr", "2e-3", "--warmup-epochs", "0",
        "--valid-points", "100", "--test-points", "20", "--is-samples", "0", "--validate-initial",
        "--ffjord-hidden-dims", "32", "--ffjord-steps", "2", "--ffjord-tol", "1e-3",
    )
    hist = res["history"]
    assert hist[0]["epoch"] == 0
    assert hist[-1]["valid_neg_elbo"] < hist[0]["valid_neg_elbo"] - 10
    losses = [l for h in hist[1:] for l in h["train_losses"]]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 10
    assert res["test_nll_is"] is None and res["is_samples"] == 0


@needs_mnist
def test_a_subset_run_evaluates_in_proportion(tmp_path):
    """A small --subset run validates on as many points as it trains on and scores the IS-NLL on
    1000 test points by default: scoring all 10,000 every epoch made such runs take hours."""
    args = vae.parse_args(["--out", str(tmp_path), "--subset", "30"])
    assert args.is_points == 1000 and args.valid_points is None and args.is_samples == 100
    res = run(tmp_path, "--dataset", "mnist", "--data-dir", str(MNIST), "--flow", "planar", "--subset", "30",
              "--epochs", "1", "--width", "0.125", "--num-flows", "1", "--test-points", "40",
              "--is-samples", "2", "--is-points", "10")
    assert res["data"]["train_used"] == res["data"]["valid_used"] == 30
    assert res["is_points"] == 10 and res["test_points"] == 40
    explicit = run(tmp_path / "explicit", "--dataset", "mnist", "--data-dir", str(MNIST), "--flow", "none",
                   "--subset", "30", "--epochs", "1", "--width", "0.125", "--valid-points", "45",
                   "--test-points", "5", "--is-samples", "0")
    assert explicit["data"]["valid_used"] == 45


@needs_mnist
def test_resume_continues_exactly(tmp_path):
    common = ["--dataset", "mnist", "--data-dir", str(MNIST), "--flow", "iaf", "--quick", "--subset", "60",
              "--batch-size", "20", "--is-samples", "0"]
    straight = run(tmp_path / "a", *common, "--epochs", "2")
    run(tmp_path / "b", *common, "--epochs", "1")
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1
    resumed = run(tmp_path / "b", *common, "--epochs", "2", "--resume")
    assert resumed["epochs_trained"] == 2
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]
    assert resumed["test_neg_elbo"] == straight["test_neg_elbo"]


@needs_mnist
def test_ctrl_c_mid_epoch_then_resume_continues_exactly(tmp_path, monkeypatch, capsys, ctrl_c_must_be_handled):
    common = ["--dataset", "mnist", "--data-dir", str(MNIST), "--flow", "ffjord", "--quick", "--subset", "60",
              "--batch-size", "20", "--is-samples", "0", "--epochs", "2", "--checkpoint-every", "0"]
    straight = run(tmp_path / "a", *common)
    calls, regularization = [], vae_model.regularization

    def interrupting(flows):  # called once per training batch: Ctrl-C during the 5th (epoch 2, batch 2)
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGINT)
        return regularization(flows)

    monkeypatch.setattr(vae_model, "regularization", interrupting)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "b", *common)
    assert exit.value.code == 130 and "checkpoint at step 5 written" in capsys.readouterr().err
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["part"]["batch"] == 2 and len(ck["part"]["losses"]) == 2  # mid-epoch
    monkeypatch.undo()
    resumed = run(tmp_path / "b", *common, "--resume")
    assert [h["train_losses"] for h in resumed["history"]] == [h["train_losses"] for h in straight["history"]]
    assert resumed["test_neg_elbo"] == straight["test_neg_elbo"]
    assert resumed["history"][1]["nfe_forward_per_step"] == straight["history"][1]["nfe_forward_per_step"]
    assert resumed["resumed"] and not straight["resumed"] and resumed["steps_per_epoch"] == 3
    assert [(g["start"], g["end"]) for g in resumed["segments"]] == [(0, 5), (5, 6)]
    # another learning rate is another run: refused, naming it; a missing checkpoint too
    with pytest.raises(runs.RunError, match=r"--lr 0\.0005 -> 0\.01"):
        run(tmp_path / "b", *common, "--resume", "--lr", "1e-2")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tmp_path / "c", *common, "--resume")


@pytest.mark.parametrize("argv", [["--valid-every", "0"], ["--ffjord-steps", "0"], ["--width", "0"],
                                  ["--batch-size", "0"], ["--epochs", "-1"], ["--lr", "nan"], ["--ffjord-T", "0"],
                                  ["--num-flows", "0"], ["--eval-batch-size", "0"], ["--ffjord-tol", "-1"],
                                  ["--latent-dim", "0"], ["--is-samples", "-1"], ["--checkpoint-minutes", "x"]])
def test_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        vae.parse_args(argv)
    assert exit.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_defaults_free_cores_and_a_quick_folder():
    # the conv nets share well between threads (2 trained 1.8x faster than 1 at --width 1): all free cores
    assert vae.parse_args([]).threads is None
    assert vae.parse_args(["--quick", "--flow", "iaf"]).out == os.path.join("out", "vae", "mnist-iaf-quick")
    assert vae.parse_args(["--flow", "iaf"]).out == os.path.join("out", "vae", "mnist-iaf")


def test_warmup_scales_the_whole_kl_term():
    """poutine.scale(beta) on z in model and guide: loss(beta) = rec + beta * KL, linear in beta."""
    args = vae.parse_args(["--flow", "planar", "--num-flows", "2", "--hypernet-hidden", "16"])
    model = vae_model.VAE((1, 28, 28), "bernoulli", 8, 0.125, vae_flows.build_flows(args, 8))
    x = torch.bernoulli(torch.full((5, 1, 28, 28), 0.3))
    elbo = pyro.infer.Trace_ELBO()

    def loss(beta):
        pyro.set_rng_seed(1)
        return elbo.differentiable_loss(model.model, model.guide, x, beta).item()

    l0, l1, lh = loss(0.2), loss(1.0), loss(0.6)
    assert lh == pytest.approx((l0 + l1) / 2, rel=1e-5)
    assert abs(l1 - l0) > 0.5  # the KL term is there
    # beta = 1 is the ELBO: the same as the evaluation's per-point log weights.
    pyro.set_rng_seed(1)
    assert -float(model.log_weights(x).sum()) == pytest.approx(l1, rel=1e-5)


def test_sylvester_log_det_matches_autograd(float64):
    torch.manual_seed(0)
    flow = vae_flows.ConditionalSylvester(5, 3, num_householder=3)
    for p in flow.parameters():
        p.data.normal_(0, 0.5)
    context = torch.randn(4, 3)
    t = flow.condition(context)
    x = torch.randn(4, 5)
    with torch.no_grad():
        y = t(x)
        ladj = t.log_abs_det_jacobian(x, y)
    for i in range(4):
        with torch.no_grad():
            ti = flow.condition(context[i])
        J = torch.autograd.functional.jacobian(ti._call, x[i])
        assert float(ladj[i]) == pytest.approx(float(torch.linalg.slogdet(J)[1]), abs=1e-10)
    # Q is orthogonal.
    Q = t.Q
    assert torch.allclose(Q @ Q.transpose(-1, -2), torch.eye(5).expand(4, 5, 5), atol=1e-10)


@pytest.mark.parametrize("dataset, folder", [("freyfaces", "freyfaces"), ("caltech", "caltech101_silhouettes")])
def test_quick_run_other_datasets(tmp_path, dataset, folder):
    if not (DATA / folder).is_dir():
        pytest.skip(f"no {folder} copy")
    res = run(tmp_path, "--dataset", dataset, "--data-dir", str(DATA / folder), "--flow", "ffjord", "--quick")
    assert math.isfinite(res["test_neg_elbo"]) and math.isfinite(res["test_nll_is"])
    if dataset == "freyfaces":
        # 256-way categorical per pixel, reported in bits/dim (the paper's unit for Frey faces).
        assert res["unit"] == "bits/dim" and res["likelihood"] == "categorical"
        assert res["test_neg_elbo"] * 560 * math.log(2) == pytest.approx(res["test_neg_elbo_nats"])
        assert 6.0 < res["test_neg_elbo"] < 9.0  # about log2(256) = 8 bits untrained
        assert res["data"]["seed"] == 123 and res["data"]["sizes"] == [1565, 200, 200]
    else:
        assert res["unit"] == "nats" and res["data"]["sizes"] == [4100, 2264, 2307]
        assert "split" in res["data"]


def test_frey_unit_conversion():
    u = vae.unit_of("categorical", (1, 28, 20))
    assert u["unit"] == "bits/dim" and u["nats_per_unit"] == pytest.approx(560 * math.log(2))
    assert vae.unit_of("bernoulli", (1, 28, 28))["unit"] == "nats"


# The paper's amortized low-rank CNF posteriors (the FFJORD reference code's VAE settings):
# blocks, rank, hidden widths, nonlinearity, per data set.
PAPER = {
    "mnist": (2, 64, [1024, 1024], nn.Softplus),
    "omniglot": (5, 20, [512, 512], nn.Softplus),
    "freyfaces": (2, 20, [512, 512], nn.Softplus),
    "caltech": (1, 20, [2048], nn.Tanh),
}


def built_flows(*argv, meta=False):
    """The posterior flows examples/vae.py builds for these options (parsed, defaults filled)."""
    args = vae.parse_args(["--flow", "ffjord", *argv])
    with torch.device("meta" if meta else "cpu"):  # meta: shapes without memory (142M numbers)
        return vae_flows.build_flows(args, args.latent_dim, vae_model.H_DIM)


def field(flow):
    """Hidden widths, nonlinearity and time embedding of a ConditionalFFJORD's field."""
    widths = [layer.linear.out_features for layer in flow.net.layers]
    concat = all(isinstance(layer, ConcatLinear) for layer in flow.net.layers)
    return widths, type(flow.net.activation), concat


@pytest.mark.parametrize("dataset", PAPER)
def test_paper_ffjord_posterior_as_built(dataset):
    blocks, rank, hidden, activation = PAPER[dataset]
    flows = built_flows("--dataset", dataset, "--ffjord-config", "paper", meta=True)
    assert len(flows) == blocks
    for flow in flows:
        assert isinstance(flow, ConditionalFFJORD) and flow.input_dim == 64 and flow.context_dim == 256
        assert field(flow) == (hidden + [64], activation, True)  # "concat" time embedding
        net, cfg = flow.net, flow.config
        assert net.conditioning == "lowrank" and net.rank == rank
        # One linear head h -> per-sample bias b_l, U_l (in x rank) and V_l (out x rank) of every layer.
        dims = [64, *hidden, 64]
        assert net.head.in_features == 256
        assert net.head.out_features == sum(b + (a + b) * rank for a, b in zip(dims[:-1], dims[1:]))
        assert cfg.T == 0.5 and not cfg.train_T
        assert (cfg.trace, cfg.noise, cfg.eval_trace) == ("hutchinson", "rademacher", "exact")
        assert (cfg.solver, cfg.eval_solver, cfg.atol, cfg.rtol) == ("dopri5", "dopri5", 1e-5, 1e-5)
        assert not cfg.adjoint and cfg.kinetic == cfg.jacobian == 0  # --adjoint, --kinetic: off by default
    if dataset == "mnist":  # the flow parameters docs/vae.md reports (they do not depend on --width)
        n = sum(p.numel() for p in flows.parameters())
        assert n == 142_406_016 and f"{n:,}" in DOCS


def test_lean_ffjord_posterior_as_built():
    (flow,) = built_flows("--dataset", "mnist")
    assert field(flow) == ([256, 256, 64], nn.Softplus, True)
    net, cfg = flow.net, flow.config
    assert net.conditioning == "concat" and (net.context_proj.in_features, net.context_proj.out_features) == (256, 256)
    assert (cfg.solver, cfg.steps, cfg.step_size) == ("rk4", 4, None)
    assert (cfg.trace, cfg.eval_trace, cfg.eval_solver, cfg.atol) == ("hutchinson", "exact", "dopri5", 1e-5)
    n = sum(p.numel() for p in flow.parameters())
    assert n == 164_992 and f"{n:,}" in DOCS
    # The steps reach the training solve: rk4 evaluates the field 4 times per step.
    for argv, evaluations in (((), 16), (("--ffjord-steps", "3"), 12), (("--quick",), 8)):
        (flow,) = built_flows(*argv)
        base = dist.Normal(torch.zeros(5, 64), 1.0).to_event(1)
        q = dist.ConditionalTransformedDistribution(base, [flow]).condition(torch.randn(5, 256))
        q.log_prob(q.rsample())
        assert flow.nfe_forward == evaluations, argv
    # --quick: a small field, 2 steps, looser tolerance; an explicit option still wins.
    (flow,) = built_flows("--quick", "--ffjord-tol", "1e-4")
    assert field(flow)[0] == [32, 64] and flow.config.steps == 2 and flow.config.atol == 1e-4
    # An adaptive solver ignores the steps.
    (flow,) = built_flows("--ffjord-solver", "dopri5", "--ffjord-steps", "3")
    assert flow.config.solver == "dopri5"
    flow.condition(torch.randn(2, 256))(torch.randn(2, 64))
    assert flow.nfe_forward not in (0, 12)
