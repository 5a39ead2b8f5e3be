"""Exact log-density evaluation: the ways to compute the trace, and what a batch costs per point.

FFJORD's eval mode integrates the exact trace of :math:`\\partial f / \\partial z` (D
vector-Jacobian products per function evaluation). At D = 8, 32, 64, with the default field
(``ffjord(D)``'s architecture), this benchmark times in one run, per point of a batch:

- one exact-trace evaluation of the field, computed three ways: the library's default
  (:func:`pyro_ffjord.divergence.exact_divergence`: one backward pass per coordinate over the
  batch, or for small batches the D VJPs batched with ``vmap``), the D VJPs always batched
  with ``vmap`` (the library's path before), and forward mode (D JVPs batched with
  ``torch.func``); Hutchinson's one-VJP estimate and the bare field for scale;
- the whole exact ``log_prob`` of ``ffjord(D)`` in eval mode (dopri5, its NFE), with the
  default trace and with the always-batched one, against eight Pyro affine couplings and
  zuko's MAF (exact too: their log-det is closed-form).

    python benchmarks/exact_eval.py --threads 1 --out benchmarks/results/exact_eval.json
"""

from __future__ import annotations

import time
import warnings
from typing import Callable, Dict

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
import zuko
from torch.func import jvp, vmap

import pyro_ffjord.divergence as divergence
import pyro_ffjord.ode as ode
from pyro_ffjord import ffjord, runs
from pyro_ffjord.stats import SolveStats
from pyro_ffjord.config import default_hidden_dims
from pyro_ffjord.nets import ODENet

from common import bench_parser, markdown_table, write_results

ALWAYS_BATCHED = 2**62  # BATCHED_TRACE_MAX_ELEMENTS that makes every exact trace one vmap pass


def per_point_ms(fn: Callable[[], object], points: int, min_seconds: float) -> float:
    """Milliseconds per point of ``fn`` (one warm-up call, then repeated for ``min_seconds``)."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return 1e3 * elapsed / calls / points


def trace_ways(net: ODENet, z0: torch.Tensor) -> Dict[str, Callable[[], torch.Tensor]]:
    """The exact trace of ``net`` at ``z0`` computed several ways (each returns it), plus the
    Hutchinson estimate and the bare field for scale."""
    t, dim = torch.tensor(0.3), z0.shape[-1]
    dyn = ode.AugmentedDynamics(net, T=torch.tensor(1.0), stats=SolveStats(), trace="exact")

    def library(batched_max: int):
        def run():
            saved, divergence.BATCHED_TRACE_MAX_ELEMENTS = divergence.BATCHED_TRACE_MAX_ELEMENTS, batched_max
            try:
                return dyn(t, (z0, torch.zeros(len(z0))))[1]
            finally:
                divergence.BATCHED_TRACE_MAX_ELEMENTS = saved
        return run

    def forward_mode():
        basis = torch.eye(dim).unsqueeze(1).expand(dim, *z0.shape)
        # torch's forward-mode AD scripts its decompositions on first use with the deprecated
        # torch.jit.script (torch 2.13): its warning, not ours
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cols = vmap(lambda v: jvp(lambda z: net(t, z), (z0,), (v,))[1])(basis)  # cols[i] = df/dz_i
        return cols.diagonal(dim1=0, dim2=-1).sum(-1)

    def hutchinson():
        z = z0.clone().requires_grad_()
        with torch.enable_grad():
            f, e = net(t, z), torch.randn_like(z0)
            return (torch.autograd.grad(f, z, e)[0] * e).sum(-1)

    def field():
        with torch.no_grad():
            return net(t, z0)

    return {"library default": library(divergence.BATCHED_TRACE_MAX_ELEMENTS),
            "D VJPs in one vmap pass (before)": library(ALWAYS_BATCHED), "forward mode (vmap jvp)": forward_mode,
            "Hutchinson (1 VJP, estimate)": hutchinson, "field alone": field}


def discrete(dim: int, kind: str):
    """A distribution over R^dim: eight Pyro affine couplings, or zuko's MAF."""
    if kind == "maf":
        return zuko.flows.MAF(dim, transforms=3, hidden_features=[64, 64])()
    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    layers = []
    for i in range(8):
        layers.append(T.affine_coupling(dim))
        if i < 7:
            layers.append(T.Permute(torch.randperm(dim)))
    return dist.TransformedDistribution(base, layers)


