"""pyro_ffjord.runs, the bookkeeping every example and benchmark shares: options, their checks
and quick/full defaults, results JSON, checkpoints that resume with the same random state, and a
training loop's checkpoints (by iterations, by minutes, on Ctrl-C) and segments."""

import argparse
import json
import signal

import numpy as np
import pytest
import torch

from pyro_ffjord import checkpoints, runs


def parser_for(resume=False, **kwargs):
    parser = runs.add_run_args(argparse.ArgumentParser(), out="out/x", resume=resume, **kwargs)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    return parser


def parse(argv, resume=False, **kwargs):
    return runs.parse(parser_for(resume, **kwargs), argv)


def test_run_args_and_defaults():
    args = parse([])
    assert (args.device, args.seed, args.out, args.threads, args.quick, args.no_progress) == (
        "cpu", 0, "out/x", 1, False, False)
    assert not hasattr(args, "resume") and parse([], resume=True).resume is False
    runs.fill_defaults(args, full={"iters": 3000, "lr": 1e-3}, quick={"iters": 20})
    assert (args.iters, args.lr) == (3000, 1e-3)
    quick = parse(["--quick"])
    runs.fill_defaults(quick, full={"iters": 3000, "lr": 1e-3}, quick={"iters": 20})
    assert (quick.iters, quick.lr) == (20, 1e-3)  # no quick value for lr: the full one
    given = parse(["--quick", "--iters", "7"])
    runs.fill_defaults(given, full={"iters": 3000}, quick={"iters": 20})
    assert given.iters == 7  # the command line wins


def test_start_sets_threads_and_creates_the_output_folder(tmp_path):
    threads = torch.get_num_threads()
    try:
        args = parse(["--out", str(tmp_path / "a" / "b"), "--threads", "1"])
        assert runs.start(args) == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
        assert torch.get_num_threads() == 1
        args = parse(["--out", str(tmp_path)], threads=None)  # None: all the free cores
        runs.start(args)
        assert args.threads == runs.free_cores() >= 1
    finally:
        torch.set_num_threads(threads)


def test_results_say_where_and_when(tmp_path):
    args = parse(["--out", str(tmp_path), "--no-progress", "--seed", "3"])
    written = runs.write_results(args, "demo", {"test_nll": 1.5})
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved == json.loads(json.dumps(written))
    assert saved["example"] == "demo" and saved["test_nll"] == 1.5 and saved["args"]["seed"] == 3
    for key in ("date", "torch", "pyro", "python", "processor", "cores", "threads", "device", "revision",
                "revision_modified"):
        assert key in saved["machine"], key
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, then renamed


def test_checkpoint_resumes_the_random_streams(tmp_path):
    path = tmp_path / "checkpoint.pt"
    rng = np.random.default_rng(0)
    torch.manual_seed(1)
    runs.save_checkpoint(path, {"iteration": 4, "model": {"w": torch.ones(2)}}, numpy_rng=rng)
    expected = torch.rand(3), rng.random(3)
    torch.manual_seed(99)
    other = np.random.default_rng(99)
    state = runs.load_checkpoint(path, numpy_rng=other)
    assert state["iteration"] == 4 and torch.equal(state["model"]["w"], torch.ones(2))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(other.random(3), expected[1])


def test_missing_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*without --resume"):
        runs.load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_foreign_checkpoint_is_refused_clearly(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "torch_rng": torch.get_rng_state()}, path)  # an older format
    with pytest.raises(ValueError, match="holds no random state.*without --resume"):
        runs.load_checkpoint(path)


def test_checkpoints_hold_no_code(tmp_path):
    # weights_only loading: a checkpoint holding an arbitrary object is refused.
    path = tmp_path / "checkpoint.pt"
    torch.save({"rng": {"torch": torch.get_rng_state()}, "bad": argparse.Namespace(a=1)}, path)
    with pytest.raises(Exception, match="[Ww]eights only"):
        runs.load_checkpoint(path)


# -- option values and devices ----------------------------------------------------------------
@pytest.mark.parametrize("name, good, bad", [
    ("positive_int", {"1": 1, "250": 250}, ["0", "-3", "1.5", "x", ""]),
    ("nonnegative_int", {"0": 0, "7": 7}, ["-1", "2.0", "nan"]),
    ("positive_float", {"0.5": 0.5, "1e-3": 1e-3}, ["0", "-1e-3", "nan", "inf", "x"]),
    ("nonnegative_float", {"0": 0.0, "2": 2.0}, ["-0.1", "nan", "-inf"]),
    ("unit_interval", {"0.8": 0.8}, ["0", "1", "1.5", "nan"]),
    ("int_at_least", {"2": 2}, ["1", "0"]),
])
def test_option_value_checks(name, good, bad):
    check = runs.int_at_least(2) if name == "int_at_least" else getattr(runs, name)
    for text, value in good.items():
        assert check(text) == value and type(check(text)) is type(value)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
            check(text)


