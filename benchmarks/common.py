"""Shared pieces of the benchmarks: the contenders, NFE counting, machine facts.

A contender wraps one density model behind the same three calls (``loss``, ``test_nll``,
``nfe``) so that every benchmark compares them side by side in one run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Callable, Dict, Optional

import torch
import pyro.distributions as dist

from pyro_ffjord import FFJORD

# The reference code's defaults for the 2-D toys (see ../shared/reference/ffjord-facts.md).
REFERENCE_OPTIONS = dict(preset="reference")


# Levers on top of the reference configuration, each the same capacity (64-64-64 field).
DIRECT = dict(REFERENCE_OPTIONS, adjoint=False)
VARIANTS = {
    "exact_direct": DIRECT,
    "hutch_direct": dict(DIRECT, trace="hutchinson", noise="rademacher"),
    "gauss_direct": dict(DIRECT, trace="hutchinson", noise="gaussian"),
    "zero_init": dict(DIRECT, zero_init=True),
    "rnode": dict(DIRECT, kinetic=0.01, jacobian=0.01),
    "tol_1e-4": dict(DIRECT, atol=1e-4, rtol=1e-4),
    "tol_1e-3": dict(DIRECT, atol=1e-3, rtol=1e-3),
    "sample_norm": dict(DIRECT, error_norm="sample"),
    "concat_time": dict(DIRECT, time_embedding="concat"),
    "rk4_4": dict(DIRECT, solver="rk4", step_size=0.5 / 4, eval_solver="dopri5"),
    "rk4_8": dict(DIRECT, solver="rk4", step_size=0.5 / 8, eval_solver="dopri5"),
    "T1": dict(DIRECT, T=1.0),
    "ct_rk4_4": dict(DIRECT, time_embedding="concat", solver="rk4", step_size=0.5 / 4, eval_solver="dopri5"),
    "ct_rk4_2": dict(DIRECT, time_embedding="concat", solver="rk4", step_size=0.5 / 2, eval_solver="dopri5"),
    "ct_rk4_4_rnode": dict(
        DIRECT, time_embedding="concat", solver="rk4", step_size=0.5 / 4, eval_solver="dopri5",
        kinetic=0.01, jacobian=0.01,
    ),
    "ct_T1_rk4_4": dict(DIRECT, time_embedding="concat", T=1.0, solver="rk4", step_size=0.25, eval_solver="dopri5"),
    "ct_tol3": dict(DIRECT, time_embedding="concat", atol=1e-3, rtol=1e-3),
    "rk4_2": dict(DIRECT, solver="rk4", step_size=0.5 / 2, eval_solver="dopri5"),
    "rk4_3": dict(DIRECT, solver="rk4", step_size=0.5 / 3, eval_solver="dopri5"),
    "rk4_4_rnode": dict(DIRECT, solver="rk4", step_size=0.5 / 4, eval_solver="dopri5", kinetic=0.01, jacobian=0.01),
    "rk4_4_hutch": dict(DIRECT, solver="rk4", step_size=0.5 / 4, eval_solver="dopri5", trace="hutchinson"),
    "zero_init_fast": dict(preset="fast", zero_init=True),
    "fast": dict(preset="fast"),  # (b) of the race: the library's "fast" preset
}
EVAL_TOL = 1e-5  # every contender is scored at the reference tolerance


class Contender:
    """A density model under test: trains on batches, reports NFE and a test NLL."""

    name: str
    module: torch.nn.Module

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def test_nll(self, data: torch.Tensor, chunk: int = 1000) -> float:
        """Exact-trace NLL of ``data``; its evaluations are not counted by :meth:`nfe`."""
        before = self._nfe_raw()
        try:
            return self._test_nll(data, chunk)
        finally:
            after = self._nfe_raw()
            self._eval_forward = getattr(self, "_eval_forward", 0) + after["forward"] - before["forward"]

    def nfe(self) -> Dict[str, int]:
        """Function evaluations (forward, backward) of training since construction."""
        raw = self._nfe_raw()
        return {"forward": raw["forward"] - getattr(self, "_eval_forward", 0), "backward": raw["backward"]}

    def _test_nll(self, data: torch.Tensor, chunk: int) -> float:
        raise NotImplementedError

    def _nfe_raw(self) -> Dict[str, int]:
        raise NotImplementedError


class OurFFJORD(Contender):
    def __init__(self, name: str, dim: int = 2, **options) -> None:
        self.name = name
        self.options = options
        self.module = FFJORD(dim, **options)
        base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
        self.dist = dist.TransformedDistribution(base, [self.module])

    def loss(self, batch):
        loss = -self.dist.log_prob(batch).mean()
        reg = self.module.regularization
        return loss if reg is None else loss + reg

    def _test_nll(self, data, chunk):
        config = self.module.config
        saved = (config.atol, config.rtol)
        config.atol, config.rtol = min(config.atol, EVAL_TOL), min(config.rtol, EVAL_TOL)
        self.module.eval()
        try:
            with torch.no_grad():
                out = torch.cat([self.dist.log_prob(c) for c in data.split(chunk)])
        finally:
            self.module.train()
            config.atol, config.rtol = saved
        return -out.mean().item()

    def _nfe_raw(self):
        s = self.module.stats
        return {"forward": s.nfe_forward_total, "backward": s.nfe_backward_total}


class ZukoCNF(Contender):
    """zuko's CNF with its defaults; NFE counted as calls of its vector-field MLP."""

    def __init__(self, name: str = "zuko CNF", dim: int = 2, **kwargs) -> None:
        import zuko

        self.name = name
        self.options = kwargs
        self.module = zuko.flows.CNF(dim, **kwargs)
        self.calls = {"forward": 0, "backward": 0}
        self._in_backward = False
        self.module.transform.ode.register_forward_hook(self._count)

    def _count(self, *_):
        # zuko re-evaluates the field inside its adjoint backward: count those apart.
        self.calls["backward" if self._in_backward else "forward"] += 1

    def loss(self, batch):
        return -self.module().log_prob(batch).mean()

    def backward(self, loss):
        self._in_backward = True
        try:
            loss.backward()
        finally:
            self._in_backward = False

    def _test_nll(self, data, chunk):
        self.module.eval()
        with torch.no_grad():
            out = torch.cat([self.module().log_prob(c) for c in data.split(chunk)])
        self.module.train()
        return -out.mean().item()

    def _nfe_raw(self):
        return dict(self.calls)


def backward(contender: Contender, loss: torch.Tensor) -> None:
    if hasattr(contender, "backward"):
        contender.backward(loss)
    else:
        loss.backward()


def free_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_info(threads: int, device: str = "cpu") -> dict:
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cores": free_cores(),
        "threads": threads,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_revision() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def markdown_table(rows, columns: Dict[str, Callable]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(fmt(r) for fmt in columns.values()) + " |" for r in rows]
    return "\n".join([head, rule, *body])
