"""examples/image_density.py: quick runs of both --config on MNIST (results, pictures, checkpoint),
the paper's configuration as built, --resume after Ctrl-C equal to an uninterrupted run
(in-process, and a real SIGINT to the script), a missing MNIST file through the script's cli, and
the bits/dim reported recomputed independently from the checkpoint and the raw IDX pixels."""

import json
import math
import pathlib
import sys

import pyro.distributions as dist
import pytest
import torch

import image_density
import image_model
from pyro_ffjord import MultiscaleFFJORD, bits_per_dim, checkpoints, dequantize, runs
from pyro_ffjord.datasets import mnist

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"
SCRIPT = ROOT / "examples" / "image_density.py"
needs_mnist = pytest.mark.skipif(not (MNIST / "train-images-idx3-ubyte.gz").exists(), reason="no MNIST copy")
PNG = b"\x89PNG\r\n\x1a\n"
KEYS = ("dataset", "config", "image_shape", "data", "flow_options", "params", "batch_size", "lr", "warmup_iters",
        "iterations", "stopped", "train_seconds", "seconds_per_iteration", "nfe_train_per_solve",
        "nfe_train_per_iteration", "nfe_eval_per_solve", "nfe_eval_per_pass", "best_valid_bpd", "best_iteration",
        "test_bpd", "test_bpd_se", "test_probe_sd_bpd", "test_points", "test_probes", "test_finite", "estimator",
        "paper_bpd", "paper_config", "valid_history", "losses", "clock", "machine", "args")


@pytest.fixture(autouse=True, scope="module")
def _cached_data(cached_loader):
    # The example reads (and checks the sha256 of) all of MNIST each run; the tests read it once.
    cached_loader(image_model, "load", maxsize=2)


def run(out, *argv):
    args = image_density.parse_args(["--out", str(out), "--no-progress", "--threads", "1", "--quick",
                                     "--data-dir", str(MNIST), *argv])
    return image_density.main(args)


