"""Model of ``examples/flow_prior.py``: an MLP VAE on binarized MNIST whose prior is N(0, I) or
that pushed through a learned FFJORD (registered with ``pyro.module``, so SVI fits it with the
rest), the SVI set-up both priors share, and the test ELBO."""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import DenseNN
from torch import Tensor, nn

from pyro_ffjord import FFJORD, regularization
from pyro_ffjord.config import is_adaptive


class VAE(nn.Module):
    """MLP encoder and decoder; prior N(0, I), pushed through ``FFJORD(latent_dim, **flow_options)`` if given."""

    def __init__(self, latent_dim: int, hidden: List[int], flow_options: Optional[dict] = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = DenseNN(784, hidden, [2 * latent_dim])  # ReLU between the layers
        self.decoder = DenseNN(latent_dim, hidden[::-1], [784])
        self.flow = None if flow_options is None else FFJORD(latent_dim, **flow_options)

    def prior(self, batch: int, like: Tensor) -> dist.TorchDistribution:
        base = dist.Normal(like.new_zeros(batch, self.latent_dim), 1.0).to_event(1)
        return base if self.flow is None else dist.TransformedDistribution(base, [self.flow])

    def model(self, x: Tensor) -> None:
        pyro.module("decoder", self.decoder)
        if self.flow is not None:
            pyro.module("prior_flow", self.flow)  # the prior's parameters are learned by SVI
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x.shape[0], x))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).split(self.latent_dim, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


def evaluate(vae: VAE, data: Tensor, batch_size: int, device: str) -> Dict[str, float]:
    """Test ELBO per image (nats, one z per image) in eval mode (exact trace, the flow's eval
    solver), split into log p(x|z) and the KL estimate log q(z|x) - log p(z)."""
    vae.eval()
    sums, nfe, start = {"rec": 0.0, "kl": 0.0, "elbo": 0.0}, [], time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data[i:i + batch_size].to(device)
            guide_tr = poutine.trace(vae.guide).get_trace(x)
            model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
            rec, log_p, log_q = (tr.nodes[k]["fn"].log_prob(tr.nodes[k]["value"])
                                 for tr, k in ((model_tr, "x"), (model_tr, "z"), (guide_tr, "z")))
            for k, v in {"rec": rec, "kl": log_q - log_p, "elbo": rec + log_p - log_q}.items():
                sums[k] += float(v.sum())
            nfe += [] if vae.flow is None else [vae.flow.nfe_forward]
    vae.train()
    out = {"test_rec": sums["rec"] / len(data), "test_kl": sums["kl"] / len(data),
           "test_neg_elbo": -(sums["elbo"] / len(data)), "eval_seconds": time.perf_counter() - start}
    return {**out, "eval_nfe_per_solve": sum(nfe) / len(nfe)} if nfe else out


def flow_options(args, **over) -> dict:
    """The prior's FFJORD keywords from the command line, with ``over`` replacing some."""
    opts = dict(hidden_dims=args.flow_hidden, trace=args.trace, solver=args.solver, steps=args.steps,
                eval_solver="dopri5", T=args.T, kinetic=args.kinetic, jacobian=args.jacobian)
    opts.update(over)
    if is_adaptive(opts["solver"]):  # --steps is for a fixed-grid solver; the library refuses unused steps
        opts["steps"] = None
    return opts


def make_svi(args, flow_opts: Optional[dict]):
    """A fresh VAE (seeded: the same initialisation for every prior), its optimizer and SVI."""
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    vae = VAE(args.latent_dim, args.hidden, flow_opts).to(args.device)
    elbo, optim = Trace_ELBO(), pyro.optim.Adam({"lr": args.lr})

    def rnode_loss(model, guide, x):  # RNODE: the ELBO plus the flow's penalty of the same step
        return elbo.differentiable_loss(model, guide, x) + len(x) * regularization(vae)
    regularized = flow_opts is not None and (flow_opts["kinetic"] > 0 or flow_opts["jacobian"] > 0)
    return vae, optim, SVI(vae.model, vae.guide, optim, rnode_loss if regularized else elbo)
