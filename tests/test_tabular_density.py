"""examples/tabular_density.py: quick runs of each --config on the bundled table, the paper's
configurations as built, early stopping on validation (best parameters tested), the training-time
budget, a missing MAF file through the script's cli, --resume after Ctrl-C equal to an
uninterrupted run (in-process, and a real SIGINT to the script), and a run end to end on a tiny
file in MAF's POWER format."""

import json
import math
import pathlib
import sys

import numpy as np
import pytest
import torch

import tabular_density
import tabular_model
from pyro_ffjord import checkpoints, runs
from pyro_ffjord.datasets import tabular

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tabular_density.py"
KEYS = ("dataset", "config", "flow_options", "params", "iterations", "stopped", "train_seconds",
        "seconds_per_iteration", "eval_nfe", "best_valid_nll", "best_iteration", "test_nll", "test_nll_se",
        "test_points", "paper_test_nll", "paper_config", "valid_history", "losses", "machine", "args")
# Cheap runs for the resume tests: one block of the library defaults (Hutchinson probes: the
# random state must be restored too), validation every 2 iterations, so early stopping's
# bookkeeping and the learning-rate schedule are part of what must continue exactly.
RESUMABLE = ("--config", "default", "--valid-every", "2", "--patience", "3", "--lr", "0.03")


def run(out, *argv):
    args = tabular_density.parse_args(["--out", str(out), "--no-progress", "--threads", "1", "--quick", *argv])
    return tabular_density.main(args)


def assert_same_run(a, b):
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-6)
    assert [h["valid_nll"] for h in b["valid_history"]] == pytest.approx([h["valid_nll"] for h in a["valid_history"]],
                                                                         abs=1e-5)
    assert (b["iterations"], b["best_iteration"], b["stopped"]) == (a["iterations"], a["best_iteration"], a["stopped"])
    assert b["test_nll"] == pytest.approx(a["test_nll"], abs=1e-5)


