"""examples/toy_density.py: quick run outputs, learning, --steps reaching the solver, and
--resume equal to an uninterrupted run."""

import json
import math

import pytest
import torch

import toy_density


def run(out, *argv):
    args = toy_density.parse_args(["--out", str(out), "--no-progress", "--threads", "1", "--quick", *argv])
    return toy_density.main(args)


def test_quick_run_writes_pictures_and_results(tmp_path):
    res = run(tmp_path)
    for name in ("density.png", "trajectory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["test_nll"] == res["test_nll"]
    assert math.isfinite(saved["test_nll"]) and saved["test_finite"]
    assert math.isfinite(saved["test_nll_training_solver"])
    assert saved["data"] == "pinwheel" and saved["iterations"] == 20 and len(saved["losses"]) == 20
    assert saved["resumed_from"] is None
    assert saved["nfe_forward_last"] == 12  # 3 fixed rk4 steps by default, 4 evaluations each
    assert saved["args"]["quick"] and saved["flow_options"]["eval_trace"] == "exact"
    for key in ("train_seconds", "nfe_forward_mean", "test_nll_initial"):
        assert saved[key] is not None, key
    for key in ("torch", "threads", "device", "date"):
        assert saved["machine"][key] is not None, key
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 20 and len(ck["losses"]) == 20 and "numpy" in ck["rng"]


def test_steps_reach_the_training_solver(tmp_path):
    res = run(tmp_path, "--iters", "2", "--steps", "5", "--test-points", "20", "--grid", "4")
    assert res["nfe_forward_last"] == 20  # 5 rk4 steps, 4 evaluations each
    assert res["flow_options"]["steps"] == 5


def test_short_fit_lowers_test_nll(tmp_path):
    res = run(tmp_path, "--data", "8gaussians", "--zero-init", "--iters", "40")
    # A zero-initialised flow is the identity: the initial NLL is the standard normal's.
    test = toy_density.toy.sample("8gaussians", res["test_points"], seed=toy_density.TEST_SEED).double()
    normal_nll = float(0.5 * (test.pow(2).sum(-1) + 2 * math.log(2 * math.pi)).mean())
    assert res["test_nll_initial"] == pytest.approx(normal_nll, abs=1e-4)
    assert res["test_nll"] < res["test_nll_initial"] - 0.3


@pytest.mark.parametrize("flow_args", [("--kinetic", "0", "--jacobian", "0"), ("--trace", "hutchinson",)],
                         ids=["exact", "hutchinson-rnode"])
def test_resume_equals_uninterrupted_run(tmp_path, flow_args):
    whole = run(tmp_path / "whole", "--iters", "10", *flow_args)
    run(tmp_path / "split", "--iters", "4", *flow_args)
    resumed = run(tmp_path / "split", "--iters", "10", "--resume", *flow_args)
    assert resumed["resumed_from"] == 4 and resumed["iterations"] == 10
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 10
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, atol=1e-6, rtol=0, msg=name)
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-6)
    assert resumed["test_nll"] == pytest.approx(whole["test_nll"], abs=1e-5)
    assert resumed["test_nll_initial"] == whole["test_nll_initial"]


def test_resume_refuses_a_missing_or_foreign_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tmp_path / "none", "--resume")
    run(tmp_path, "--iters", "1", "--test-points", "20", "--grid", "4")
    with pytest.raises(ValueError, match="trained on 'pinwheel'"):
        run(tmp_path, "--iters", "2", "--resume", "--data", "8gaussians")
