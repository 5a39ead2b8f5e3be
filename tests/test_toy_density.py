"""examples/toy_density.py: quick run outputs, learning, --steps reaching the solver, --resume
equal to an uninterrupted run (also after Ctrl-C), checkpoints by minutes, resume refusing other
options, and the checks of the command line (device, numbers, threads, the quick folder)."""

import json
import math
import os
import pathlib
import signal
import subprocess
import sys

import pytest
import torch

import toy_density
from pyro_ffjord import checkpoints, runs

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "toy_density.py"


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
    assert saved["resumed_from"] is None and saved["resumed"] is False
    assert [(g["start"], g["end"]) for g in saved["segments"]] == [(0, 20)]
    assert saved["train_seconds"] == saved["segments"][0]["train_seconds"] > 0
    assert saved["nfe_forward_last"] == 12  # 3 fixed rk4 steps by default, 4 evaluations each
    assert saved["args"]["quick"] and saved["flow_options"]["eval_trace"] == "exact"
    for key in ("train_seconds", "nfe_forward_mean", "test_nll_initial"):
        assert saved[key] is not None, key
    for key in ("torch", "threads", "device", "date", "revision", "revision_modified"):
        assert saved["machine"][key] is not None, key  # the machine and revision block
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 20 and len(ck["losses"]) == 20 and "numpy" in ck["rng"]
    assert ck["config"]["lr"] == 1e-3 and ck["config"]["data"] == "pinwheel" and "iters" not in ck["config"]


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


@pytest.mark.parametrize("flow_args", [("--kinetic", "0", "--jacobian", "0"), ("--trace", "hutchinson",),
                                       ("--objective", "fm")], ids=["exact", "hutchinson-rnode", "flow-matching"])
def test_resume_equals_uninterrupted_run(tmp_path, flow_args):
    whole = run(tmp_path / "whole", "--iters", "10", *flow_args)
    run(tmp_path / "split", "--iters", "4", *flow_args)
    resumed = run(tmp_path / "split", "--iters", "10", "--resume", *flow_args)
    assert resumed["resumed_from"] == 4 and resumed["iterations"] == 10
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == 10
    for name, value in a["model"].items():
        if torch.is_tensor(value):  # (and the field's architecture, a dict)
            torch.testing.assert_close(b["model"][name], value, atol=1e-6, rtol=0, msg=name)
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-6)
    assert resumed["test_nll"] == pytest.approx(whole["test_nll"], abs=1e-5)
    assert resumed["test_nll_initial"] == whole["test_nll_initial"]


def test_resume_refuses_a_missing_checkpoint_or_other_options(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tmp_path / "none", "--resume")
    run(tmp_path, "--iters", "1", "--test-points", "20", "--grid", "4")
    # A resumed run is the same run: another lr, seed or data set is refused, naming the option.
    for argv, says in ((("--data", "8gaussians"), "--data pinwheel -> 8gaussians"), (("--lr", "0.5"), "--lr 0.001 -> 0.5"),
                       (("--seed", "3"), "--seed 0 -> 3"), (("--steps", "4"), "--steps 3 -> 4")):
        with pytest.raises(runs.RunError, match=f"written with other options \\({says}\\).*without --resume"):
            run(tmp_path, "--iters", "2", "--resume", "--test-points", "20", "--grid", "4", *argv)
    # what only sizes the budget or the evaluation may change
    res = run(tmp_path, "--iters", "2", "--resume", "--test-points", "30", "--grid", "5", "--threads", "1")
    assert res["iterations"] == 2 and res["args"]["lr"] == 1e-3 and res["resumed"]


def interrupt_at(monkeypatch, iteration, batch_size):
    """Ctrl-C (a real SIGINT) while the loop draws the batch of ``iteration`` (1-based)."""
    calls, sample = [], toy_density.toy.sample

    def sample_and_interrupt(name, n, seed=None):
        if n == batch_size:  # a training batch (held-out and picture points use other sizes)
            calls.append(n)
            if len(calls) == iteration:
                signal.raise_signal(signal.SIGINT)
        return sample(name, n, seed=seed)

    monkeypatch.setattr(toy_density.toy, "sample", sample_and_interrupt)


