"""Checkpoints and the checkpoint schedule of a training loop, for the examples and the
benchmarks (through :mod:`pyro_ffjord.runs`, which re-exports everything here).

A checkpoint is written atomically and holds the random state it was written with
(:func:`save_checkpoint`, :func:`load_checkpoint`), so a resumed run continues as if it had
never stopped; :class:`Training` writes one every N iterations, every few minutes and on
Ctrl-C, records the options that define the run (:func:`run_config`: ``--resume`` refuses a
checkpoint written with others) and the training time of each segment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import pyro
import torch

PathLike = Union[str, "os.PathLike[str]"]
COMMAND: Optional[List[str]] = None  # the command line of a script run through runs.cli()


class RunError(ValueError):
    """A run cannot go on as asked (e.g. ``--resume`` with other options); :func:`cli` prints
    the message, which says what to do, instead of a traceback."""


class MissingCheckpoint(RunError, FileNotFoundError):
    """``--resume`` found no checkpoint."""


def atomic_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: an interrupted write never leaves a
    truncated file behind."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state(device: Union[str, torch.device] = "cpu", numpy_rng: np.random.Generator = None) -> Dict:
    """The torch (and CUDA, and a numpy generator's) random state, weights_only-safe."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    if numpy_rng is not None:
        state["numpy"] = numpy_rng.bit_generator.state  # a dict of str and int
    return state


def set_rng_state(state: Mapping[str, Any], device: Union[str, torch.device] = "cpu",
                  numpy_rng: np.random.Generator = None) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))
    if numpy_rng is not None:
        numpy_rng.bit_generator.state = state["numpy"]


def save_checkpoint(path: PathLike, state: Mapping[str, Any], device: Union[str, torch.device] = "cpu",
                    numpy_rng: np.random.Generator = None) -> None:
    """Write ``state`` (state dicts and plain values) and the random state, atomically."""
    atomic_save({**state, "rng": rng_state(device, numpy_rng)}, path)


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu",
                    numpy_rng: np.random.Generator = None) -> Dict[str, Any]:
    """Read a checkpoint of :func:`save_checkpoint` (``weights_only``: nothing in it runs) and
    restore its random state, so the run continues as if it had never stopped."""
    if not os.path.exists(path):
        raise MissingCheckpoint(f"--resume: no checkpoint at {path}; run once without --resume first "
                                "(a --quick run keeps its own folder, <out>-quick)")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or "rng" not in state:
        raise RunError(f"{path} was not written by this version's save_checkpoint (it holds no random "
                       "state to resume from); start again without --resume")
    set_rng_state(state["rng"], device, numpy_rng)
    return state


# -- training loops: checkpoints by iterations, by minutes and on Ctrl-C; segments ----------
#: Options that say where and how a run executes, not what it computes: never part of
#: :func:`run_config`, so ``--resume`` may change them.
NOT_CONFIG = frozenset({"out", "threads", "no_progress", "resume", "device", "checkpoint_every",
                        "checkpoint_minutes", "dist_timeout"})


def run_config(args: argparse.Namespace, free: Sequence[str] = ()) -> Dict[str, Any]:
    """The options that define a run (data, model, optimizer, seed, ...), as plain values: a
    checkpoint records them and ``--resume`` refuses one written with others. Left out:
    :data:`NOT_CONFIG` and ``free``, the options a resumed run may change (its budget, e.g.
    ``iters``, and evaluation-only sizes)."""
    skip = NOT_CONFIG | set(free)
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in skip}, default=str))


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> List[str]:
    """``--option checkpoint-value -> value-now`` for every option that differs."""
    missing = "(unset)"
    return [f"--{k.replace('_', '-')} {saved.get(k, missing)} -> {now.get(k, missing)}"
            for k in sorted({*saved, *now}) if saved.get(k, missing) != now.get(k, missing)]


def clock() -> float:
    """The training clock (seconds; a function so that tests can move time on)."""
    return time.perf_counter()


