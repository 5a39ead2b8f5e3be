"""What the examples record beside their results: the machine, the software and the revision,
so that every figure in ``results.json`` says where and when it was measured; and an atomic
checkpoint write, so that an interrupted run never leaves a truncated checkpoint behind."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import pyro
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    except OSError:
        return None
    return out.stdout.strip() or None


def machine_info(device: str = "cpu") -> dict:
    """Date (UTC), versions, processor, threads, device (and GPU name), git revision and load."""
    device = str(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "revision": git_revision(),
        # other work on the machine slows every timing: the load says how busy it was
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file, then rename: a reader sees the old or the new file."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)
