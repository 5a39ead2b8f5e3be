"""examples/neutra.py in its quick mode: NeuTra with an FFJORD guide gives HMC a deterministic
potential (exact trace in eval mode), a log-det that matches slogdet of the map's Jacobian, and
finite samples from both samplers; ``--solver-steps`` sets the rk4 steps of training and HMC;
Ctrl-C in the guide's training or in MCMC, then --resume (which skips what was trained) ends
where an uninterrupted run ends, and refuses other options."""

from __future__ import annotations

import json
import shutil
import signal

import pyro
import pytest
import torch

from pyro_ffjord import FFJORD, runs

import neutra  # examples/ (pytest's pythonpath)

# 6 guide steps on a 3-D funnel, 10 NUTS samples after 10 warm-up: about 3 seconds a run
TINY = ["--quick", "--no-progress", "--steps", "6", "--particles", "4", "--num-samples", "10", "--warmup", "10",
        "--hidden-dims", "16", "--dim", "3"]
TIMES = ("sample_seconds", "total_seconds", "ess_v_per_s", "ess_x1_per_s", "ess_v_per_total_s", "ess_x1_per_total_s",
         "guide_seconds")


def test_quick_run(tmp_path):
    payload = neutra.main(neutra.parse_args(["--quick", "--no-progress", "--out", str(tmp_path)]))
    saved = json.loads((tmp_path / "neutra.json").read_text())
    assert (tmp_path / "neutra.png").stat().st_size > 0
    assert saved["results"] == payload["results"] and saved["args"]["guide_steps"] == 40
    checks = saved["checks"]
    # HMC's potential and its gradient must not change between calls at the same point.
    assert checks["deterministic"], checks
    # The exact trace integrated by the solver vs the autograd Jacobian of the computed map
    # (float32 solve at the example's tolerances; measured ~1e-6).
    assert checks["logdet_gap_max"] < 1e-3, checks
    methods = [r["method"] for r in payload["results"]]
    assert methods == ["NUTS", "NeuTra NUTS (FFJORD)"]
    assert all(r["finite"] and r["potential_evals"] > 0 for r in payload["results"])
    assert payload["results"][1]["ffjord_solves"] > 0
    assert saved["resumed"] is False and [(g["start"], g["end"]) for g in saved["segments"]] == [(0, 40)]
    assert saved["guide"]["seconds"] == saved["train_seconds"] > 0
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # the trained guide
    assert ck["step"] == 40 and len(ck["losses"]) == 40 and ck["config"]["lr"] == 3e-3


@pytest.mark.parametrize("argv, steps", [([], 3), (["--solver-steps", "5"], 5)])
def test_solver_steps_are_the_rk4_steps_of_training_and_of_hmc(argv, steps, tmp_path):
    args = neutra.parse_args(["--quick", "--steps", "1", "--no-progress"] + argv)
    runs.fill_defaults(args, full=neutra.FULL, quick=neutra.QUICK)
    training = runs.Training(args, tmp_path / "checkpoint.pt", runs.run_config(args))
    guide, _ = neutra.train_guide(neutra.Funnel(args.dim), args, training)
    guide()  # sets the guide up: one training-mode solve
    (flow,) = [m for m in guide.modules() if isinstance(m, FFJORD)]
    assert flow.config.eval_solver == "rk4" and flow.nfe_forward == 4 * steps  # 4 evaluations per rk4 step
    guide.eval()
    guide.get_posterior().sample((3,))
    assert flow.nfe_forward == 4 * steps  # HMC's map: the same fixed steps


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--dim", "1"], ["--lr", "0"], ["--particles", "0"],
                                  ["--end-time", "0"], ["--solver-steps", "0"], ["--num-samples", "0"],
                                  ["--target-accept", "1.5"], ["--warmup", "-1"], ["--hidden-dims", "0"]])
def test_bad_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exit:
        neutra.parse_args(argv)
    assert exit.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_a_device_other_than_the_cpu_is_refused_when_parsing(capsys):
    with pytest.raises(SystemExit) as exit:  # cpu only; a missing GPU is refused the same way
        neutra.parse_args(["--device", "cuda"])
    assert exit.value.code == 2 and "argument --device" in capsys.readouterr().err