class Interrupted(SystemExit):
    """Ctrl-C in a :class:`Training` loop, after its checkpoint was written: exit code 130."""

    def __init__(self) -> None:
        super().__init__(130)


class Training:
    """The checkpoints and the clock of one training loop.

    A checkpoint at ``path`` holds what the script passes (model, optimizer, counters) and adds
    the random state, the run's options (``config``, from :func:`run_config`) and its
    *segments*: one per run of the script -- the fresh start and every ``--resume`` -- with the
    positions (iterations or steps) it trained from and to and its training seconds.

    Inside ``with training.loop(position):`` the script calls :meth:`step` after each unit of
    work (a safe point). It writes a checkpoint when the script says one is due (every N
    iterations), when ``--checkpoint-minutes`` of training passed since the last one, and on
    Ctrl-C -- then prints how to continue and exits with code 130 (a second Ctrl-C quits at
    once, without saving). Writing checkpoints and code under :meth:`paused` (validation) is
    not training time.
    """

    def __init__(self, args: argparse.Namespace, path: PathLike, config: Mapping[str, Any],
                 unit: str = "iteration", numpy_rng: np.random.Generator = None) -> None:
        self.args, self.path, self.config, self.unit = args, Path(path), dict(config), unit
        self.device, self.numpy_rng = getattr(args, "device", "cpu"), numpy_rng
        self.minutes = float(getattr(args, "checkpoint_minutes", 0.0) or 0.0)
        self.resumed, self.stop_requested = False, False
        self.segments: List[Dict[str, Any]] = []
        self._t0: Optional[float] = None  # when the clock of the current segment last started
        self._saved_at = clock()

    def resume(self, missing_ok: bool = False) -> Optional[Dict[str, Any]]:
        """Under ``--resume``: the checkpoint's contents (random state restored), after checking
        that it was written with this run's options; ``None`` for a fresh run (and, with
        ``missing_ok``, when there is no checkpoint yet)."""
        if not getattr(self.args, "resume", False) or (missing_ok and not self.path.exists()):
            return None
        state = load_checkpoint(self.path, self.device, self.numpy_rng)
        if "config" not in state:
            raise RunError(f"{self.path} records no run options (an older version wrote it): start afresh without "
                           "--resume, or with another --out")
        diff = config_differences(state["config"], self.config)
        if diff:
            raise RunError(f"--resume: {self.path} was written with other options ({'; '.join(diff)}). A resumed "
                           "run must be the same run: repeat the checkpoint's options, or start afresh without "
                           "--resume (or with another --out)")
        self.resumed = True
        self.segments = [dict(s) for s in state.get("segments", [])]
        return state

    @contextlib.contextmanager
    def loop(self, position: int) -> Iterator["Training"]:
        """A training segment from ``position``: its clock runs and Ctrl-C waits for :meth:`step`."""
        self.segments.append({"start": position, "end": position, "train_seconds": 0.0, "resumed": self.resumed})
        self._saved_at = clock()
        installed = threading.current_thread() is threading.main_thread()  # signals reach it only
        if installed:
            previous = signal.signal(signal.SIGINT, self._on_interrupt)
        self._t0 = clock()
        try:
            yield self
        finally:
            self.pause()
            if installed:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def _on_interrupt(self, signum, frame) -> None:
        if self.stop_requested:  # the second Ctrl-C: out now
            raise KeyboardInterrupt
        self.stop_requested = True
        print(f"\nCtrl-C: stopping after this {self.unit} to write a checkpoint (Ctrl-C again: quit without "
              "saving)", file=sys.stderr, flush=True)

    def pause(self) -> None:
        """Stop the clock (add the time since it started to the current segment)."""
        if self._t0 is not None:
            self.segments[-1]["train_seconds"] += clock() - self._t0
            self._t0 = None

    def unpause(self) -> None:
        if self._t0 is None and self.segments:
            self._t0 = clock()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Code that is not training (validation), off the clock."""
        running = self._t0 is not None
        self.pause()
        try:
            yield
        finally:
            if running:
                self.unpause()

    def elapsed(self) -> float:
        """Training seconds of all segments so far (the current one up to now)."""
        running = 0.0 if self._t0 is None else clock() - self._t0
        return sum(s["train_seconds"] for s in self.segments) + running

    def step(self, position: int, state: Callable[[], Mapping[str, Any]], due: bool = False) -> None:
        """A safe point after ``position`` units: write ``state()`` if ``due``, if
        ``--checkpoint-minutes`` passed since the last checkpoint, or on Ctrl-C (then exit)."""
        self.segments[-1]["end"] = position
        timed = self.minutes > 0 and clock() - self._saved_at >= 60.0 * self.minutes
        if due or timed or self.stop_requested:
            self.save(position, state)
        if self.stop_requested:
            self.pause()
            print(f"interrupted: checkpoint at {self.unit} {position} written to {self.path} (training so far "
                  f"{self.elapsed():.1f} s). Continue with: {resume_command()}", file=sys.stderr, flush=True)
            raise Interrupted()

    def save(self, position: int, state: Callable[[], Mapping[str, Any]]) -> None:
        """Write the checkpoint now; the time it takes is not training time."""
        running = self._t0 is not None
        self.pause()
        self.segments[-1]["end"] = position
        save_checkpoint(self.path, {**state(), "config": self.config, "segments": [dict(s) for s in self.segments]},
                        self.device, self.numpy_rng)
        self._saved_at = clock()
        if COMMAND is not None:  # a script run through runs.cli: say so (one line per checkpoint)
            print(f"checkpoint: {self.unit} {position} written to {self.path}", file=sys.stderr, flush=True)
        if running:
            self.unpause()

    def summary(self) -> Dict[str, Any]:
        """For results: ``resumed``, ``segments`` (those that trained, and the first) and the
        total ``train_seconds``."""
        segments = [s for i, s in enumerate(self.segments) if i == 0 or s["end"] > s["start"]]
        return {"resumed": self.resumed, "segments": segments, "train_seconds": self.elapsed()}

    def describe(self) -> str:
        """The training time for a picture's title: :func:`describe_training` of :meth:`summary`."""
        return describe_training(self.summary())