def test_ctrl_c_saves_and_resume_finishes_like_an_uninterrupted_run(tmp_path, monkeypatch, capsys,
                                                                  ctrl_c_must_be_handled):
    common = ("--batch-size", "64", "--test-points", "20", "--grid", "4", "--picture-samples", "50",
              "--checkpoint-every", "0")
    whole = run(tmp_path / "whole", "--iters", "9", *common)
    interrupt_at(monkeypatch, 4, batch_size=64)
    with pytest.raises(SystemExit) as exit:
        run(tmp_path / "split", "--iters", "9", *common)
    assert exit.value.code == 130
    err = capsys.readouterr().err
    assert "checkpoint at iteration 4 written" in err and "--resume" in err
    ck = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 4 and len(ck["losses"]) == 4  # the iteration under way finished first
    assert not (tmp_path / "split" / "results.json").exists()
    monkeypatch.undo()

    titles = []
    monkeypatch.setattr(toy_density, "make_pictures", lambda args, flow, density, title: titles.append(title) or 0.0)
    resumed = run(tmp_path / "split", "--iters", "9", "--resume", *common)
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for name, value in a["model"].items():
        if torch.is_tensor(value):
            torch.testing.assert_close(b["model"][name], value, atol=1e-6, rtol=0, msg=name)
    assert resumed["losses"] == pytest.approx(whole["losses"], abs=1e-6)
    assert resumed["test_nll"] == pytest.approx(whole["test_nll"], abs=1e-5)
    # The results and the picture say the run was resumed, with each segment's training time.
    assert resumed["resumed"] and resumed["resumed_from"] == 4
    assert [(g["start"], g["end"], g["resumed"]) for g in resumed["segments"]] == [(0, 4, False), (4, 9, True)]
    assert resumed["train_seconds"] == pytest.approx(sum(g["train_seconds"] for g in resumed["segments"]))
    assert "resumed" in titles[0] and not whole["resumed"]


def test_checkpoints_by_elapsed_minutes(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(checkpoints, "clock", lambda: now[0])
    sample, at = toy_density.toy.sample, []

    def sample_slowly(name, n, seed=None):
        now[0] += 40.0 if n == 16 else 0.0  # each training batch "takes" 40 s
        return sample(name, n, seed=seed)

    save = runs.save_checkpoint
    monkeypatch.setattr(toy_density.toy, "sample", sample_slowly)
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda path, state, *a, **k: at.append(state["iteration"])
                        or save(path, state, *a, **k))
    res = run(tmp_path, "--iters", "7", "--batch-size", "16", "--checkpoint-every", "0", "--checkpoint-minutes", "1.5",
              "--test-points", "20", "--grid", "4")
    assert at == [3, 6, 7]  # every 1.5 minutes of training, and at the end
    assert res["train_seconds"] == pytest.approx(7 * 40.0)


def test_defaults_one_thread_and_a_quick_folder():
    # one thread: 64-wide nets at D = 2 lose time to a second one (the README's "one CPU core")
    assert toy_density.parse_args([]).threads == 1
    assert toy_density.parse_args(["--quick"]).out == os.path.join("out", "toy_density-quick")
    assert toy_density.parse_args([]).out == os.path.join("out", "toy_density")
    assert toy_density.parse_args(["--quick", "--out", "elsewhere"]).out == "elsewhere"


@pytest.mark.parametrize("argv", [("--steps", "0"), ("--T", "0"), ("--eval-chunk", "0"), ("--batch-size", "0"),
                                  ("--lr", "nan"), ("--lr", "-0.001"), ("--iters", "-1"), ("--hidden", "64", "0"),
                                  ("--tol", "0"), ("--kinetic", "-1"), ("--grid", "0"), ("--test-points", "0"),
                                  ("--checkpoint-minutes", "-1"), ("--threads", "0"), ("--seed", "-1")])
def test_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        toy_density.parse_args(list(argv))
    assert exit.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_exits_clearly_and_creates_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "argument --device: cuda: CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_sigint_to_the_script_saves_and_exits_130(tmp_path, interrupt_after_first_checkpoint):
    """The real thing: Ctrl-C (SIGINT) to ``python examples/toy_density.py`` while it trains."""
    out = tmp_path / "run"
    argv = [sys.executable, str(SCRIPT), "--quick", "--iters", "100000", "--checkpoint-every", "3", "--no-progress",
            "--test-points", "20", "--out", str(out)]
    proc = interrupt_after_first_checkpoint(argv)
    err = proc.stderr
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted: checkpoint at iteration" in err
    assert f"{SCRIPT.name} --quick --iters 100000" in err and err.rstrip().endswith("--resume")
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] >= 3 and ck["segments"][-1]["end"] == ck["iteration"]