def test_defaults_one_thread_and_a_quick_folder():
    assert neutra.parse_args([]).threads == 1
    assert neutra.parse_args(["--quick"]).out == "out/neutra-quick"
    assert neutra.parse_args(["--quick", "--out", "x"]).out == "x"


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted TINY run: its results, and its folder (the finished guide's checkpoint)."""
    out = tmp_path_factory.mktemp("whole")
    return neutra.main(neutra.parse_args(TINY + ["--out", str(out)])), out


def count_svi_steps(monkeypatch, interrupt_at: int = 0) -> list:
    """Count the guide's SVI steps; Ctrl-C (a real SIGINT) during step ``interrupt_at``."""
    step, calls = pyro.infer.SVI.step, []

    def counting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            signal.raise_signal(signal.SIGINT)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(pyro.infer.SVI, "step", counting)
    return calls

def same_results(resumed: dict, whole: dict) -> None:
    assert resumed["guide"]["elbo"] == whole["guide"]["elbo"]
    assert resumed["guide"]["loss_last100"] == whole["guide"]["loss_last100"]
    assert resumed["checks"]["logdet_gap_max"] == whole["checks"]["logdet_gap_max"]
    for a, b in zip(whole["results"], resumed["results"], strict=True):  # the same chains
        assert {k: v for k, v in b.items() if k not in TIMES} == {k: v for k, v in a.items() if k not in TIMES}


def test_ctrl_c_in_guide_training_then_resume_trains_the_rest_only(whole, tmp_path, monkeypatch, capsys,
                                                                   ctrl_c_must_be_handled, picture_titles):
    whole, _ = whole
    count_svi_steps(monkeypatch, interrupt_at=4)
    with pytest.raises(SystemExit) as exit:
        neutra.main(neutra.parse_args(TINY + ["--out", str(tmp_path)]))
    assert exit.value.code == 130
    err = capsys.readouterr().err
    assert "checkpoint at guide step 4 written" in err and "--resume" in err
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4 and len(ck["losses"]) == 4 and not (tmp_path / "neutra.json").exists()
    monkeypatch.undo()

    calls, titles = count_svi_steps(monkeypatch), picture_titles()
    resumed = neutra.main(neutra.parse_args(TINY + ["--out", str(tmp_path), "--resume"]))
    assert len(calls) == 2  # steps 5 and 6 only
    same_results(resumed, whole)
    assert resumed["resumed"] and not whole["resumed"]
    (title,) = titles
    assert title.startswith("guide: 6 SVI steps, trained in ") and "(resumed: " in title
    assert [(g["start"], g["end"], g["resumed"]) for g in resumed["segments"]] == [(0, 4, False), (4, 6, True)]
    assert resumed["resumed_from"] == 4 and whole["resumed_from"] is None
    assert resumed["train_seconds"] == pytest.approx(sum(g["train_seconds"] for g in resumed["segments"]))


def test_ctrl_c_in_mcmc_keeps_the_trained_guide_and_resume_skips_its_training(whole, tmp_path, monkeypatch,
                                                                              capsys):
    whole, _ = whole
    run_nuts = neutra.run_nuts

    def interrupted(*args, **kwargs):  # what Ctrl-C raises inside NUTS (no training loop there)
        raise KeyboardInterrupt

    monkeypatch.setattr(neutra, "run_nuts", interrupted)
    try:
        with pytest.raises(SystemExit) as exit:
            neutra.main(neutra.parse_args(TINY + ["--out", str(tmp_path)]))
    except KeyboardInterrupt:  # (uncaught, it would also end the pytest session)
        pytest.fail("Ctrl-C in MCMC ended in a KeyboardInterrupt (a traceback), not in exit code 130")
    assert exit.value.code == 130
    err = capsys.readouterr().err
    assert "cannot be resumed mid-chain" in err and "--resume" in err and "skips the guide's training" in err
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 6  # the trained guide
    monkeypatch.setattr(neutra, "run_nuts", run_nuts)
    calls = count_svi_steps(monkeypatch)
    resumed = neutra.main(neutra.parse_args(TINY + ["--out", str(tmp_path), "--resume"]))
    assert calls == []  # no guide training: the checkpoint's guide, sampled from the start
    same_results(resumed, whole)
    assert resumed["resumed"] and [(g["start"], g["end"]) for g in resumed["segments"]] == [(0, 6)]


def test_resume_refuses_other_options_but_nuts_options(whole, tmp_path):
    whole, folder = whole
    shutil.copytree(folder, tmp_path, dirs_exist_ok=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        neutra.main(neutra.parse_args(TINY + ["--out", str(tmp_path / "none"), "--resume"]))
    for more, says in ((["--lr", "0.5"], "--lr 0.003 -> 0.5"), (["--seed", "3"], "--seed 0 -> 3"),
                       (["--steps", "7"], "--guide-steps 6 -> 7")):
        with pytest.raises(runs.RunError, match=f"written with other options \\({says}\\).*without --resume"):
            neutra.main(neutra.parse_args(TINY + ["--out", str(tmp_path), "--resume"] + more))
    # NUTS always runs from the start: its options may change (the guide is the checkpoint's)
    more = neutra.main(neutra.parse_args(TINY + ["--out", str(tmp_path), "--resume", "--num-samples", "12"]))
    assert [r["num_samples"] for r in more["results"]] == [12, 12]
    assert more["guide"]["elbo"] == whole["guide"]["elbo"]