@pytest.mark.parametrize("config", tabular_model.CONFIGS)
def test_quick_run_of_each_config_writes_results(tmp_path, config):
    res = run(tmp_path, "--config", config, "--iters", "12", "--valid-every", "4")
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in KEYS:
        assert key in saved, key
    assert saved["test_nll"] == res["test_nll"] and math.isfinite(saved["test_nll"]) and saved["test_finite"]
    assert saved["test_nll_se"] > 0 and saved["test_points"] == 50 and saved["data"]["valid_points"] == 50
    assert saved["dataset"] == "breast_cancer" and saved["config"] == config and saved["paper_test_nll"] is None
    assert saved["iterations"] == 12 == len(saved["losses"]) and saved["stopped"] == "iters"
    assert [h["iteration"] for h in saved["valid_history"]] == [4, 8, 12]
    assert saved["best_valid_nll"] == min(h["valid_nll"] for h in saved["valid_history"])
    assert saved["train_seconds"] > 0 and saved["seconds_per_iteration"] > 0 and saved["eval_nfe"] > 0
    options = saved["flow_options"]
    assert options["eval_trace"] == "exact" and options["atol"] == options["rtol"] == 1e-3  # --quick's tolerance
    expected = {"paper": ("hutchinson", "gaussian", "dopri5", [16, 16], "softplus", True, 1.0),
                "default": ("hutchinson", "rademacher", "rk4", [16, 16, 16], "tanh", False, 0.5),
                "fast": ("exact", "rademacher", "rk4", [16, 16, 16], "tanh", False, 0.5)}[config]
    assert (options["trace"], options["noise"], options["solver"], options["hidden_dims"], options["activation"],
            options["adjoint"], options["T"]) == expected
    assert options["num_blocks"] == 1 and saved["batch_size"] == 64 and saved["lr"] == 1e-3
    assert (tmp_path / "nll_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 12 and ck["config"]["config"] == config and "iters" not in ck["config"]


@pytest.mark.parametrize("name", tabular.NAMES)
def test_paper_configurations_as_built(name):
    entry, dim = tabular_density.PAPER[name], tabular.DIMS[name]
    blocks, options = tabular_model.flow_setup("paper", entry, dim)
    flows, density = tabular_model.build_density(dim, blocks, options, torch.device("cpu"))
    got = tabular_model.describe(flows)
    assert got["num_blocks"] == entry["num_blocks"] == len(density.transforms)
    assert got["hidden_dims"] == [entry["hdim_factor"] * dim] * entry["nhidden"]
    assert (got["activation"], got["time_embedding"]) == (entry["nonlinearity"], "concatsquash")
    assert (got["solver"], got["eval_solver"], got["atol"], got["rtol"]) == ("dopri5", "dopri5", 1e-8, 1e-6)
    assert (got["trace"], got["noise"], got["eval_trace"], got["adjoint"]) == ("hutchinson", "gaussian", "exact", True)
    assert got["T"] == 1.0 and got["train_T"] and all(f.log_T.requires_grad for f in flows)
    assert entry["lr"] == 1e-3 and entry["batch_size"] in (1000, 10000)
    # the other configurations: what a user gets without options, and the preset
    assert tabular_model.flow_setup("default", entry, dim) == (1, {})
    assert tabular_model.flow_setup("fast", entry, dim) == (1, {"preset": "fast"})


def test_paper_table_and_its_figures():
    rows = {name: (e["nonlinearity"], e["nhidden"], e["hdim_factor"], e["num_blocks"], e["batch_size"])
            for name, e in tabular_density.PAPER.items()}
    assert rows["miniboone"] == ("softplus", 2, 20, 1, 1000)  # the reference README's command
    assert rows["power"] == ("tanh", 3, 10, 5, 10000) and rows["hepmass"] == ("softplus", 2, 10, 10, 10000)
    assert tabular_density.PAPER_NLL == {"power": -0.46, "gas": -8.59, "hepmass": 15.26, "miniboone": 10.43,
                                         "bsds300": -157.67, "breast_cancer": None}
    args = tabular_density.parse_args(["--dataset", "power"])
    assert (args.batch_size, args.lr, args.valid_every, args.patience, args.iters) == (10000, 1e-3, 200, 30, 100000)
    assert args.out == str(pathlib.Path("out", "tabular", "power-paper"))
    quick = tabular_density.parse_args(["--dataset", "gas", "--config", "fast", "--quick", "--batch-size", "7"])
    assert quick.out.endswith("gas-fast-quick") and quick.batch_size == 7 and quick.width == 16


def test_early_stopping_tests_the_best_model_on_validation(tmp_path):
    res = run(tmp_path, *RESUMABLE, "--iters", "200", "--valid-every", "1")
    assert res["stopped"] == "patience" and res["iterations"] < 200 and len(res["losses"]) == res["iterations"]
    history = [h["valid_nll"] for h in res["valid_history"]]
    best = int(np.argmin(history))
    # stopped at the fourth validation in a row without gain (patience 3), best kept
    assert len(history) == best + 5 and res["best_iteration"] == best + 1 and res["best_valid_nll"] == history[best]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["decays"] == 2 and ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.03 / 100)
    # the reported test NLL is the best parameters', not the last ones'
    args = tabular_density.parse_args(["--quick", *RESUMABLE])
    blocks, options = tabular_model.flow_setup("default", {}, 30, width=args.width, tol=args.tol, quick=True)
    flows, density = tabular_model.build_density(30, blocks, options, torch.device("cpu"))
    test = tabular.load("breast_cancer").test[:50]
    flows.load_state_dict(ck["best_model"])
    assert tabular_model.score(flows, density, test, 1000)["nll"] == pytest.approx(res["test_nll"], abs=1e-6)
    flows.load_state_dict(ck["model"])
    assert tabular_model.score(flows, density, test, 1000)["nll"] != pytest.approx(res["test_nll"], abs=1e-6)
    again = run(tmp_path, *RESUMABLE, "--iters", "300", "--valid-every", "1", "--resume")  # a stopped run stays stopped
    assert again["iterations"] == res["iterations"] and again["test_nll"] == res["test_nll"]


