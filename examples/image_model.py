r"""The pieces of ``examples/image_density.py`` that are not its training loop: MNIST as 8-bit
pixels (a missing file as a clear error), the multiscale flow of each ``--config``, the
bits/dim score and the grid of samples (the learning curve is ``density_common``'s).

The score (:func:`score`). Test and validation images are dequantized once, with a fixed seed
(:data:`TEST_SEED`, :data:`VALID_SEED`), and scored in eval mode (dopri5 at the configuration's
tolerance) with the flows' ``eval_trace``: by default Hutchinson's estimator with ``probes``
Rademacher probes per image (each image repeated ``probes`` times in the batch, the probes drawn
from torch's generator seeded with :data:`EVAL_SEED` and the random state restored afterwards).
Averaged over the probes, it is an unbiased estimate of :math:`\log p(x)` (up to the solver's
error); bits/dim is :func:`~pyro_ffjord.bits_per_dim` of each image's average, and its standard
error (the spread over images) covers the images, their dequantization noise and the probes
together. The exact trace costs D = 784 vector-Jacobian products per function evaluation
(measured on one CPU thread: 2.6 s for one evaluation of one 28x28 image in the paper's 64-wide
field, against 0.012 s with one probe), which on a CPU is minutes per image: ``eval_trace="exact"``
is there for a GPU or for a check on a few images. End to end on the ``--quick`` model (3 CNFs of
8 channels, dopri5 at 1e-3, 60 evaluations per image), 2 test images cost 7.9 s exact against
0.064 s with 2 probes each: 24.031 against 24.042 bits/dim, a difference within the probe
spread reported (0.010 bits/dim).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from density_common import save_figure  # noqa: E402
from pyro_ffjord import MultiscaleFFJORD, bits_per_dim, runs  # noqa: E402
from pyro_ffjord.config import is_adaptive  # noqa: E402
from pyro_ffjord.datasets import mnist  # noqa: E402
from pyro_ffjord.datasets.files import DatasetFileError  # noqa: E402

IMAGE_SHAPE = (1, 28, 28)
NUM_DIMS = 784
CONFIGS = ("paper", "fast")
PAPER_BPD = 0.99  # the FFJORD paper's MNIST figure (ffjord-facts.md)
VALID_SEED, TEST_SEED, EVAL_SEED, PICTURE_SEED = 2**31 - 1, 2**31 - 2, 2**31 - 3, 2**31 - 4

# The reference's MNIST command (train_cnf.py --data mnist --dims 64,64,64 --strides 1,1,1,1
# --num_blocks 2 --layer_type concat --multiscale True --rademacher True) with its defaults:
# softplus, dopri5 at atol = rtol = 1e-5, T = 1 learned (train_T), logit alpha 1e-6, adjoint
# gradients (the reference always uses them), Adam lr 1e-3 warmed up linearly over 1000
# iterations, batches of 200, no weight decay, uniform dequantization on. The number of scales
# is the reference's rule (three for 28x28, pyro_ffjord.multiscale.default_scales).
MODEL = dict(hidden_channels=[64, 64, 64], blocks_per_scale=2, scales=None, logit_alpha=1e-6,
             time_embedding="concat", activation="softplus", trace="hutchinson", noise="rademacher")
PAPER = dict(MODEL, solver="dopri5", atol=1e-5, rtol=1e-5, T=1.0, train_T=True, adjoint=True,
             kinetic=0.0, jacobian=0.0)
# The same model (field, blocks, scales, logit) trained through the package's default solve:
# backprop through 3 fixed rk4 steps (drift-checked against dopri5 every 50 solves, which
# refines the grid if the flow learns to exploit it), T = 0.5, no adjoint, and RNODE weights
# 0.01 (kinetic and Jacobian), which keep the field smooth enough for a fixed grid (Finlay et
# al., 2020). Evaluated exactly as ``paper``: dopri5 at 1e-5.
FAST = dict(MODEL, solver="rk4", steps=3, eval_solver="dopri5", atol=1e-5, rtol=1e-5, T=0.5, train_T=False,
            adjoint=False, kinetic=0.01, jacobian=0.01)
TRAINING = dict(batch_size=200, lr=1e-3, warmup_iters=1000)  # both configurations (the reference's)


class Pixels(NamedTuple):
    """MNIST as uint8 pixel values ``(N, 1, 28, 28)``, split 50k/10k/10k (``pyro_ffjord.datasets.mnist``)."""

    train: Tensor
    valid: Tensor
    test: Tensor
    source: str


def load(data_dir: str) -> Pixels:
    """The 8-bit pixels of MNIST read from the IDX files in ``data_dir``. The loader gives the
    intensities ``k / 255`` in float32; ``round(255 x)`` recovers the integers ``k`` exactly
    (checked here). A missing or damaged file is a :class:`~pyro_ffjord.runs.RunError` naming it."""
    try:
        splits = mnist.load(data_dir, binarization="none", dtype=torch.float32)
    except DatasetFileError as exc:
        raise runs.RunError(str(exc)) from None

    def pixels(x: Tensor) -> Tensor:
        k = torch.round(x * 255)
        if not torch.equal(k / 255, x):
            raise runs.RunError(f"{data_dir}: intensities that are not k / 255 (not 8-bit MNIST)")
        return k.to(torch.uint8).reshape(-1, *IMAGE_SHAPE)

    return Pixels(pixels(splits.train), pixels(splits.valid), pixels(splits.test), splits.source)


def flow_options(config: str, hidden: Optional[Sequence[int]] = None, scales: Optional[int] = None,
                 blocks: Optional[int] = None, tol: Optional[float] = None, kinetic: Optional[float] = None,
                 jacobian: Optional[float] = None, eval_trace: str = "hutchinson") -> Dict[str, Any]:
    """The keywords of :class:`~pyro_ffjord.MultiscaleFFJORD` for ``config``, with overrides.

    Example::

        >>> o = flow_options("paper")
        >>> o["solver"], o["atol"], o["T"], o["train_T"], o["blocks_per_scale"], o["hidden_channels"]
        ('dopri5', 1e-05, 1.0, True, 2, [64, 64, 64])
        >>> o = flow_options("fast", hidden=[8], scales=2, blocks=1, tol=1e-3)
        >>> o["solver"], o["steps"], o["hidden_channels"], o["scales"], o["atol"], o["kinetic"]
        ('rk4', 3, [8], 2, 0.001, 0.01)
    """
    if config not in CONFIGS:
        raise ValueError(f"config {config!r}: choose one of {CONFIGS}")
    options = dict(PAPER if config == "paper" else FAST, eval_trace=eval_trace)
    overrides = dict(hidden_channels=None if hidden is None else list(hidden), scales=scales,
                     blocks_per_scale=blocks, kinetic=kinetic, jacobian=jacobian, atol=tol, rtol=tol)
    options.update((k, v) for k, v in overrides.items() if v is not None)
    return options


def build(options: Mapping[str, Any], device: torch.device) -> Tuple[MultiscaleFFJORD, dist.TransformedDistribution]:
    """The multiscale flow (from the latent to intensities in [0, 1], the logit's inverse last)
    and its density ``TransformedDistribution(flow.base_distribution(), [flow])``."""
    flow = MultiscaleFFJORD(IMAGE_SHAPE, **options).to(device)
    return flow, dist.TransformedDistribution(flow.base_distribution(), [flow])


def describe(flow: MultiscaleFFJORD, options: Mapping[str, Any]) -> Dict[str, Any]:
    """What the flow was built with (every CNF's solve options, the architecture) and what
    training changed: each CNF's end time and fixed training steps (the drift check may refine)."""
    first = flow.flows[0]
    arch = first.net.architecture
    return dict(vars(first.config), eval_method=first.config.eval_method, multiscale=True, scales=flow.scales,
                blocks_per_scale=options["blocks_per_scale"],
                hidden_channels=list(options["hidden_channels"]), logit_alpha=options["logit_alpha"],
                time_embedding=arch["time_embedding"], activation=arch["activation"], num_cnfs=len(flow.flows),
                cnf_shapes=[list(f.shape) for f in flow.flows], latent_shape=list(flow.latent_shape),
                end_times=[float(f.end_time.detach()) for f in flow.flows],
                training_steps=[None if is_adaptive(f.config.solver) else f.config.fixed_steps(f.config.T)
                                for f in flow.flows])


def estimator(flow: MultiscaleFFJORD, probes: int) -> str:
    """The estimator a score used, in words, for results.json."""
    config = flow.flows[0].config
    if config.eval_trace == "exact":
        return f"exact trace (D = {NUM_DIMS} VJPs per evaluation), {config.eval_method} atol {config.atol:g}"
    return (f"Hutchinson, {probes} Rademacher probe(s) per image averaged (seed {EVAL_SEED}), {config.eval_method} "
            f"atol = rtol = {config.atol:g}: unbiased for log p(x); bits/dim is an estimate, se over images")


@contextlib.contextmanager
def evaluating(flow: MultiscaleFFJORD, device: torch.device, seed: int, trace: Optional[str] = None):
    """Eval mode, torch's generator seeded with ``seed`` and restored afterwards (a resumed run
    draws what an uninterrupted one does); ``trace``: every CNF's eval trace meanwhile."""
    was_training, traces = flow.training, [f.config.eval_trace for f in flow.flows]
    flow.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            for f in flow.flows:
                f.config.eval_trace = trace or f.config.eval_trace
            yield
    finally:
        for f, t in zip(flow.flows, traces):
            f.config.eval_trace = t
        flow.train(was_training)


def score(flow: MultiscaleFFJORD, density, x: Tensor, probes: int, chunk: int) -> Dict[str, Any]:
    """Bits/dim of dequantized images ``x`` (see the module docstring): mean, standard error,
    probe spread (the mean over images of the probes' standard deviation, bits/dim) and NFE
    (per CNF solve, and per pass through every CNF, averaged over the chunks of ``chunk`` rows)."""
    probes = 1 if flow.flows[0].config.eval_trace == "exact" else probes
    rows = x.repeat_interleave(probes, dim=0)  # image i's probes are rows i*probes ... i*probes + probes - 1
    logps: List[Tensor] = []
    nfe: List[List[int]] = []
    with evaluating(flow, x.device, EVAL_SEED):
        for i in range(0, len(rows), chunk):
            logps.append(density.log_prob(rows[i : i + chunk]).double())
            nfe.append([f.nfe_forward for f in flow.flows])
    lp = torch.cat(logps).reshape(len(x), probes)
    bpd = bits_per_dim(lp.mean(1), NUM_DIMS)
    spread = float(lp.std(1).mean() / (NUM_DIMS * math.log(2))) if probes > 1 else None
    return {"bpd": float(bpd.mean()), "se": float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0,
            "probe_sd": spread, "finite": bool(torch.isfinite(lp).all()), "points": len(x), "probes": probes,
            "nfe_per_solve": float(np.mean(nfe)), "nfe_per_pass": float(np.mean([sum(n) for n in nfe]))}


def save_samples(path: str, flow: MultiscaleFFJORD, density, n: int, title: str) -> None:
    """A grid of ``n`` samples: latent draws pushed through the flow (eval mode, Hutchinson's
    trace for the log-det nobody reads), the logit undone by the flow's last part."""
    with evaluating(flow, next(flow.parameters()).device, PICTURE_SEED, trace="hutchinson"):
        images = density.sample((n,)).clamp(0, 1).cpu().numpy()[:, 0]
    side = math.ceil(math.sqrt(n))
    grid = np.ones((side * 29 + 1, side * 29 + 1))
    for k, image in enumerate(images):
        r, c = divmod(k, side)
        grid[1 + 29 * r : 29 * (r + 1), 1 + 29 * c : 29 * (c + 1)] = image
    fig, ax = plt.subplots(figsize=(6, 6.4))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set(xticks=[], yticks=[])
    save_figure(fig, path, title, fontsize=9)


def default_data_dir() -> str:
    """``<checkout>/../shared/data/mnist``, the project's copy."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                                         "mnist"))
