"""Run bookkeeping shared by the examples and the benchmarks, so that each script is the model,
the training and the evaluation it exists for.

One place for: the command-line options every script has (:func:`add_run_args`, parsed by
:func:`parse`) and the checks of their values (:func:`positive_int` and the other ``type=``
helpers, :func:`device_option`); quick-mode and full-run defaults (:func:`fill_defaults`);
device, thread and output-folder setup (:func:`start`); what a results file says about where
and when it was measured (:func:`machine_info`); results JSON (:func:`write_results`); and an
example's ``__main__`` (:func:`cli`). Checkpoints and a training loop's checkpoint schedule
(:class:`Training`) live in :mod:`pyro_ffjord.checkpoints` and are re-exported here, so a
script imports this module only.

Example::

    >>> import argparse
    >>> parser = add_run_args(argparse.ArgumentParser(), out="out/demo")
    >>> args = parse(parser, ["--quick"])
    >>> fill_defaults(args, full={"iters": 3000}, quick={"iters": 20})
    >>> args.iters, args.seed, args.device, args.threads, args.out
    (20, 0, 'cpu', 1, 'out/demo-quick')
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import pyro
import torch

from .checkpoints import (  # noqa: F401 -- re-exported: the examples import runs only
    NOT_CONFIG,
    Interrupted,
    MissingCheckpoint,
    RunError,
    Training,
    atomic_save,
    config_differences,
    describe_training,
    load_checkpoint,
    restore_svi,
    resume_command,
    rng_state,
    run_config,
    save_checkpoint,
    set_rng_state,
    svi_state,
)
from . import checkpoints

PathLike = Union[str, "os.PathLike[str]"]
_HERE = os.path.dirname(os.path.abspath(__file__))


# -- option values (argparse ``type=``): a bad value is a usage error, not a crash later ----
def _number(kind: type, text: str, ok: Callable[[Any], bool], what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not (math.isfinite(value) and ok(value)):  # nan and inf are never a count or a rate
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type=`` for integers ``>= low``."""
    def check(text: str) -> int:
        return _number(int, text, lambda v: v >= low, f"an integer >= {low}")
    check.__name__ = f"int_at_least_{low}"
    return check


def positive_int(text: str) -> int:
    """``type=`` for counts that must be at least 1: steps, batch sizes, points, widths."""
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """``type=`` for counts where 0 means none (iterations of a resumed run, seeds, epochs)."""
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """``type=`` for finite numbers > 0: learning rates, end times, tolerances, scales."""
    return _number(float, text, lambda v: v > 0, "a finite number > 0")


def nonnegative_float(text: str) -> float:
    """``type=`` for finite numbers >= 0: penalty weights, weight decay, minutes (0: off)."""
    return _number(float, text, lambda v: v >= 0, "a finite number >= 0")