def test_flow_matching_objective_fits_without_a_solve_and_is_evaluated_as_mle(tmp_path):
    res = run(tmp_path, "--objective", "fm", "--data", "8gaussians", "--zero-init", "--iters", "60")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["objective"], saved["coupling"], saved["sigma_min"]) == ("fm", "ot", 1e-4)
    assert saved["train_loss_kind"] == "flow matching" and len(saved["losses"]) == 60
    assert saved["nfe_forward_last"] == 0  # no ODE solve in training
    assert math.isfinite(saved["test_nll"]) and saved["test_finite"] and saved["test_nll"] == res["test_nll"]
    # the same exact-trace evaluation as --objective mle: the zero-initialised flow starts as N(0, I)
    assert res["test_nll"] < res["test_nll_initial"] - 0.3  # about 1.2-1.5 nats over seeds 0-3
    assert (tmp_path / "density.png").exists()


def test_objective_options_and_resume_refusing_another_objective(tmp_path, capsys):
    args = toy_density.parse_args([])
    assert (args.objective, args.coupling, args.sigma_min) == ("mle", None, None)
    args = toy_density.parse_args(["--objective", "fm", "--coupling", "independent"])
    assert (args.objective, args.coupling, args.sigma_min) == ("fm", "independent", 1e-4)
    for argv in (("--coupling", "ot"), ("--objective", "fm", "--sigma-min", "1"), ("--objective", "nll")):
        with pytest.raises(SystemExit) as exit:
            toy_density.parse_args(list(argv))
        assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "--coupling: only with --objective fm" in err and "--sigma-min" in err
    small = ("--test-points", "20", "--grid", "4", "--picture-samples", "50")
    run(tmp_path / "mle", "--iters", "1", *small)
    with pytest.raises(runs.RunError, match=r"--objective \(unset\) -> fm.*without --resume"):
        run(tmp_path / "mle", "--iters", "2", "--resume", "--objective", "fm", *small)
    run(tmp_path / "fm", "--iters", "1", "--objective", "fm", *small)
    for argv, says in ((("--objective", "mle"), "--objective fm -> \\(unset\\)"),
                       (("--objective", "fm", "--coupling", "independent"), "--coupling ot -> independent")):
        with pytest.raises(runs.RunError, match=f"{says}.*without --resume"):
            run(tmp_path / "fm", "--iters", "2", "--resume", *small, *argv)
    res = run(tmp_path / "fm", "--iters", "2", "--resume", "--objective", "fm", *small)
    assert res["resumed_from"] == 1 and res["objective"] == "fm" and len(res["losses"]) == 2


def test_mixed_schedule_switches_to_maximum_likelihood_once_and_resumes_past_it(tmp_path, capsys):
    small = ("--test-points", "20", "--grid", "4", "--picture-samples", "50", "--objective", "fm", "--mle-after",
             "0.5", "--coupling", "independent")
    whole = run(tmp_path / "whole", "--iters", "8", *small)
    assert whole["mle_from"] == 4 and whole["mle_after"] == 0.5
    assert whole["train_loss_kind"] == "flow matching, then negative log-likelihood from iteration 4 (losses[4:])"
    nfe = json.loads((tmp_path / "whole" / "results.json").read_text())["nfe_forward_last"]
    assert nfe > 0  # the last steps solve (maximum likelihood)
    # The share is of the run's --iters: 6 switch at 3. Resumed to 8, the run stays on maximum
    # likelihood from 3 (the checkpoint holds the switch, and Adam's moments since).
    first = run(tmp_path / "split", "--iters", "6", *small)
    again = run(tmp_path / "split", "--iters", "8", "--resume", *small)
    assert first["mle_from"] == 3 == again["mle_from"] and len(again["losses"]) == 8
    assert again["losses"][:6] == first["losses"] and first["losses"][:3] == whole["losses"][:3]
    with pytest.raises(SystemExit):
        toy_density.parse_args(["--mle-after", "0.5"])
    for share in ("0", "1"):
        with pytest.raises(SystemExit):
            toy_density.parse_args(["--objective", "fm", "--mle-after", share])
    err = capsys.readouterr().err
    assert "--mle-after: only with --objective fm" in err and "--mle-after: 1.0 is not in (0, 1)" in err
