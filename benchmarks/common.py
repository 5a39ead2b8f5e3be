"""Shared pieces of the benchmarks: the contenders (FFJORD's, zuko's CNF, the discrete flows),
their lever variants, NFE counting, and the command line and results file every benchmark has
(machine facts from :mod:`pyro_ffjord.runs`).

A contender wraps one density model behind the same three calls (``loss``, ``test_nll``,
``nfe``) so that every benchmark compares them side by side in one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Dict, List

import torch
import pyro.distributions as dist
import pyro.distributions.transforms as T

from pyro_ffjord import FFJORD, runs

# The reference code's defaults for the 2-D toys (see ../shared/reference/ffjord-facts.md).
REFERENCE_OPTIONS = dict(preset="reference")


# Levers on top of the reference configuration, each the same capacity (64-64-64 field).
DIRECT = dict(REFERENCE_OPTIONS, adjoint=False)


def rk4(steps: int, **levers) -> dict:
    """Training through ``steps`` fixed rk4 steps over [0, T], adaptive dopri5 in eval mode."""
    return dict(DIRECT, solver="rk4", steps=steps, eval_solver="dopri5", **levers)


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
    "rk4_4": rk4(4),
    "rk4_8": rk4(8),
    "T1": dict(DIRECT, T=1.0),
    "ct_rk4_4": rk4(4, time_embedding="concat"),
    "ct_rk4_2": rk4(2, time_embedding="concat"),
    "ct_rk4_4_rnode": rk4(4, time_embedding="concat", kinetic=0.01, jacobian=0.01),
    "ct_T1_rk4_4": rk4(4, time_embedding="concat", T=1.0),
    "ct_tol3": dict(DIRECT, time_embedding="concat", atol=1e-3, rtol=1e-3),
    "rk4_2": rk4(2),
    "rk4_3": rk4(3),
    "rk4_4_rnode": rk4(4, kinetic=0.01, jacobian=0.01),
    "rk4_4_hutch": rk4(4, trace="hutchinson"),
    "zero_init_fast": dict(preset="fast", zero_init=True),
    "fast": dict(preset="fast"),  # the library's "fast" preset
    "default": dict(),  # (b) of the race: FFJORD(2) as a user gets it
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


class Discrete:
    """A discrete flow on a standard normal base, trained like a :class:`Contender` (no NFE).

    ``kind``: ``"affine"`` (or ``"coupling"``) and ``"spline"``, Pyro's eight couplings of that
    kind with hidden layers ``[max(64, 4 D)] * 2`` and a random permutation between each;
    ``"maf"`` and ``"nsf"``, zuko's flow with its defaults.
    """

    KINDS = ("affine", "coupling", "spline", "maf", "nsf")

    def __init__(self, name: str, dim: int, kind: str) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind={kind!r}; choose one of {self.KINDS}")
        self.name = name
        if kind in ("affine", "coupling", "spline"):
            make = T.spline_coupling if kind == "spline" else T.affine_coupling
            layers = []
            for i in range(8):
                layers.append(make(dim, hidden_dims=[max(64, 4 * dim)] * 2))
                if i < 7:
                    layers.append(T.Permute(torch.randperm(dim)))
            self.module = torch.nn.ModuleList([t for t in layers if isinstance(t, torch.nn.Module)])
            base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
            self.dist = lambda: dist.TransformedDistribution(base, layers)
        else:
            import zuko

            self.module = (zuko.flows.MAF if kind == "maf" else zuko.flows.NSF)(dim)
            self.dist = self.module

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return -self.dist().log_prob(batch).mean()

    def test_nll(self, data: torch.Tensor, chunk: int = 1000) -> float:
        with torch.no_grad():
            return -torch.cat([self.dist().log_prob(c) for c in data.split(chunk)]).mean().item()


def example_modules(*names: str) -> List[ModuleType]:
    """Modules of ``examples/`` (e.g. an example's configurations and score), loaded by path in
    the order given, so that a benchmark run as a script measures exactly what the example
    does without putting ``examples/`` on ``sys.path``. Each is registered under its own name,
    so a later one can import an earlier one (``image_model`` imports ``density_common``)."""
    folder = Path(__file__).resolve().parent.parent / "examples"
    loaded = []
    for name in names:
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        loaded.append(sys.modules[name])
    return loaded


def backward(contender: Contender, loss: torch.Tensor) -> None:
    if hasattr(contender, "backward"):
        contender.backward(loss)
    else:
        loss.backward()


def minibatches(data: torch.Tensor, batch_size: int, seed: int):
    """Batches drawn with replacement from ``data`` by a generator seeded with ``seed``: the
    same stream for every contender of a race."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data[torch.randint(len(data), (batch_size,), generator=g)]


def optimizer_step(contender: Contender, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One gradient step of ``contender`` on ``loss``."""
    optimizer.zero_grad()
    backward(contender, loss)
    optimizer.step()


def bench_parser(doc: str, out: str, iters: int, batch_size: int, test_size: int,
                 iters_help: str = "training iterations") -> argparse.ArgumentParser:
    """The options every benchmark has: budget, optimiser, seed, threads and results file."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--iters", type=int, default=iters, help=iters_help)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--test-size", type=int, default=test_size, help="held-out points")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these nets are small, and on this project's 2-core "
                        "machine one thread ran tiny fields 6.3x faster than two under load; 0: the free cores)")
    p.add_argument("--out", default=out, help="results JSON file ('' writes none)")
    return p


def write_results(name: str, args: argparse.Namespace, payload: dict, device: str = "cpu") -> dict:
    """``payload`` with the benchmark's name, arguments and machine (date, versions, threads,
    revision, load), written to ``args.out`` unless it is empty; returns what was written."""
    payload = {"benchmark": name, "args": vars(args), "machine": runs.machine_info(device), **payload}
    if args.out:
        runs.write_json(args.out, payload)
    return payload


def markdown_table(rows, columns: Dict[str, Callable]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(fmt(r) for fmt in columns.values()) + " |" for r in rows]
    return "\n".join([head, rule, *body])