def unit_interval(text: str) -> float:
    """``type=`` for probabilities strictly between 0 and 1 (e.g. a target acceptance rate)."""
    return _number(float, text, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")


def device_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be used as the torch device here, or ``None`` if it can."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        return f"{name!r} is not a torch device (cpu, cuda, cuda:1, mps)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            return f"{name}: CUDA is not available ({why}; torch {torch.__version__}); use --device cpu"
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            return f"{name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
        return None
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        available = mps is not None and mps.is_available()
        return None if available else f"{name}: MPS is not available here; use --device cpu"
    return f"{name}: the examples run on cpu, cuda[:N] or mps"


def device_option(text: str) -> str:
    """``type=`` of ``--device``: refuses a device this machine does not have, at parse time."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return str(torch.device(text))


# -- command line ---------------------------------------------------------------------------
def add_run_args(parser: argparse.ArgumentParser, out: Optional[str], resume: bool = False,
                 threads: Optional[int] = 1, threads_note: str = "small nets: more threads cost more than they give",
                 out_note: str = "a folder named after the run") -> argparse.ArgumentParser:
    """Add ``--device --seed --out --threads --quick --no-progress`` (and ``--resume
    --checkpoint-minutes``). ``threads``: the default of ``--threads`` (``None``: the free
    cores), explained by ``threads_note`` in ``--help``; ``out_note``: what ``--help`` says of
    ``--out`` when ``out`` is ``None`` (the script picks the folder)."""
    g = parser.add_argument_group("run")
    # "%(default)s" in a help: argparse's ArgumentDefaultsHelpFormatter then adds no second default
    g.add_argument("--device", type=device_option, default="cpu", help="cpu, cuda, cuda:1, mps (default %(default)s)")
    g.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default %(default)s)")
    where = "%(default)s" if out else out_note
    g.add_argument("--out", default=out, help=f"folder for results, pictures and checkpoints (default {where}; "
                                              "with --quick, the same name ending in -quick)")
    default = "%(default)s" if threads else "all the free cores"
    g.add_argument("--threads", type=positive_int, default=threads,
                   help=f"torch threads (default {default}: {threads_note})")
    g.add_argument("--quick", action="store_true", help="a tiny budget, for tests (seconds), in its own --out folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if resume:
        g.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint in --out; refused if it was written with other run "
                            "options (--lr, --seed, data, model...: the message names them); the budget may change")
        g.add_argument("--checkpoint-minutes", type=nonnegative_float, default=5.0,
                       help="also write a checkpoint after this many minutes of training (default %(default)s; "
                            "0: off); Ctrl-C writes one and exits")
    return parser


def quick_out(out: str) -> str:
    """The output folder of a ``--quick`` run beside ``out``, so that a quick run never
    overwrites a full run's results nor is resumed by it."""
    return str(out).rstrip("/\\") + "-quick"


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)``; under ``--quick`` with no ``--out`` given, the folder is
    :func:`quick_out` of the default."""
    args = parser.parse_args(argv)
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a == "--out" or a.startswith("--out=")]
    default = parser.get_default("out")
    if getattr(args, "quick", False) and default is not None and args.out == default and not given:
        args.out = quick_out(default)
    return args


def fill_defaults(args: argparse.Namespace, full: Mapping[str, Any], quick: Mapping[str, Any] = None) -> None:
    """Set every option still ``None`` to its ``quick`` value under ``--quick`` (when it has
    one), else to its ``full`` value: an option given on the command line always wins."""
    quick = quick or {}
    for name in {*full, *quick}:
        if getattr(args, name, None) is None:
            use_quick = args.quick and name in quick
            setattr(args, name, quick[name] if use_quick else full.get(name))


def free_cores() -> int:
    """Cores this process may run on (threads beyond them cost far more than they give)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def start(args: argparse.Namespace) -> Path:
    """Check ``--device`` (before anything is written), set the torch threads (``--threads``;
    ``None``: the free cores) and create ``--out``."""
    problem = device_problem(str(getattr(args, "device", "cpu")))
    if problem:  # arguments built without parse(): the same refusal, still before any folder
        raise SystemExit(f"error: argument --device: {problem}")
    if getattr(args, "threads", None) is None:
        args.threads = free_cores()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def cli(main: Callable[[argparse.Namespace], Any], parse_args: Callable[[], argparse.Namespace]) -> None:
    """An example's ``__main__``: ``main(parse_args())``. A refused run (:class:`RunError`) ends
    in its message (exit code 1) and Ctrl-C outside a :class:`Training` loop (which writes a
    checkpoint and exits by itself) in one line (exit code 130), not in a traceback."""
    checkpoints.COMMAND = list(sys.argv)
    try:
        main(parse_args())
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C): the work in progress was not saved", file=sys.stderr)
        raise SystemExit(130) from None
    except RunError as exc:
        raise SystemExit(f"error: {exc}") from None


# -- what a result says about where it was measured -----------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _git(*argv: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *argv], capture_output=True, text=True, cwd=_HERE)
    except OSError:  # no git
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_revision() -> Optional[str]:
    """The short revision of the checkout the code runs from (``None`` outside git)."""
    return _git("rev-parse", "--short", "HEAD") or None


def git_modified() -> Optional[bool]:
    """Whether tracked files differ from :func:`git_revision` (a result of edited code says so)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def machine_info(device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Date (UTC), versions, processor, cores, threads, device (and GPU name), revision (and
    whether the checkout was modified), load."""
    device = str(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cores": free_cores(),
        "threads": torch.get_num_threads(),
        "device": device,
        "revision": git_revision(),
        "revision_modified": git_modified(),
        # other work on the machine slows every timing: the load says how busy it was
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


# -- results and checkpoints ----------------------------------------------------------------
def write_json(path: PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, atomically (a reader sees the old or the new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_results(args: argparse.Namespace, name: str, payload: Mapping[str, Any], filename: str = None) -> Dict:
    """``payload`` with ``example``, ``machine`` and ``args`` added, written to
    ``<out>/<filename>`` (default ``<name>.json``); returns what was written."""
    full = {"example": name, "machine": machine_info(getattr(args, "device", "cpu")), "args": vars(args), **payload}
    path = write_json(Path(args.out) / (filename or f"{name}.json"), full)
    if not getattr(args, "no_progress", False):
        print(f"wrote {path}")
    return full
