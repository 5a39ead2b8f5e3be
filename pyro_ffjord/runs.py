"""Run bookkeeping shared by the examples and the benchmarks, so that each script is the model,
the training and the evaluation it exists for.

One place for: the command-line options every script has (:func:`add_run_args`), quick-mode
and full-run defaults (:func:`fill_defaults`), thread and output-folder setup (:func:`start`),
what a results file says about where and when it was measured (:func:`machine_info`), results
JSON (:func:`write_results`), and checkpoints that survive an interruption and resume with the
random state they were written with (:func:`save_checkpoint`, :func:`load_checkpoint`).

Example::

    >>> import argparse
    >>> parser = add_run_args(argparse.ArgumentParser(), out="out/demo")
    >>> args = parser.parse_args(["--quick", "--threads", "1"])
    >>> fill_defaults(args, full={"iters": 3000}, quick={"iters": 20})
    >>> args.iters, args.seed, args.device
    (20, 0, 'cpu')
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np
import pyro
import torch

PathLike = Union[str, "os.PathLike[str]"]
_HERE = os.path.dirname(os.path.abspath(__file__))


# -- command line ---------------------------------------------------------------------------
def add_run_args(parser: argparse.ArgumentParser, out: str, resume: bool = False) -> argparse.ArgumentParser:
    """Add ``--device --seed --out --threads --quick --no-progress`` (and ``--resume``)."""
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--out", default=out, help="folder for results, pictures and checkpoints")
    g.add_argument("--threads", type=int, default=None,
                   help="torch threads (%(default)s; None: all the free cores)")
    g.add_argument("--quick", action="store_true", help="a tiny budget, for tests (seconds)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if resume:
        g.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    return parser


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
    """Set the torch threads (``--threads``, default the free cores) and create ``--out``."""
    if getattr(args, "threads", None) is None:
        args.threads = free_cores()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# -- what a result says about where it was measured -----------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def git_revision() -> Optional[str]:
    """The short revision of the checkout the code runs from (``None`` outside git)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=_HERE)
    except OSError:
        return None
    return out.stdout.strip() or None


def machine_info(device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Date (UTC), versions, processor, cores, threads, device (and GPU name), revision, load."""
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
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run once without --resume first")
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or "rng" not in state:
        raise ValueError(f"{path} was not written by this version's save_checkpoint (it holds no random "
                         "state to resume from); start again without --resume")
    set_rng_state(state["rng"], device, numpy_rng)
    return state