def test_a_bad_value_is_a_usage_error(capsys):
    parser = parser_for()
    parser.add_argument("--steps", type=runs.positive_int)
    with pytest.raises(SystemExit) as exit:
        runs.parse(parser, ["--steps", "0"])
    assert exit.value.code == 2 and "argument --steps: '0' is not a positive integer" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_device_is_refused_before_any_folder(tmp_path, capsys):
    for device, says in (("cuda", "CUDA is not available"), ("cuda:3", "CUDA is not available"),
                         ("tpu9", "not a torch device")):
        assert says in runs.device_problem(device)
        with pytest.raises(SystemExit) as exit:  # at parse time: argparse's error, exit code 2
            parse(["--device", device, "--out", str(tmp_path / "a")])
        assert exit.value.code == 2 and "argument --device: " in capsys.readouterr().err
    args = argparse.Namespace(device="cuda", threads=1, out=str(tmp_path / "b"))  # built without parse()
    with pytest.raises(SystemExit, match="argument --device: cuda: CUDA is not available"):
        runs.start(args)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert runs.device_problem("cpu") is None and runs.device_option("cpu") == "cpu"


def test_quick_runs_keep_their_own_folder():
    assert parse(["--quick"]).out == "out/x-quick"
    assert parse([]).out == "out/x"
    assert parse(["--quick", "--out", "mine"]).out == "mine"  # an explicit --out wins
    assert parse(["--quick", "--out=mine"]).out == "mine"


def test_threads_default_and_help():
    assert parse([]).threads == 1 and parse([], threads=None).threads is None
    assert parse(["--threads", "2"]).threads == 2
    text = " ".join(parser_for(threads=1, threads_note="tiny nets").format_help().split())
    assert "torch threads (default 1: tiny nets)" in text
    assert "default all the free cores" in " ".join(parser_for(threads=None).format_help().split())


# -- training loops: configuration, checkpoints by minutes and on Ctrl-C, segments -----------------
def training(tmp_path, argv=(), free=("iters",)):
    args = parse(["--out", str(tmp_path), "--resume" if "--resume" in argv else "--no-progress",
                  *[a for a in argv if a != "--resume"]], resume=True)
    return runs.Training(args, tmp_path / "checkpoint.pt", runs.run_config(args, free=free))


def test_run_config_is_what_defines_the_run(tmp_path):
    args = parse(["--lr", "0.1", "--iters", "5", "--threads", "2", "--out", str(tmp_path)], resume=True)
    config = runs.run_config(args, free=("iters",))
    assert config == {"seed": 0, "quick": False, "lr": 0.1}  # not the budget, place, threads, device
    assert runs.config_differences(config, dict(config, lr=0.5, seed=1)) == ["--lr 0.1 -> 0.5", "--seed 0 -> 1"]


def test_resume_refuses_other_options_and_names_them(tmp_path):
    first = training(tmp_path, ["--lr", "0.001"])
    with first.loop(0):
        first.step(3, lambda: {"iteration": 3}, due=True)
    with pytest.raises(runs.RunError, match=r"--lr 0\.001 -> 0\.5; --seed 0 -> 4.*without --resume"):
        training(tmp_path, ["--resume", "--lr", "0.5", "--seed", "4"]).resume()
    again = training(tmp_path, ["--resume", "--lr", "0.001", "--iters", "10"])  # a longer budget is fine
    assert again.resume()["iteration"] == 3 and again.resumed
    assert training(tmp_path / "fresh").resume() is None  # no --resume: a fresh run
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        training(tmp_path / "none", ["--resume"]).resume()
    assert training(tmp_path / "none", ["--resume"]).resume(missing_ok=True) is None


def test_checkpoints_by_elapsed_minutes(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(checkpoints, "clock", lambda: now[0])
    written = []
    monkeypatch.setattr(checkpoints, "save_checkpoint", lambda path, state, *a, **k: written.append(state["at"]))
    t = training(tmp_path, ["--checkpoint-minutes", "1"])
    with t.loop(0):
        for done in range(1, 11):
            now[0] += 25.0  # 25 s per iteration: a checkpoint every third one
            t.step(done, lambda: {"at": done})
    assert written == [3, 6, 9]
    assert t.summary()["train_seconds"] == pytest.approx(250.0)


def test_ctrl_c_writes_a_checkpoint_and_exits_130(tmp_path, capsys, ctrl_c_must_be_handled):
    t = training(tmp_path)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit:
        with t.loop(0):
            for done in range(1, 100):
                if done == 4:
                    signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of iteration 4
                t.step(done, lambda: {"iteration": done})
    assert isinstance(exit.value, runs.Interrupted) and exit.value.code == 130
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["iteration"] == 4  # finished, then saved
    err = capsys.readouterr().err
    assert "checkpoint at iteration 4 written" in err and "--resume" in err
    assert signal.getsignal(signal.SIGINT) is previous  # the handler is put back


def test_segments_say_what_was_resumed(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(checkpoints, "clock", lambda: now[0])
    first = training(tmp_path)
    with first.loop(0):
        now[0] += 30.0
        first.step(5, lambda: {}, due=True)
        now[0] += 7.0  # trained after the checkpoint, then lost (the process died)
    assert first.summary() == {"resumed": False, "train_seconds": 37.0,
                               "segments": [{"start": 0, "end": 5, "train_seconds": 37.0, "resumed": False}]}
    second = training(tmp_path, ["--resume"])
    second.resume()
    with second.loop(5):
        now[0] += 12.0
        with second.paused():  # validation: not training time
            now[0] += 100.0
        second.step(9, lambda: {}, due=True)
    summary = second.summary()
    assert summary["resumed"] and summary["train_seconds"] == 42.0
    assert [(s["start"], s["end"], s["train_seconds"], s["resumed"]) for s in summary["segments"]] == [
        (0, 5, 30.0, False), (5, 9, 12.0, True)]
    assert second.describe() == "42 s (resumed: 30 + 12 s)" and first.describe() == "37 s"