@needs_mnist
@pytest.mark.parametrize("config", image_model.CONFIGS)
def test_quick_run_writes_results_and_pictures(tmp_path, config):
    res = run(tmp_path, "--config", config, "--subset", "40")
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in KEYS:
        assert key in saved, key
    assert saved["test_bpd"] == res["test_bpd"] and math.isfinite(saved["test_bpd"]) and saved["test_finite"]
    assert 0 < saved["test_bpd_se"] < 5 and 0 < saved["test_probe_sd_bpd"] < saved["test_bpd_se"]
    assert (saved["test_points"], saved["test_probes"], saved["data"]["valid_points"]) == (8, 2, 8)
    assert saved["dataset"] == "mnist" and saved["config"] == config and saved["paper_bpd"] == 0.99
    assert saved["image_shape"] == [1, 28, 28] and saved["data"]["train_images"] == 40
    assert saved["iterations"] == 6 == len(saved["losses"]) == len(saved["clock"]) and saved["stopped"] == "iters"
    assert [h["iteration"] for h in saved["valid_history"]] == [3, 6]
    assert saved["best_valid_bpd"] == min(h["valid_bpd"] for h in saved["valid_history"])
    assert saved["train_seconds"] > 0 and saved["seconds_per_iteration"] > 0
    assert "Hutchinson, 2 Rademacher probe(s)" in saved["estimator"]
    options = saved["flow_options"]  # --quick: 2 scales of one CNF each, 8 channels, tolerance 1e-3
    assert options["multiscale"] and options["scales"] == 2 and options["num_cnfs"] == 3
    assert options["cnf_shapes"] == [[2, 14, 14], [4, 14, 14], [1, 28, 28]] and options["hidden_channels"] == [8]
    assert options["eval_method"] == "dopri5"
    assert options["atol"] == options["rtol"] == 1e-3 and options["logit_alpha"] == 1e-6
    assert (options["trace"], options["noise"], options["eval_trace"]) == ("hutchinson", "rademacher", "hutchinson")
    if config == "fast":  # 3 rk4 steps, 4 evaluations each, in every CNF; RNODE on
        assert saved["nfe_train_per_solve"] == 12 and saved["nfe_train_per_iteration"] == 36
        assert options["training_steps"] == [3, 3, 3] and options["T"] == 0.5 and not options["adjoint"]
        assert options["kinetic"] == options["jacobian"] == 0.01 and saved["nfe_train_adjoint_per_iteration"] == 0
    else:  # dopri5 with adjoint gradients, T learned from 1
        assert options["solver"] == "dopri5" and options["adjoint"] and options["train_T"]
        assert saved["nfe_train_adjoint_per_iteration"] > 0 and options["end_times"] != [1.0, 1.0, 1.0]
    assert saved["nfe_eval_per_solve"] >= 6
    assert saved["nfe_eval_per_pass"] == pytest.approx(3 * saved["nfe_eval_per_solve"])
    for name in ("samples.png", "bpd_curve.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 6 and ck["config"]["config"] == config and "iters" not in ck["config"]


def test_paper_configuration_as_built():
    args = image_density.parse_args(["--data-dir", "unused"])
    assert (args.config, args.batch_size, args.lr, args.warmup_iters) == ("paper", 200, 1e-3, 1000)
    assert args.out == str(pathlib.Path("out", "image", "mnist-paper")) and args.probes == 4
    options = image_model.flow_options(args.config, args.hidden, args.scales, args.blocks, args.tol, args.kinetic,
                                       args.jacobian, args.eval_trace)
    flow, density = image_model.build(options, torch.device("cpu"))
    got = image_model.describe(flow, options)
    assert got["multiscale"] and got["scales"] == 3 and got["blocks_per_scale"] == 2 and got["num_cnfs"] == 10
    assert got["hidden_channels"] == [64, 64, 64]
    assert (got["time_embedding"], got["activation"]) == ("concat", "softplus")
    assert (got["solver"], got["eval_method"], got["atol"], got["rtol"]) == ("dopri5", "dopri5", 1e-5, 1e-5)
    assert all(f.config.eval_method == "dopri5" and f.config.solver == "dopri5" for f in flow.flows)
    assert got["T"] == 1.0 and got["train_T"] and all(f.log_T.requires_grad for f in flow.flows)
    assert got["adjoint"] and (got["trace"], got["noise"]) == ("hutchinson", "rademacher")
    assert got["logit_alpha"] == 1e-6
    assert got["kinetic"] == got["jacobian"] == 0.0 and got["latent_shape"] == [4, 14, 14]
    assert sorted(map(tuple, got["cnf_shapes"])) == sorted([(1, 28, 28)] * 2 + [(4, 14, 14)] * 2 + [(2, 14, 14)] * 2
                                                          + [(8, 7, 7)] * 2 + [(4, 7, 7)] * 2)
    assert density.event_shape == torch.Size([1, 28, 28])
    # fast: the same model, only the solve differs
    fast = image_model.flow_options("fast")
    same = ("hidden_channels", "blocks_per_scale", "scales", "logit_alpha", "time_embedding", "activation", "trace")
    assert {k: fast[k] for k in same} == {k: options[k] for k in same}
    assert (fast["solver"], fast["steps"], fast["eval_solver"], fast["atol"]) == ("rk4", 3, "dopri5", 1e-5)


@needs_mnist
def test_ctrl_c_then_resume_finishes_like_an_uninterrupted_run(tmp_path, ctrl_c_then_resume):
    common = ("--config", "fast", "--iters", "6", "--valid-every", "2", "--checkpoint-every", "0", "--lr", "0.01")
    # Ctrl-C during the second validation (iteration 4)
    whole, resumed = ctrl_c_then_resume(run, tmp_path, common, image_model, at=4)
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    assert [h["valid_bpd"] for h in resumed["valid_history"]] == pytest.approx(
        [h["valid_bpd"] for h in whole["valid_history"]], abs=1e-6)
    assert resumed["test_bpd"] == pytest.approx(whole["test_bpd"], abs=1e-6)
    assert [(s["start"], s["end"]) for s in resumed["segments"]] == [(0, 4), (4, 6)]
    with pytest.raises(runs.RunError, match=r"--lr 0.01 -> 0.1"):  # a resumed run is the same run
        run(tmp_path / "split", *common[:-2], "--lr", "0.1", "--resume")


@needs_mnist
def test_sigint_to_the_script_then_resume_equals_an_uninterrupted_run(tmp_path, sigint_then_resume):
    """The real thing: Ctrl-C (SIGINT) to ``python examples/image_density.py`` while it trains,
    then ``--resume`` to the end."""
    out = tmp_path / "split"
    argv = [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--threads", "1", "--checkpoint-every", "1",
            "--data-dir", str(MNIST), "--out", str(out), "--iters", "100000"]
    resumed = sigint_then_resume(argv, out, lambda: run(out, "--iters", "10", "--resume"), iters=10)
    whole = run(tmp_path / "whole", "--iters", "10")
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    assert resumed["test_bpd"] == pytest.approx(whole["test_bpd"], abs=1e-6)


def test_missing_mnist_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "COMMAND", None)  # runs.cli records the command line
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        runs.cli(image_density.main, lambda: image_density.parse_args(
            ["--quick", "--no-progress", "--out", str(out), "--data-dir", str(tmp_path)]))
    message = exit.value.code
    assert isinstance(message, str) and message.startswith("error: ")  # a message: exit status 1
    assert "train-images-idx3-ubyte" in message and str(tmp_path) in message and mnist.IDX_URL in message
    assert not out.exists()  # refused before anything is written


