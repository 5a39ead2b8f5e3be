"""examples/neutra.py in its quick mode: NeuTra with an FFJORD guide gives HMC a deterministic
potential (exact trace in eval mode), a log-det that matches slogdet of the map's Jacobian, and
finite samples from both samplers; ``--solver-steps`` sets the rk4 steps of training and HMC."""

from __future__ import annotations

import json

import pytest

from pyro_ffjord import FFJORD, runs

import neutra  # examples/ (pytest's pythonpath)


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


@pytest.mark.parametrize("argv, steps", [([], 3), (["--solver-steps", "5"], 5)])
def test_solver_steps_are_the_rk4_steps_of_training_and_of_hmc(argv, steps):
    args = neutra.parse_args(["--quick", "--steps", "1", "--no-progress"] + argv)
    runs.fill_defaults(args, full=neutra.FULL, quick=neutra.QUICK)
    guide, _, _ = neutra.train_guide(neutra.Funnel(args.dim), args)
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