def describe_training(summary: Mapping[str, Any]) -> str:
    """``121 s``, or for a resumed run its segments too: ``121 s (resumed: 40 + 81 s)``."""
    total = f"{summary['train_seconds']:.0f} s"
    if not summary["resumed"]:
        return total
    parts = " + ".join(f"{segment['train_seconds']:.0f}" for segment in summary["segments"])
    return f"{total} (resumed: {parts} s)"


def svi_state(optim) -> Dict[str, Any]:
    """What an SVI run needs to continue: the param store's values (every guide's parameters,
    ``PyroModule`` or ``pyro.module``) and the Pyro optimizer's state."""
    params = {k: v.detach() for k, v in pyro.get_param_store().named_parameters()}
    return {"params": params, "optim": optim.get_state()}


def restore_svi(svi, optim, state: Mapping[str, Any]) -> None:
    """Undo :func:`svi_state`. An autoguide builds its parameters at its first call, so the SVI
    loss is evaluated once first (its random draws: restore the random state afterwards)."""
    svi.evaluate_loss()
    with torch.no_grad():
        for name, value in pyro.get_param_store().named_parameters():
            value.copy_(state["params"][name])
    optim.set_state(state["optim"])


def resume_command() -> str:
    """How to continue an interrupted run: its command line with ``--resume``."""
    if COMMAND is None:  # called in-process (tests, notebooks)
        return "the same command with --resume"
    argv = COMMAND + ([] if "--resume" in COMMAND else ["--resume"])
    return f"{Path(sys.executable).name} {shlex.join(argv)}"
