"""Data-parallel training of the examples on several processes, GPUs and nodes (``torchrun``).

``torchrun --standalone --nproc_per_node=N examples/tabular_density.py ...`` starts N copies of
an example; :func:`setup` finds torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in the
environment and joins the process group (NCCL on GPUs, each process on ``cuda:LOCAL_RANK``;
gloo on CPUs). Without them (``python examples/...``) it returns a single-process
:class:`World` whose every method is the identity, so a plain run computes exactly what it did
before this module existed.

What the examples do with a :class:`World`:

- every rank builds the same global batch (the epoch-seeded order of
  ``density_common.epoch_batches``, or the VAE's shuffle generator, seeded alike on every rank)
  and trains on its contiguous :meth:`World.share` of it; the global ``--batch-size`` must split
  evenly (:meth:`World.per_rank`);
- the loss goes through :meth:`World.wrap` (``DistributedDataParallel`` around an
  :class:`Objective`, whose ``forward`` returns the loss), so DDP averages the gradients, and
  :meth:`World.scale` weights a rank's mean loss by its share of the rows, so that the average
  is the gradient of the global batch's mean even when a last batch splits unevenly;
- rank ``r`` draws its own noise (Hutchinson probes, dequantization, reparameterised samples)
  from seed ``seed + r`` (:meth:`World.seed`; rank 0's stream is the single-process one);
- rank 0 alone validates, logs, writes checkpoints, pictures and results; its decisions (early
  stopping, learning-rate decay, the time budget) reach the others by :meth:`World.broadcast`.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, TypeVar

import numpy as np
import pyro
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .checkpoints import RunError

#: Tests only: the rank named by this variable fails at its first batch (``share``), to check
#: that a failed rank ends the whole job with its message instead of leaving the others waiting.
FAIL_ENV = "PYRO_FFJORD_TEST_FAIL_RANK"
DEFAULT_TIMEOUT_MINUTES = 30.0
T = TypeVar("T")


def launched() -> bool:
    """Whether this process was started by torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


class Objective(nn.Module):
    """A loss as a module: ``forward(*a, **k)`` is ``loss(*a, **k)``; ``modules`` (whose
    parameters the loss uses) are its submodules, so that DDP sees and averages their gradients."""

    def __init__(self, loss: Callable[..., Any], *modules: nn.Module) -> None:
        super().__init__()
        self.loss, self.parts = loss, nn.ModuleList(modules)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.loss(*args, **kwargs)