def main(args):
    torch.set_num_threads(args.threads or runs.free_cores())
    rows = []
    for dim in args.dims:
        torch.manual_seed(args.seed)
        z0 = torch.randn(args.batch_size, dim)
        net = ODENet(dim, default_hidden_dims(dim))
        ways = trace_ways(net, z0)
        reference = ways["D VJPs in one vmap pass (before)"]()
        for name, fn in ways.items():
            if "estimate" not in name and name != "field alone":  # every exact way agrees
                torch.testing.assert_close(fn(), reference, rtol=1e-4, atol=1e-4)
            rows.append({"dim": dim, "what": "one field evaluation", "way": name,
                         "ms_per_point": per_point_ms(fn, len(z0), args.min_seconds)})
        x = torch.randn(args.batch_size, dim)
        flow = ffjord(dim).eval()  # the default, as a user gets it
        model = dist.TransformedDistribution(dist.Normal(torch.zeros(dim), 1.0).to_event(1), [flow])
        for name, batched_max in (("ffjord(D) eval log_prob, default", divergence.BATCHED_TRACE_MAX_ELEMENTS),
                                  ("ffjord(D) eval log_prob, one vmap pass (before)", ALWAYS_BATCHED)):
            saved, divergence.BATCHED_TRACE_MAX_ELEMENTS = divergence.BATCHED_TRACE_MAX_ELEMENTS, batched_max
            try:
                flow.stats.reset()
                with torch.no_grad():
                    ms = per_point_ms(lambda: model.log_prob(x), len(x), args.min_seconds)
                rows.append({"dim": dim, "what": "exact log_prob", "way": name, "ms_per_point": ms,
                             "nfe_per_solve": flow.stats.nfe_forward_total / flow.stats.solves})
            finally:
                divergence.BATCHED_TRACE_MAX_ELEMENTS = saved
        for name, kind in (("8 affine couplings (Pyro)", "coupling"), ("zuko MAF", "maf")):
            torch.manual_seed(args.seed)
            d = discrete(dim, kind)
            with torch.no_grad():
                rows.append({"dim": dim, "what": "exact log_prob", "way": name,
                             "ms_per_point": per_point_ms(lambda: d.log_prob(x), len(x), args.min_seconds)})
        for what in ("one field evaluation", "exact log_prob"):
            group = [r for r in rows if r["dim"] == dim and r["what"] == what]
            ours = [r["ms_per_point"] for r in group if r["way"].startswith(("ffjord", "library", "D VJPs",
                                                                             "forward"))]
            for r in group:  # against the fastest exact way to compute FFJORD's trace / log-density
                r["x_fastest_exact"] = r["ms_per_point"] / min(ours)
            coupling = [r["ms_per_point"] for r in group if r["way"].startswith("8 affine")]
            for r in group if coupling else ():
                r["x_coupling"] = r["ms_per_point"] / coupling[0]
        for r in rows:
            if r["dim"] == dim:
                print(f"D={dim} {r['what']}: {r['way']}: {r['ms_per_point']:.4f} ms/point "
                      f"({r['x_fastest_exact']:.2f}x FFJORD's fastest exact way)", flush=True)
    print(markdown_table(rows, {
        "D": lambda r: str(r["dim"]), "what": lambda r: r["what"], "way": lambda r: r["way"],
        "ms per point": lambda r: f"{r['ms_per_point']:.4f}",
        "x FFJORD's fastest exact way": lambda r: f"{r['x_fastest_exact']:.2f}",
        "x couplings": lambda r: f"{r['x_coupling']:.1f}" if "x_coupling" in r else "",
    }))
    write_results("exact_eval", args, {"rows": rows})


def parser():
    p = bench_parser(__doc__, out="", iters=0, batch_size=1000, test_size=0)
    p.add_argument("--dims", type=int, nargs="+", default=[8, 32, 64])
    p.add_argument("--min-seconds", type=float, default=2.0, help="time each way for at least this long")
    return p


if __name__ == "__main__":
    main(parser().parse_args())
