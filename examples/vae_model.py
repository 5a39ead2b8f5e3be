"""Networks of ``examples/vae.py``: the Sylvester-flows gated convolutional encoder and
decoder, and the VAE (model and guide) whose posterior is a diagonal Gaussian pushed through
flows amortized on the encoder's output (``vae_flows.build_flows``); one epoch of training."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from pyro_ffjord import distributed, regularization
from vae_eval import batches

H_DIM = 256  # encoder output h, the context of every amortized flow


# --- encoder and decoder ------------------------------------------------------------------------
class GatedConv2d(nn.Module):
    """``conv_a(x) * sigmoid(conv_g(x))``."""

    def __init__(self, cin, cout, kernel, stride, padding):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, kernel, stride, padding)
        self.g = nn.Conv2d(cin, cout, kernel, stride, padding)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.g(x))


class GatedConvTranspose2d(nn.Module):
    """``convT_a(x) * sigmoid(convT_g(x))``."""

    def __init__(self, cin, cout, kernel, stride, padding, output_padding=0):
        super().__init__()
        self.a = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding)
        self.g = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding)

    def forward(self, x):
        return self.a(x) * torch.sigmoid(self.g(x))


def _ch(n: int, width: float) -> int:
    return max(2, int(round(n * width)))


class Encoder(nn.Module):
    """The Sylvester-flows encoder: six gated convolutions to ``h`` (256), then linear heads
    for the mean and (softplus) variance of the base Gaussian. ``width`` scales the channels
    (32, 64) of the hidden layers; ``h`` stays 256."""

    def __init__(self, image_shape, latent_dim, width=1.0, categorical=False):
        super().__init__()
        c, H, W = image_shape
        c32, c64 = _ch(32, width), _ch(64, width)
        last = (H // 4, W // 4)  # 7x7 for 28x28, 7x5 for Frey's 28x20
        self.net = nn.Sequential(
            GatedConv2d(c, c32, 5, 1, 2),
            GatedConv2d(c32, c32, 5, 2, 2),
            GatedConv2d(c32, c64, 5, 1, 2),
            GatedConv2d(c64, c64, 5, 2, 2),
            GatedConv2d(c64, c64, 5, 1, 2),
            GatedConv2d(c64, H_DIM, last, 1, 0),
        )
        self.loc = nn.Linear(H_DIM, latent_dim)
        self.var = nn.Linear(H_DIM, latent_dim)
        self.categorical = categorical
        self.scale_input = 1.0 / 255 if categorical else 1.0

    def forward(self, x):
        h = self.net(x * self.scale_input).flatten(1)
        var = F.softplus(self.var(h))
        # Multinomial (Frey) data: the reference clamps the variance to [0.01, 7].
        var = var.clamp(0.01, 7.0) if self.categorical else var + 1e-8
        return h, self.loc(h), var.sqrt()


class Decoder(nn.Module):
    """Gated transposed convolutions from ``z`` to per-pixel logits: (N, C, H, W) Bernoulli
    logits, or (N, C, H, W, 256) categorical logits."""

    def __init__(self, image_shape, latent_dim, width=1.0, categorical=False):
        super().__init__()
        c, H, W = image_shape
        c32, c64 = _ch(32, width), _ch(64, width)
        last = (H // 4, W // 4)
        self.net = nn.Sequential(
            GatedConvTranspose2d(latent_dim, c64, last, 1, 0),
            GatedConvTranspose2d(c64, c64, 5, 1, 2),
            GatedConvTranspose2d(c64, c32, 5, 2, 2, 1),
            GatedConvTranspose2d(c32, c32, 5, 1, 2),
            GatedConvTranspose2d(c32, c32, 5, 2, 2, 1),
            GatedConvTranspose2d(c32, c32, 5, 1, 2),
        )
        self.categorical = categorical
        self.image_shape = tuple(image_shape)
        if categorical:
            self.out = nn.Sequential(nn.Conv2d(c32, _ch(256, width), 5, 1, 2), nn.Conv2d(_ch(256, width), c * 256, 1))
        else:
            self.out = nn.Conv2d(c32, c, 1)

    def forward(self, z):
        batch = z.shape[:-1]
        y = self.out(self.net(z.reshape(-1, z.shape[-1], 1, 1)))
        if self.categorical:
            c, H, W = self.image_shape
            y = y.reshape(-1, c, 256, H, W).permute(0, 1, 3, 4, 2)
        return y.reshape(*batch, *y.shape[1:])


# --- the VAE --------------------------------------------------------------------------------------
class VAE(nn.Module):
    def __init__(self, image_shape, likelihood, latent_dim, width, flows: nn.ModuleList):
        super().__init__()
        categorical = likelihood == "categorical"
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.encoder = Encoder(image_shape, latent_dim, width, categorical)
        self.decoder = Decoder(image_shape, latent_dim, width, categorical)
        self.flows = flows

    # The three distributions, shared by the Pyro model/guide and the evaluation.
    def prior(self, batch: int, like: torch.Tensor):
        return dist.Normal(like.new_zeros(batch, self.latent_dim), 1.0).to_event(1)

    def observation(self, z):
        logits = self.decoder(z)
        if self.likelihood == "categorical":
            return dist.Categorical(logits=logits).to_event(3)
        return dist.Bernoulli(logits=logits).to_event(3)

    def posterior(self, x):
        h, loc, scale = self.encoder(x)
        base = dist.Normal(loc, scale).to_event(1)
        if len(self.flows) == 0:
            return base
        return dist.ConditionalTransformedDistribution(base, list(self.flows)).condition(h)

    def model(self, x, beta=1.0):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):  # beta * log p(z): the prior half of the KL term
                z = pyro.sample("z", self.prior(x.shape[0], x))
            obs = x.long() if self.likelihood == "categorical" else x
            pyro.sample("x", self.observation(z), obs=obs)

    def guide(self, x, beta=1.0):
        pyro.module("encoder", self.encoder)
        pyro.module("flows", self.flows)
        q = self.posterior(x)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=beta):  # beta * log q(z|x): the posterior half
                pyro.sample("z", q)

    @torch.no_grad()
    def log_weights(self, x) -> torch.Tensor:
        """``log p(x, z) - log q(z | x)`` for one ``z ~ q(. | x)`` per row of ``x``."""
        q = self.posterior(x)
        z = q.rsample()
        log_q = q.log_prob(z)  # cached: no second solve
        obs = x.long() if self.likelihood == "categorical" else x
        return self.observation(z).log_prob(obs) + self.prior(x.shape[0], x).log_prob(z) - log_q


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def elbo_loss(vae, elbo):
    """The training loss of a batch ``x`` at warm-up ``beta``, what the (DDP-wrapped) objective's
    forward returns: ``(-ELBO per image, the RNODE penalties)``. The plate is the batch given (a
    rank's share under torchrun): the loss is a mean per image, and DDP's average of the ranks'
    (weighted by their shares, ``World.scale``) is the global batch's."""
    def loss(x, beta):
        neg_elbo = elbo.differentiable_loss(vae.model, vae.guide, x, beta) / x.shape[0]
        return neg_elbo, regularization(vae.flows).to(neg_elbo.device)  # RNODE penalties, if any

    return loss


def train_epoch(vae, optimizer, elbo, train, beta, args, shuffle, binarize, dynamic, desc, part, safe_point,
                objective=None, world=None) -> list:
    """One pass over ``train`` in shuffled minibatches, from batch ``part["batch"]`` on (0, or where
    an interrupted epoch stopped); the per-step losses (-ELBO per image), kept in ``part``. Under
    torchrun (``world``) each rank trains on its share of every batch through ``objective``
    (:func:`elbo_loss` in DistributedDataParallel); the losses are the global batches'."""
    world = world or distributed.World()
    objective = objective or elbo_loss(vae, elbo)
    vae.train()
    order = list(batches(len(train), args.batch_size, shuffle))
    bar = tqdm(range(part["batch"], len(order)), initial=part["batch"], total=len(order), desc=desc,
               disable=args.no_progress, leave=False)
    for k in bar:
        x = train[order[k]]
        if dynamic:  # a grey-level training set is re-binarized every batch (all of it on every rank)
            x = torch.bernoulli(x, generator=binarize)
        rows, x = len(x), world.share(x).to(args.device)
        loss, penalty = objective(x, beta)
        total = world.scale(loss, len(x), rows) + penalty
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        part["losses"].append(world.mean(loss.detach().item(), len(x)))
        bar.set_postfix(loss=f"{part['losses'][-1]:.2f}")
        safe_point(k + 1)  # may write a checkpoint (by minutes, Ctrl-C) and then stop
    return part["losses"]