@dataclass
class World:
    """This process's place among the training processes (one, unless started by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: a single process, no process group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_minutes: Optional[float] = None
    fail_rank: Optional[int] = None  # FAIL_ENV's, tests only

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, validates and writes files."""
        return self.rank == 0

    def per_rank(self, batch_size: int, rows: Optional[int] = None) -> int:
        """The rows of each rank's share of a global batch of ``batch_size``; a clear error if it
        does not split evenly, or if a last, partial batch (of ``rows`` in all) would leave a rank
        nothing.

        >>> World(rank=1, world_size=4, backend="gloo").per_rank(64)
        16
        """
        w = self.world_size
        if batch_size % w:
            low, high = batch_size - batch_size % w, batch_size + w - batch_size % w
            raise RunError(f"--batch-size {batch_size} is the global batch, split over {w} processes: use a "
                           f"multiple of {w} ({', '.join(str(b) for b in (low, high) if b > 0)}, ...)")
        if rows is not None and 0 < rows % batch_size < w:
            raise RunError(f"the last batch of each epoch has {rows % batch_size} of the {rows} training rows, "
                           f"fewer than the {w} processes: choose another --batch-size")
        return batch_size // w

    def share(self, batch: T) -> T:
        """This rank's contiguous share of a global ``batch`` (anything sliceable): rank ``r`` of
        ``W`` gets block ``r`` of ``W`` near-equal blocks, the first ``len % W`` one row longer.
        A single process gets ``batch`` itself.

        >>> [World(rank=r, world_size=3, backend="gloo").share(list(range(8))) for r in range(3)]
        [[0, 1, 2], [3, 4, 5], [6, 7]]
        """
        if not self.distributed:
            return batch
        if self.fail_rank == self.rank:
            raise RunError(f"rank {self.rank} of {self.world_size}: failure injected by {FAIL_ENV} (a test of how "
                           "a failed rank ends the job)")
        q, r = divmod(len(batch), self.world_size)
        start = self.rank * q + min(self.rank, r)
        return batch[start : start + q + (self.rank < r)]

    def scale(self, loss: Tensor, rows: int, total: int) -> Tensor:
        """This rank's mean ``loss`` over its ``rows`` of a global batch of ``total``, weighted
        ``W rows / total``: DDP's average over the ranks is then the gradient of the global mean."""
        return loss if not self.distributed else loss * (self.world_size * rows / total)

    def mean(self, value: float, rows: int) -> float:
        """The global batch's mean of a per-rank mean ``value`` over ``rows`` (for logging)."""
        if not self.distributed:
            return value
        both = torch.tensor([value * rows, rows], dtype=torch.float64, device=self.device)
        dist.all_reduce(both)
        return float(both[0] / both[1])

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` (a small picklable value: a decision), on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def finish(self, value: T) -> T:
        """The end of a run, on every rank: rank 0 once it has tested and written everything, the
        others straight after training. All wait here for one another (within ``--dist-timeout``)
        and then leave the process group together: a rank that tore its group down while the
        others still held theirs could abort at exit (gloo: "terminate called without an active
        exception"). Returns ``value``; a single process returns it at once."""
        if self.distributed:
            dist.barrier()
            shutdown()
        return value

    def wrap(self, module: nn.Module, find_unused: bool = False) -> nn.Module:
        """``DistributedDataParallel(module)`` (a single process: ``module`` itself). Call it once
        the parameters exist (built, or created by a first batch) and hold their final values
        (after ``--resume``): DDP copies rank 0's to every rank here. ``find_unused``: the loss
        leaves some parameters out (flow matching never uses a learned end time), which DDP must
        then look for in every step's graph instead of waiting for their gradients."""
        if not self.distributed:
            return module
        if not any(p.requires_grad for p in module.parameters()):
            raise RuntimeError("distributed.wrap: the module has no trainable parameters yet; build them (or run "
                               "one batch) before wrapping it in DistributedDataParallel")
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=find_unused)

    def seed(self, seed: int) -> None:
        """``pyro.set_rng_seed(seed + rank)``: the same initialisation stream as a single process
        on rank 0 (DDP copies rank 0's parameters to the others), its own noise on every rank."""
        pyro.set_rng_seed(seed + self.rank)

    def reseed_resumed(self, seed: int, position: int) -> None:
        """After ``--resume`` restored rank 0's saved random state on every rank: ranks ``r > 0``
        draw on from a seed of ``(seed + r, position)``, not from rank 0's stream (nor replay the
        noise of their own start). A single process, and rank 0, continue exactly."""
        if self.rank > 0:
            pyro.set_rng_seed(int(np.random.SeedSequence([seed + self.rank, position]).generate_state(1)[0]))

    def rank_seeds(self, seed: int) -> List[int]:
        return [seed + r for r in range(self.world_size)]

    def describe(self, seed: int, batch_size: int) -> Dict[str, Any]:
        """For results: ``world_size``, ``rank_seeds``, ``per_rank_batch`` and how they ran."""
        return dict(world_size=self.world_size, rank_seeds=self.rank_seeds(seed),
                    per_rank_batch=batch_size // self.world_size,
                    distributed=dict(backend=self.backend, timeout_minutes=self.timeout_minutes,
                                     nodes=int(os.environ.get("GROUP_WORLD_SIZE", 1)) if self.distributed else 1,
                                     resumed_ranks_reseeded="(seed + rank, iteration) for ranks > 0")
                    if self.distributed else None)


def add_args(parser: argparse.ArgumentParser) -> None:
    """``--dist-timeout`` (minutes): how long a rank waits for the others in a collective (e.g.
    while rank 0 validates) before it fails the job. Not a run option: ``--resume`` may change it."""
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                        help="under torchrun: minutes a process waits for the others (rank 0 validates alone) "
                             "before the job fails (default %(default)s)")


def setup(args: argparse.Namespace) -> World:
    """Join torchrun's process group, if launched by torchrun; else a single-process :class:`World`.

    Under torchrun: gloo on CPUs, NCCL with ``args.device`` set to ``cuda:LOCAL_RANK``; the
    ``--dist-timeout`` of every collective; ranks other than 0 get ``args.no_progress`` (no bars,
    no prints); ``--threads`` defaults to the free cores shared among the node's processes. The
    group is destroyed at exit."""
    if not launched():
        return World()
    from .runs import free_cores  # runs imports the examples' whole toolkit; only needed here

    rank, world_size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        args.device = str(device)
    elif device.type != "cpu":
        raise RunError(f"--device {device}: torchrun runs on cpu (gloo) or cuda (nccl)")
    minutes = float(getattr(args, "dist_timeout", DEFAULT_TIMEOUT_MINUTES))
    if not minutes > 0:
        raise RunError(f"--dist-timeout {minutes}: must be > 0 minutes")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        extra = dict(device_id=device) if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes), **extra)
        atexit.register(shutdown)
    if rank > 0:
        args.no_progress = True
    if getattr(args, "threads", 1) is None:
        args.threads = max(1, free_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
    fail = os.environ.get(FAIL_ENV)
    return World(rank, world_size, local_rank, backend, device, minutes, int(fail) if fail else None)


def shutdown() -> None:
    """Destroy the process group (registered at exit by :func:`setup`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

