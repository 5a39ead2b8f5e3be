"""Evaluation of ``examples/vae.py``: the paper's test figure (negative ELBO with beta = 1, one
``z`` per point, flows in eval mode) and an importance-sampled NLL, in nats per image, and
their conversion to the unit of the results table."""

from __future__ import annotations

import math
from typing import Optional

import pyro
import torch
from tqdm.auto import tqdm

EVALUATION = ("beta = 1, flows in eval mode (FFJORD: exact trace, dopri5), one z per test point, mean over the "
              "test points; IS-NLL: -log mean_k p(x, z_k)/q(z_k|x), z_k ~ q")


def batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None):
    """Index batches of ``range(n)``, shuffled by ``generator`` if one is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def _mean_se(values: torch.Tensor):
    se = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return float(values.mean()), se


@torch.no_grad()
def evaluate(vae, x: torch.Tensor, seed: int, batch_size: int, device: str = "cpu", is_samples: int = 0,
             is_points: Optional[int] = None, progress: bool = True, desc: str = "eval") -> dict:
    """Negative ELBO (beta = 1, one sample per point) and, if ``is_samples``, the importance-
    sampled NLL :math:`-\\log \\frac1K \\sum_k p(x, z_k) / q(z_k \\mid x)` with ``K = is_samples``
    on the first ``is_points`` points, in nats per image, with standard errors over points.

    Flows are in eval mode; the draws are seeded with ``seed`` and the torch random state is
    restored afterwards, so evaluating does not change the course of training."""
    was_training = vae.training
    vae.eval()
    rng = torch.get_rng_state()
    pyro.set_rng_seed(seed)
    try:
        elbos = []
        for idx in tqdm(list(batches(len(x), batch_size)), desc=desc, disable=not progress, leave=False):
            elbos.append(vae.log_weights(x[idx].to(device)).cpu())
        elbo = torch.cat(elbos).double()
        neg_elbo, neg_elbo_se = _mean_se(-elbo)
        out = {"neg_elbo": neg_elbo, "neg_elbo_se": neg_elbo_se, "points": len(elbo),
               "finite": bool(torch.isfinite(elbo).all())}
        if is_samples:
            xs = x[: is_points or len(x)]
            per = max(1, batch_size // is_samples)  # points per chunk
            reps = min(is_samples, batch_size)  # samples per pass
            nll = []
            for idx in tqdm(list(batches(len(xs), per)), desc="IS", disable=not progress, leave=False):
                xb, lw = xs[idx].to(device), []
                for done in range(0, is_samples, reps):
                    k = min(reps, is_samples - done)
                    lw.append(vae.log_weights(xb.repeat(k, *[1] * (xb.dim() - 1))).reshape(k, len(xb)).cpu())
                nll.append(-(torch.logsumexp(torch.cat(lw).double(), 0) - math.log(is_samples)))
            nll_is, nll_is_se = _mean_se(torch.cat(nll))
            out.update(nll_is=nll_is, nll_is_se=nll_is_se, is_samples=is_samples, is_points=len(xs))
    finally:
        torch.set_rng_state(rng)
        vae.train(was_training)
    return out


def figures(res: dict, nats_per_unit: float) -> dict:
    """The results-file entries of an :func:`evaluate` result: figures in the table's unit
    (``test_*``), in nats (``test_*_nats``), and how many points and samples they rest on."""
    has_is = "nll_is" in res
    return {
        "test_neg_elbo": res["neg_elbo"] / nats_per_unit,
        "test_neg_elbo_se": res["neg_elbo_se"] / nats_per_unit,
        "test_neg_elbo_nats": res["neg_elbo"],
        "test_nll_is": res["nll_is"] / nats_per_unit if has_is else None,
        "test_nll_is_se": res["nll_is_se"] / nats_per_unit if has_is else None,
        "test_nll_is_nats": res.get("nll_is"),
        "is_samples": res.get("is_samples", 0),
        "is_points": res.get("is_points", 0),
        "test_points": res["points"],
    }
