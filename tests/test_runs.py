"""pyro_ffjord.runs, the bookkeeping every example and benchmark shares: options and their
quick/full defaults, results JSON, and checkpoints that resume with the same random state."""

import argparse
import json

import numpy as np
import pytest
import torch

from pyro_ffjord import runs


def parse(argv, resume=False):
    parser = runs.add_run_args(argparse.ArgumentParser(), out="out/x", resume=resume)
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    return parser.parse_args(argv)


def test_run_args_and_defaults():
    args = parse([])
    assert (args.device, args.seed, args.out, args.threads, args.quick, args.no_progress) == (
        "cpu", 0, "out/x", None, False, False)
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
        args = parse(["--out", str(tmp_path)])
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
    for key in ("date", "torch", "pyro", "python", "processor", "cores", "threads", "device", "revision"):
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