def test_max_minutes_stops_training_cleanly(tmp_path, monkeypatch):
    now = [0.0]

    def clock():  # every look at the training clock "takes" one second
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(checkpoints, "clock", clock)
    res = run(tmp_path, "--config", "default", "--max-minutes", "0.2")
    assert res["stopped"] == "max_minutes" and 0 < res["iterations"] < 30
    assert 12.0 <= res["train_seconds"] < 30.0 and math.isfinite(res["test_nll"])
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == res["iterations"]


def test_missing_maf_file_or_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "COMMAND", None)  # runs.cli records the command line

    def cli(*argv):
        out = tmp_path / "out"
        with pytest.raises(SystemExit) as exit:
            runs.cli(tabular_density.main, lambda: tabular_density.parse_args(
                ["--quick", "--no-progress", "--out", str(out), *argv]))
        assert not out.exists()  # refused before anything is written
        return exit.value.code

    message = cli("--dataset", "power", "--data-dir", str(tmp_path))
    assert isinstance(message, str) and message.startswith("error: ")  # a message: exit status 1
    assert "data file data.npy" in message and str(tmp_path) in message and tabular.ZENODO in message
    message = cli("--dataset", "miniboone")
    assert message.startswith("error: --dataset miniboone") and "--data-dir" in message and tabular.ZENODO in message


def test_ctrl_c_then_resume_finishes_like_an_uninterrupted_run(tmp_path, ctrl_c_then_resume):
    common = (*RESUMABLE, "--iters", "16", "--checkpoint-every", "0")
    # Ctrl-C during the second validation (iteration 4)
    whole, resumed = ctrl_c_then_resume(run, tmp_path, common, tabular_model, at=4)
    assert_same_run(whole, resumed)
    assert [(s["start"], s["end"]) for s in resumed["segments"]] == [(0, 4), (4, 16)]
    with pytest.raises(runs.RunError, match=r"--lr 0.03 -> 0.1"):  # a resumed run is the same run
        run(tmp_path / "split", *common, "--resume", "--lr", "0.1")


def test_sigint_to_the_script_then_resume_equals_an_uninterrupted_run(tmp_path, sigint_then_resume):
    """The real thing: Ctrl-C (SIGINT) to ``python examples/tabular_density.py`` while it trains,
    then ``--resume`` to the end."""
    common = (*RESUMABLE, "--iters", "60")
    out = tmp_path / "split"
    argv = [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--threads", "1", "--checkpoint-every", "1",
            "--out", str(out), *common]
    resumed = sigint_then_resume(argv, out, lambda: run(out, *common, "--resume"), iters=60)
    whole = run(tmp_path / "whole", *common)
    assert_same_run(whole, resumed)


def power_file(folder: pathlib.Path, rows: int = 200) -> None:
    """``data.npy`` in MAF's POWER format: 8 raw float columns (MAF drops two, adds noise)."""
    folder.mkdir(parents=True)
    raw = np.random.default_rng(0).normal(size=(rows, 8)) * [1, 1, 5, 1, 3, 3, 3, 1] + [2, 0, 240, 0, 1, 1, 6, 0]
    np.save(folder / "data.npy", raw)


def test_tiny_power_file_end_to_end_through_data_dir(tmp_path):
    power_file(tmp_path / "data" / "power")
    res = run(tmp_path / "out", "--dataset", "power", "--data-dir", str(tmp_path / "data"), "--config", "paper")
    assert res["dataset"] == "power" and res["dim"] == 6 and res["data"]["sizes"] == [162, 18, 20]
    assert res["test_points"] == 20 and res["data"]["valid_points"] == 18 and math.isfinite(res["test_nll"])
    assert res["paper_test_nll"] == -0.46 and res["paper_config"]["num_blocks"] == 5
    options = res["flow_options"]  # POWER's row: 5 tanh blocks of 3 layers (--quick: 2 blocks, 16 wide)
    assert options["num_blocks"] == 2 and options["hidden_dims"] == [16, 16, 16] and options["activation"] == "tanh"
    assert res["batch_size"] == 64 and len(res["losses"]) == 30
    # the data set's own folder works as --data-dir too, and gives the same run
    again = run(tmp_path / "again", "--dataset", "power", "--data-dir", str(tmp_path / "data" / "power"))
    assert again["test_nll"] == res["test_nll"]


