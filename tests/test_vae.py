"""examples/vae.py: quick runs of every posterior flow, learning, warm-up, resume, Sylvester log-det."""

import functools
import importlib.util
import json
import math
import pathlib

import pyro
import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MNIST = DATA / "mnist"

spec = importlib.util.spec_from_file_location("vae_example", ROOT / "examples" / "vae.py")
vae = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vae)
import vae_model  # noqa: E402  (examples/ is on sys.path once vae.py is loaded)

needs_mnist = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="no MNIST copy")

REQUIRED = (
    "dataset", "flow", "epochs", "params", "device", "wall_s", "test_neg_elbo", "test_nll_is", "unit",
    "data", "budget", "seconds_per_epoch", "test_neg_elbo_nats", "machine",
)


@pytest.fixture(autouse=True, scope="module")
def _cached_data():
    # The example reads and binarizes all of MNIST each run; the tests read it once.
    original = vae.load
    vae.load = functools.lru_cache(maxsize=4)(original)
    yield
    vae.load = original


def run(tmp_path, *argv):
    args = vae.parse_args(["--out", str(tmp_path), "--no-progress", "--threads", "1", *argv])
    return vae.main(args)


@needs_mnist
@pytest.mark.parametrize("flow", vae.FLOWS)
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
    assert res["test_neg_elbo"] == saved["test_neg_elbo"]
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


def test_warmup_scales_the_whole_kl_term():
    """poutine.scale(beta) on z in model and guide: loss(beta) = rec + beta * KL, linear in beta."""
    args = vae.parse_args(["--flow", "planar", "--num-flows", "2", "--hypernet-hidden", "16"])
    model = vae.VAE((1, 28, 28), "bernoulli", 8, 0.125, vae.build_flows(args, 8))
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
    flow = vae_model.ConditionalSylvester(5, 3, num_householder=3)
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


def test_paper_ffjord_configs():
    counts = {}
    for name, cfg in vae_model.PAPER_FFJORD.items():
        args = vae.parse_args(["--dataset", name, "--flow", "ffjord", "--ffjord-config", "paper"])
        settings = vae.ffjord_settings(args)
        assert settings["conditioning"] == "lowrank" and settings["solver"] == "dopri5"
        assert settings["time_embedding"] == "concat" and settings["T"] == 0.5
        counts[name] = cfg
    # MNIST: rank 64, 1024-1024: each block's amortization head is Linear(256 -> 272,448).
    dims = [64, 1024, 1024, 64]
    per_block = sum(b + a * 64 + b * 64 for a, b in zip(dims[:-1], dims[1:]))
    assert per_block == 272_448
