"""The pieces of ``examples/tabular_density.py`` that are not its training loop: the data (a
missing file as a clear error), the FFJORD options of each ``--config``, the stacked density
and its exact-trace score. The learning-curve picture is ``density_common``'s."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_ffjord import FFJORD, runs
from pyro_ffjord.config import default_hidden_dims
from pyro_ffjord.datasets import tabular
from pyro_ffjord.datasets.files import DatasetFileError

CONFIGS = ("paper", "default", "fast")
QUICK_MAX_BLOCKS = 2  # --quick keeps a stack (two blocks at most) so that stacking is exercised


def load(dataset: str, data_dir: Optional[str]) -> tabular.TabularSplits:
    """The splits of ``dataset``; a missing or damaged MAF file is a :class:`~pyro_ffjord.runs.RunError`
    whose message names the file and where it is published (the script's cli prints it)."""
    if dataset != "breast_cancer" and data_dir is None:
        raise runs.RunError(f"--dataset {dataset} is read from MAF's files: pass --data-dir (MAF's data/ folder "
                            f"or its {dataset} folder; data.tar.gz is published at {tabular.ZENODO})")
    try:
        return tabular.load(dataset, data_dir)
    except (DatasetFileError, ImportError) as exc:  # ImportError: BSDS300 without h5py
        raise runs.RunError(str(exc)) from None


def flow_setup(config: str, paper: Mapping[str, Any], dim: int, num_blocks: Optional[int] = None,
               width: Optional[int] = None, tol: Optional[float] = None,
               quick: bool = False) -> Tuple[int, Dict[str, Any]]:
    """``(blocks, options)``: how many FFJORD blocks to stack and the keywords of each.

    ``paper``: the reference configuration ``paper`` (one entry of the example's ``PAPER``
    table) as FFJORD options; ``default``: one ``FFJORD(D)``, no options; ``fast``: one
    ``FFJORD(D, preset="fast")``. ``num_blocks``, ``width`` (every hidden layer, depth kept)
    and ``tol`` (``atol = rtol``) override the configuration's.

    Example::

        >>> flow_setup("default", {}, 30)
        (1, {})
        >>> paper = dict(nhidden=2, hdim_factor=20, num_blocks=1, nonlinearity="softplus",
        ...              layer_type="concatsquash", trace="hutchinson", noise="gaussian",
        ...              solver="dopri5", atol=1e-8, rtol=1e-6, T=1.0, train_T=True, adjoint=True)
        >>> blocks, options = flow_setup("paper", paper, 43)
        >>> blocks, options["hidden_dims"], options["atol"]
        (1, [860, 860], 1e-08)
        >>> flow_setup("fast", {}, 6, width=16, tol=1e-3, quick=True)[1]
        {'preset': 'fast', 'hidden_dims': [16, 16, 16], 'atol': 0.001, 'rtol': 0.001}
    """
    if config not in CONFIGS:
        raise ValueError(f"config {config!r}: choose one of {CONFIGS}")
    blocks, options = 1, {}
    if config == "paper":
        blocks = paper["num_blocks"]
        options = dict(hidden_dims=[paper["hdim_factor"] * dim] * paper["nhidden"], activation=paper["nonlinearity"],
                       time_embedding=paper["layer_type"], trace=paper["trace"], noise=paper["noise"],
                       solver=paper["solver"], eval_solver=paper["solver"], atol=paper["atol"], rtol=paper["rtol"],
                       T=paper["T"], train_T=paper["train_T"], adjoint=paper["adjoint"])
    elif config == "fast":
        options = dict(preset="fast")
    if width is not None:
        options["hidden_dims"] = [width] * len(options.get("hidden_dims") or default_hidden_dims(dim))
    if tol is not None:
        options.update(atol=tol, rtol=tol)
    if num_blocks is not None:
        blocks = num_blocks
    elif quick:
        blocks = min(blocks, QUICK_MAX_BLOCKS)
    return blocks, options


def build_density(dim: int, blocks: int, options: Mapping[str, Any],
                  device: torch.device) -> Tuple[nn.ModuleList, dist.TransformedDistribution]:
    """``blocks`` FFJORD bijections (their parameters in one ``ModuleList``) stacked on a
    standard normal base: ``x = f_K(...f_1(z))``, ``log_prob`` solves each block backwards."""
    flows = nn.ModuleList(FFJORD(dim, **options) for _ in range(blocks)).to(device)
    base = dist.Normal(torch.zeros(dim, device=device), torch.ones(dim, device=device)).to_event(1)
    return flows, dist.TransformedDistribution(base, list(flows))


def describe(flows: Sequence[FFJORD]) -> Dict[str, Any]:
    """The options every block was built with (solver, trace, tolerances... and the field's
    architecture), and each block's end time (learned under ``train_T``)."""
    net = flows[0].net
    arch = {k: v for k, v in net.architecture.items() if k in ("activation", "time_embedding")}
    return dict(vars(flows[0].config), hidden_dims=[layer.linear.out_features for layer in net.layers[:-1]], **arch,
                num_blocks=len(flows), end_times=[float(f.end_time.detach()) for f in flows])


@torch.no_grad()
def score(flows: nn.ModuleList, density: dist.TransformedDistribution, points: Tensor,
          chunk: int) -> Dict[str, Any]:
    """Mean negative log-likelihood (nats) of ``points`` and its standard error, in eval mode
    (exact trace, the adaptive eval solver), ``chunk`` points per solve; ``nfe``: function
    evaluations of one chunk's solves, all blocks together, averaged over the chunks. The
    random state is left as it was (a resumed run must draw what an uninterrupted one does)."""
    was_training = flows.training
    flows.eval()
    logps: List[Tensor] = []
    nfes: List[int] = []
    try:
        with torch.random.fork_rng(devices=[points.device] if points.device.type == "cuda" else []):
            for i in range(0, len(points), chunk):
                logps.append(density.log_prob(points[i : i + chunk]).double())
                nfes.append(sum(f.nfe_forward for f in flows))
    finally:
        flows.train(was_training)
    lp = torch.cat(logps)
    return {"nll": float(-lp.mean()), "se": float(lp.std() / math.sqrt(len(lp))) if len(lp) > 1 else 0.0,
            "finite": bool(torch.isfinite(lp).all()), "nfe": sum(nfes) / len(nfes)}