@pytest.mark.parametrize("config", tabular_model.CONFIGS)
def test_flow_matching_objective_on_the_one_block_default(tmp_path, config):
    res = run(tmp_path, "--config", config, "--objective", "fm", "--iters", "8", "--valid-every", "4")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (saved["objective"], saved["coupling"], saved["sigma_min"]) == ("fm", "ot", 1e-4)
    assert saved["train_loss_kind"] == "flow matching" and len(saved["losses"]) == 8
    assert saved["flow_options"]["num_blocks"] == 1 and saved["flow_options"]["eval_trace"] == "exact"
    assert math.isfinite(saved["test_nll"]) and saved["test_finite"] and saved["test_nll"] == res["test_nll"]
    assert [h["iteration"] for h in saved["valid_history"]] == [4, 8]
    assert (tmp_path / "nll_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flow_matching_refuses_a_stack_of_blocks(tmp_path, capsys):
    for argv in (("--dataset", "power", "--config", "paper"), ("--num-blocks", "2")):
        with pytest.raises(SystemExit) as exit:
            tabular_density.parse_args(["--quick", "--objective", "fm", *argv])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert "--objective fm trains a single FFJORD block" in err
        assert "use --num-blocks 1 or --objective mle" in err
    args = tabular_density.parse_args(["--dataset", "hepmass", "--objective", "fm", "--num-blocks", "1"])
    assert (args.objective, args.coupling, args.num_blocks) == ("fm", "ot", 1)
    assert tabular_density.parse_args(["--dataset", "hepmass"]).objective == "mle"  # a stack by likelihood


def test_resume_refuses_another_objective(tmp_path):
    common = (*RESUMABLE, "--valid-every", "2")
    run(tmp_path / "mle", *common, "--iters", "2")
    with pytest.raises(runs.RunError, match=r"--objective \(unset\) -> fm"):
        run(tmp_path / "mle", *common, "--iters", "4", "--resume", "--objective", "fm")
    run(tmp_path / "fm", *common, "--iters", "2", "--objective", "fm")
    with pytest.raises(runs.RunError, match=r"--objective fm -> \(unset\)"):
        run(tmp_path / "fm", *common, "--iters", "4", "--resume")
    with pytest.raises(runs.RunError, match=r"--sigma-min 0.0001 -> 0.01"):
        run(tmp_path / "fm", *common, "--iters", "4", "--resume", "--objective", "fm", "--sigma-min", "0.01")
    res = run(tmp_path / "fm", *common, "--iters", "4", "--resume", "--objective", "fm")
    assert res["resumed_from"] == 2 and res["iterations"] == 4 and res["objective"] == "fm"


def test_mixed_schedule_switches_by_time_and_clears_adams_moments(tmp_path):
    import density_common

    class Clock:
        seconds = 0.0

        def elapsed(self):
            return self.seconds

    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.Adam([param])
    param.grad = torch.ones(2)
    optimizer.step()
    args = tabular_density.parse_args(["--objective", "fm", "--mle-after", "0.25", "--iters", "1000",
                                       "--max-minutes", "2"])
    state, clock = density_common.new_state([]), Clock()
    assert density_common.objective_now(args, state, clock, optimizer) == "fm" and optimizer.state
    clock.seconds = 29.9
    assert density_common.objective_now(args, state, clock, optimizer) == "fm"
    clock.seconds, state["iteration"] = 30.0, 7  # a quarter of 2 minutes, long before a quarter of 1000
    assert density_common.objective_now(args, state, clock, optimizer) == "mle"
    assert state["mle_from"] == 7 and not optimizer.state  # Adam starts afresh on the likelihood
    clock.seconds = 0.0  # once switched, it stays (e.g. a resumed run, whose clock restarts)
    assert density_common.objective_now(args, state, clock, optimizer) == "mle"
    res = run(tmp_path, "--config", "default", "--objective", "fm", "--mle-after", "0.5", "--iters", "6",
              "--valid-every", "3")
    assert res["mle_from"] == 3 and res["objective"] == "fm" and len(res["losses"]) == 6
    assert math.isfinite(res["test_nll"])