@needs_mnist
def test_reported_bits_per_dim_is_bits_per_dim_of_the_models_log_prob(tmp_path):
    """The example's accounting, recomputed without it: the test images read from the IDX file
    as raw uint8 (not through the loader's k / 255), dequantized with the example's seed, scored
    by a flow built here (logit alpha 1e-6 last) with the checkpoint's best parameters."""
    res = run(tmp_path, "--config", "fast", "--iters", "4", "--valid-every", "2", "--lr", "0.01")
    n, probes = res["test_points"], res["test_probes"]
    raw = torch.from_numpy(mnist.read_mnist_idx(MNIST, mnist.TEST_IMAGES)[:n].copy()).reshape(n, 1, 28, 28)
    x = dequantize(raw, torch.Generator().manual_seed(image_model.TEST_SEED))
    assert torch.equal((x * 256).floor().to(torch.uint8), raw) and bool((x < 1).all())
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    params = ck["model"] if res["best_iteration"] == res["iterations"] else ck["best_model"]
    flow = MultiscaleFFJORD((1, 28, 28), scales=2, blocks_per_scale=1, hidden_channels=[8], logit_alpha=1e-6,
                            time_embedding="concat", activation="softplus", eval_solver="dopri5", atol=1e-3,
                            rtol=1e-3, eval_trace="hutchinson", noise="rademacher")
    flow.load_state_dict(params)
    density = dist.TransformedDistribution(flow.base_distribution(), [flow])
    flow.eval()
    torch.manual_seed(image_model.EVAL_SEED)  # the probes: image i repeated `probes` times, one solve
    with torch.no_grad():
        log_p = density.log_prob(x.repeat_interleave(probes, 0)).double().reshape(n, probes).mean(1)
    bpd = bits_per_dim(log_p, 784)
    assert res["test_bpd"] == pytest.approx(float(bpd.mean()), abs=1e-6)
    assert res["test_bpd_se"] == pytest.approx(float(bpd.std() / math.sqrt(n)), abs=1e-6)
    # and by hand: bits/dim = -(log p(x) - D log 256) / (D log 2)
    by_hand = -(log_p - 784 * math.log(256)).mean() / (784 * math.log(2))
    assert res["test_bpd"] == pytest.approx(float(by_hand), abs=1e-6)


@needs_mnist
def test_flow_matching_trains_one_cnf_and_is_scored_alike(tmp_path):
    res = run(tmp_path, "--config", "fast", "--subset", "40", "--objective", "fm", "--coupling", "independent")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["objective"], saved["coupling"], saved["sigma_min"]) == ("fm", "independent", 1e-4)
    assert saved["train_loss_kind"] == "flow matching" and len(saved["losses"]) == 6
    options = saved["flow_options"]
    assert (options["num_cnfs"], options["scales"], options["kinetic"], options["jacobian"]) == (1, 1, 0.0, 0.0)
    assert saved["nfe_train_per_iteration"] == 0  # no solve in training
    assert saved["nfe_eval_per_solve"] > 0 and math.isfinite(res["test_bpd"]) and saved["test_finite"]
    assert all(math.isfinite(v) and v > 0 for v in saved["losses"])
    # The loss is the field's regression on the logit of the pixels, the CNF's data end.
    assert saved["losses"][0] > 10  # logit pixels reach |y| ~ 14 (alpha 1e-6): far from N(0, 1)
    assert (tmp_path / "samples.png").read_bytes()[:8] == PNG


def test_flow_matching_refuses_a_multiscale_model_and_rnode(capsys):
    for argv, message in ((("--scales", "2"), "--scales must be 1"), (("--blocks", "2"), "--blocks must be 1"),
                          (("--kinetic", "0.1"), "--kinetic regularizes the training solve")):
        with pytest.raises(SystemExit) as exit:
            image_density.parse_args(["--objective", "fm", *argv])
        assert exit.value.code == 2 and message in capsys.readouterr().err
    args = image_density.parse_args(["--objective", "fm", "--quick"])
    assert (args.scales, args.blocks, args.coupling, args.kinetic) == (1, 1, "ot", 0.0)
    assert image_density.parse_args([]).scales is None  # the multiscale default under mle
