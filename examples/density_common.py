"""What the density examples (``tabular_density.py``, ``image_density.py``) share around their
models: the training state a checkpoint holds (each CNF's drift-check schedule included), the
epoch-seeded batch order, the training loop's bookkeeping, the best model on validation, the
learning-curve picture, and the ``--objective`` options (maximum likelihood or flow matching; the
toy demo ``toy_density.py`` uses these too).

The checkpoint schedule and the training clock are :class:`pyro_ffjord.runs.Training`'s; each
example keeps its own model, score and results.
"""

from __future__ import annotations

import argparse
import math
import os
import textwrap
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pyro_ffjord import distributed, runs  # noqa: E402


# -- command line: the options of the training loop, the output folder --------------------------
def add_training_args(group: argparse._ArgumentGroup, full: Mapping[str, Any], quick: Mapping[str, Any],
                      checkpoint_every: int) -> None:
    """The options :func:`run_training` reads: ``--iters`` and ``--valid-every`` (their defaults
    ``full``'s and ``quick``'s, for :func:`~pyro_ffjord.runs.fill_defaults`), ``--max-minutes``
    and ``--checkpoint-every``."""
    group.add_argument("--iters", type=runs.nonnegative_int, default=None,
                       help=f"at most this many (default {full['iters']}; --quick {quick['iters']})")
    group.add_argument("--max-minutes", type=runs.nonnegative_float, default=0.0, help="training-time budget (0: none)")
    group.add_argument("--valid-every", type=runs.positive_int, default=None,
                       help=f"iterations (default {full['valid_every']}; --quick {quick['valid_every']})")
    group.add_argument("--checkpoint-every", type=runs.nonnegative_int, default=checkpoint_every,
                       help="iterations (0: by minutes and Ctrl-C)")


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]], out: str) -> argparse.Namespace:
    """:func:`pyro_ffjord.runs.parse`, then ``--out`` if not given: ``out`` (formatted with the
    options, e.g. ``"out/tabular/{dataset}-{config}"``), ending in ``-quick`` for a ``--quick``
    run, which keeps its own folder."""
    args = runs.parse(parser, argv)
    if args.out is None:
        folder = os.path.normpath(out.format(**vars(args)))
        args.out = runs.quick_out(folder) if args.quick else folder
    return args


# -- the training objective: maximum likelihood or flow matching ---------------------------------
OBJECTIVES = ("mle", "fm")
FM_KEYS = ("objective", "coupling", "sigma_min", "mle_after")  # what --objective fm adds to a run's options
FM_LOSS_KIND = "flow matching"


def add_objective_args(group: argparse._ArgumentGroup) -> None:
    """``--objective`` (``mle``: the negative log-likelihood through the training solve; ``fm``:
    :func:`pyro_ffjord.flow_matching_loss`, no solve) and, for ``fm``, ``--coupling`` and
    ``--sigma-min`` (filled in by :func:`check_objective`)."""
    group.add_argument("--objective", choices=OBJECTIVES, default="mle",
                       help="training loss: mle = -log p of the batch (an ODE solve per step); fm = conditional "
                            "flow matching of the field (no solve; evaluation is the same exact-trace NLL)")
    group.add_argument("--coupling", choices=("independent", "ot"), default=None,
                       help="fm only (default ot): how base samples are paired with a batch; ot (minibatch "
                            "optimal transport) straightens the learned paths, so the adaptive evaluation "
                            "solve takes fewer steps and the regression targets vary less")
    group.add_argument("--sigma-min", type=float, default=None,
                       help="fm only (default 1e-4): width of the probability path at the data end, in [0, 1)")
    group.add_argument("--mle-after", type=float, default=None,
                       help="fm only: a mixed schedule, flow matching for this share (in (0, 1)) of --iters (and of "
                            "--max-minutes where there is one, whichever comes first), then maximum likelihood of "
                            "the same flow (Adam's moments restarted)")


def check_objective(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill ``--coupling`` (``ot``) and ``--sigma-min`` (1e-4) under ``--objective fm``; a usage
    error if they are given with ``mle`` or ``--sigma-min`` is outside ``[0, 1)``."""
    if args.objective != "fm":
        given = [name for name, value in (("--coupling", args.coupling), ("--sigma-min", args.sigma_min),
                                          ("--mle-after", args.mle_after)) if value is not None]
        if given:
            parser.error(f"{' and '.join(given)}: only with --objective fm")
        return
    args.coupling = args.coupling or "ot"
    args.sigma_min = 1e-4 if args.sigma_min is None else args.sigma_min
    if not (math.isfinite(args.sigma_min) and 0 <= args.sigma_min < 1):
        parser.error(f"argument --sigma-min: {args.sigma_min} is not in [0, 1)")
    if args.mle_after is not None and not 0 < args.mle_after < 1:
        parser.error(f"argument --mle-after: {args.mle_after} is not in (0, 1)")


def objective_now(args: argparse.Namespace, state: Dict[str, Any], training: runs.Training,
                  optimizer: torch.optim.Optimizer, world: Optional[distributed.World] = None) -> str:
    """The loss of the next step, ``"fm"`` or ``"mle"``. Under ``--mle-after`` the switch comes
    once ``state["iteration"]`` reaches that share of ``--iters`` or the training clock that share
    of ``--max-minutes`` (rank 0's clock under torchrun); then ``state["mle_from"]`` records the
    iteration (a resumed run stays on maximum likelihood) and Adam's moments are cleared: they
    were estimated on the flow-matching gradients, whose scale is not the likelihood's."""
    if args.objective == "mle" or state.get("mle_from") is not None:
        return "mle"
    if args.mle_after is None:
        return "fm"
    due = state["iteration"] >= args.mle_after * args.iters
    minutes = getattr(args, "max_minutes", 0.0)
    if minutes and not due:
        late = training.elapsed() >= args.mle_after * 60.0 * minutes
        due = late if world is None else world.broadcast(late)
    if not due:
        return "fm"
    state["mle_from"] = state["iteration"]
    optimizer.state.clear()
    return "mle"


def objective_words(args: argparse.Namespace) -> str:
    """The objective for a title: ``""`` (maximum likelihood), or how flow matching was used."""
    if args.objective == "mle":
        return ""
    return "flow matching, then maximum likelihood" if args.mle_after else "flow matching"


def objective_free(args: argparse.Namespace) -> Tuple[str, ...]:
    """The options to leave out of a run's configuration for its objective: under ``mle`` the
    objective's own (so that a maximum-likelihood run's configuration, and its checkpoints, are
    what they were before ``--objective``); under ``fm`` none, so ``--resume`` refuses a change."""
    return FM_KEYS if args.objective == "mle" else ()


def curve_labels(args: argparse.Namespace, state: Mapping[str, Any], unit: str, mle_label: str) -> Dict[str, Any]:
    """The training curve's ``train_label`` and ``train_axis`` for :func:`plot_learning_curves`:
    flow-matching losses (alone, or then ``unit``) get their own axis; maximum likelihood's
    batches (``mle_label``) share the validation score's."""
    if args.objective == "mle":
        return dict(train_label=mle_label, train_axis=None)
    if state.get("mle_from") is None:
        return dict(train_label="training batch flow-matching loss", train_axis="flow-matching loss")
    return dict(train_label=f"training batch: flow matching, then {unit} from iteration {state['mle_from']}",
                train_axis=f"training: flow-matching loss, then {unit}")


def objective_results(args: argparse.Namespace, state: Mapping[str, Any]) -> Dict[str, Any]:
    """What the results record of the objective: ``objective`` (and ``coupling``, ``sigma_min``,
    ``mle_after`` and ``mle_from``, the first maximum-likelihood iteration, for ``fm``) and
    ``train_loss_kind``, what the per-batch ``losses`` are."""
    if args.objective == "mle":
        return dict(objective="mle", train_loss_kind="negative log-likelihood")
    mle_from = state.get("mle_from")
    kind = FM_LOSS_KIND if mle_from is None else f"{FM_LOSS_KIND}, then negative log-likelihood from iteration " \
                                                 f"{mle_from} (losses[{mle_from}:])"
    return dict(objective="fm", coupling=args.coupling, sigma_min=args.sigma_min, mle_after=args.mle_after,
                mle_from=mle_from, train_loss_kind=kind)


# -- the training state and its checkpoint ------------------------------------------------------
def new_state(cnfs: Sequence[nn.Module], **extra: Any) -> Dict[str, Any]:
    """A fresh run's training state, all of it saved in the checkpoint: ``iteration``, the
    ``losses`` and training ``clock`` of each iteration, the validation ``history``, the best
    model on validation so far (``best_valid``, ``best_iteration``, ``best_model``), each CNF's
    count of fixed-grid training solves (``training_solves``: when its drift check runs), the
    first maximum-likelihood iteration of a mixed schedule (``mle_from``, :func:`objective_now`)
    and the example's own entries ``extra``."""
    return dict(iteration=0, losses=[], clock=[], history=[], best_valid=math.inf, best_iteration=None,
                best_model=None, training_solves=[0] * len(cnfs), mle_from=None, **extra)


def resume(training: runs.Training, model: nn.Module, cnfs: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
           state: Dict[str, Any]) -> None:
    """Under ``--resume``: load the checkpoint's ``model``, ``optimizer`` and ``state`` (the
    random state restored, one of other options refused: :meth:`~pyro_ffjord.runs.Training.resume`)
    and put back each CNF's drift-check schedule. A fresh run: nothing to do."""
    ck = training.resume()
    if ck is None:
        return
    model.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    state.update((k, ck[k]) for k in state if k in ck)  # a checkpoint from before mle_from lacks it
    for cnf, solves in zip(cnfs, state["training_solves"]):
        cnf.stats.training_solves = solves


def checkpointer(state: Dict[str, Any], model: nn.Module, cnfs: Sequence[nn.Module],
                 optimizer: torch.optim.Optimizer) -> Callable[[], Dict[str, Any]]:
    """What :meth:`~pyro_ffjord.runs.Training.step` saves: ``state`` (the CNFs' training solves
    brought up to date), the model's and the optimizer's state dicts."""
    def checkpoint() -> Dict[str, Any]:
        state["training_solves"] = [cnf.stats.training_solves for cnf in cnfs]
        return dict(state, model=model.state_dict(), optimizer=optimizer.state_dict())

    return checkpoint


def epoch_batches(n: int, batch_size: int, seed: int) -> Callable[[int], Tensor]:
    """``batch(it)``: the indices (of ``n`` rows) of iteration ``it``'s batch. Epoch ``e`` visits
    the rows in the order ``np.random.default_rng([seed, e]).permutation(n)``, which depends on
    ``(seed, e)`` only: a resumed run draws the same batches with nothing saved.

    Under torchrun every rank draws this same global batch and trains on its contiguous share
    (:meth:`~pyro_ffjord.distributed.World.share`). Like ``DistributedSampler`` with
    ``set_epoch(e)``, all ranks shuffle with one epoch-seeded permutation and see disjoint rows;
    unlike it (which strides each rank over the whole epoch), step ``it``'s global batch is the
    single-process one, so a run on N processes is the same run as on one, and resumes on any."""
    per_epoch, order = math.ceil(n / batch_size), {}

    def batch(it: int) -> Tensor:
        epoch, k = divmod(it, per_epoch)
        if epoch not in order:
            order.clear()
            order[epoch] = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
        return order[epoch][k * batch_size : (k + 1) * batch_size]

    return batch


# -- the training loop --------------------------------------------------------------------------
def parallel(world: distributed.World, training: runs.Training, args: argparse.Namespace, state: Mapping[str, Any],
             loss: Callable[..., Tensor], *modules: nn.Module) -> nn.Module:
    """The training loss ``loss(batch)`` as a module, wrapped in DistributedDataParallel under
    torchrun (a single process: as it is), after :func:`resume` loaded the parameters, so DDP
    starts every rank from the same ones. A resumed run's ranks ``r > 0`` are reseeded
    (:meth:`~pyro_ffjord.distributed.World.reseed_resumed`: the checkpoint holds rank 0's
    random state). Flow matching leaves a learned end time out of the loss: DDP is told so."""
    if training.resumed:
        world.reseed_resumed(args.seed, state["iteration"])
    return world.wrap(distributed.Objective(loss, *modules), find_unused=args.objective == "fm")


def run_training(args: argparse.Namespace, training: runs.Training, state: Dict[str, Any],
                 checkpoint: Callable[[], Dict[str, Any]], step: Callable[[int], float],
                 validate: Callable[[int], None], desc: str, progress: Callable[[], Dict[str, Any]],
                 stopped: Callable[[], bool] = lambda: False, world: Optional[distributed.World] = None) -> str:
    """The training loop: ``step(it)`` (one optimizer step on iteration ``it``'s batch, returning
    its loss) for ``it`` from ``state["iteration"]`` to ``args.iters``, on ``training``'s clock,
    with a progress bar (``desc``, and ``progress()``'s entries). After each step: its loss and
    the clock recorded in ``state``, ``validate(done)`` every ``args.valid_every`` iterations,
    and a checkpoint when due (every ``args.checkpoint_every`` iterations, at the end, when it
    stops; :meth:`~pyro_ffjord.runs.Training.step` adds its own). It stops early once
    ``args.max_minutes`` of training passed (0: no limit) or ``stopped()``. Returns
    ``"iters"`` or ``"max_minutes"``: why it ended, unless ``stopped()`` (the caller's reason).

    Under torchrun (``world``, :mod:`pyro_ffjord.distributed`): rank 0 alone writes checkpoints
    and its clock decides the time budget for every rank; ``stopped()`` must agree on all ranks
    (the caller broadcasts its decisions)."""
    budget, world = 60.0 * args.max_minutes, world or distributed.World()

    def out_of_time() -> bool:
        return budget > 0 and world.broadcast(training.elapsed() >= budget)

    start = state["iteration"]
    bar = tqdm(range(start, args.iters), initial=start, total=args.iters, desc=desc, disable=args.no_progress,
               dynamic_ncols=True)
    with training.loop(start):
        training.segments[-1]["world_size"] = world.world_size  # a resumed run may use another
        late = out_of_time()  # one reading per iteration (under torchrun, one broadcast)
        for it in bar:
            if stopped() or late:
                break
            loss = step(it)
            state["iteration"] = done = it + 1
            state["losses"].append(loss)
            state["clock"].append(training.elapsed())
            if done % args.valid_every == 0:
                validate(done)
            bar.set_postfix(**progress(), refresh=False)
            every = bool(args.checkpoint_every) and done % args.checkpoint_every == 0
            late = out_of_time()
            due = every or done == args.iters or stopped() or late
            if world.is_main:
                training.step(done, checkpoint, due=due)
        if world.is_main and not training.path.exists():  # --iters 0: still leave a checkpoint
            training.save(state["iteration"], checkpoint)
    bar.close()
    return "iters" if state["iteration"] >= args.iters else "max_minutes"


# -- the best model on validation ---------------------------------------------------------------
def keep_if_best(state: Dict[str, Any], model: nn.Module, value: float, iteration: int) -> bool:
    """Whether the validation score ``value`` (lower is better) at ``iteration`` beats
    ``state["best_valid"]``; if so, a copy of ``model``'s parameters becomes the best model."""
    if not value < state["best_valid"]:
        return False
    best = {k: t.detach().clone() if torch.is_tensor(t) else t for k, t in model.state_dict().items()}
    state.update(best_valid=value, best_iteration=iteration, best_model=best)
    return True


def load_best(state: Mapping[str, Any], model: nn.Module, done: int, score_last: Optional[Callable[[], float]],
              last_by_default: bool = False) -> Tuple[float, Optional[int]]:
    """Load the best model on validation into ``model`` (the last iterate, after ``done``
    iterations, as it is) to be tested; returns its validation score and iteration.

    The last iterate competes if it was never validated: ``score_last()`` scores it (``None``:
    it does not compete). With ``last_by_default`` it is also chosen when no validation kept a
    best model (e.g. none was finite)."""
    best_valid, best_iteration = state["best_valid"], state["best_iteration"]
    history = state["history"]
    if score_last is not None and (not history or history[-1]["iteration"] != done):
        last = score_last()
        if last < best_valid or (last_by_default and best_iteration is None):
            best_valid, best_iteration = last, done
    if best_iteration != done and state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    return best_valid, best_iteration


# -- pictures -----------------------------------------------------------------------------------
def save_figure(fig: plt.Figure, path: str, title: str, fontsize: int = 10) -> None:
    """Title ``fig`` (wrapped to its width), lay it out, write it to ``path`` (100 dpi) and close it."""
    chars = int(fig.get_figwidth() * 72 / (0.55 * fontsize))  # about one character per 0.55 em
    fig.suptitle(textwrap.fill(title, width=chars), fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fit_view(axis: plt.Axes, values: Sequence[float], keep: Sequence[float] = ()) -> None:
    """y-limits from the lowest of ``values`` and ``keep`` to the 95th percentile of ``values`` or
    the highest of ``keep``: a wild first batch does not flatten the rest."""
    if not values and not keep:
        return
    low = min([*values, *keep])
    high = max(([float(np.quantile(values, 0.95))] if values else []) + list(keep))
    pad = 0.05 * (high - low) if high > low else 1.0
    axis.set_ylim(low - pad, high + pad)


def plot_learning_curves(path: str, clock: Sequence[float], losses: Sequence[float],
                         history: Sequence[Mapping[str, Any]], key: str, title: str,
                         best_iteration: Optional[int] = None, *, ylabel: str, train_label: str,
                         valid_label: str, running_mean: bool = False,
                         reference: Optional[Tuple[str, float]] = None, train_axis: Optional[str] = None) -> None:
    """The training loss of each batch and the validation score (``history``'s ``key``, the
    best iteration starred) against training time. ``running_mean``: the batches faded under
    their running mean (over a fiftieth of the run); ``reference``: ``(label, value)``, a dotted
    line kept in view; ``train_axis``: the training losses are another quantity (flow
    matching's), drawn against their own right-hand axis of that label. A wild first batch does
    not flatten the rest: an axis ends at the 95th percentile of the losses (or the highest
    validation score)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    tax = ax.twinx() if train_axis else ax
    values = [v for v in losses if math.isfinite(v)]
    if losses:
        lw, alpha = (0.5, 0.35) if running_mean else (0.6, 0.5)
        tax.plot(clock, losses, lw=lw, alpha=alpha, color="C0", label=train_label)
        window = max(1, len(losses) // 50)
        if running_mean and window > 1:
            mean = np.convolve(losses, np.ones(window) / window, mode="valid")
            tax.plot(clock[window - 1:], mean, color="C0", label=f"training, mean of {window} batches")
    valid = [(h["seconds"], h[key], h["iteration"]) for h in history if math.isfinite(h[key])]
    if valid:
        ax.plot([v[0] for v in valid], [v[1] for v in valid], "o-", ms=3, color="C1", label=valid_label)
        best = [v for v in valid if v[2] == best_iteration]
        if best:
            ax.plot(best[0][0], best[0][1], "*", ms=12, color="C3", label=f"best (iteration {best_iteration})")
    if reference is not None:
        ax.axhline(reference[1], color="k", ls=":", lw=1, label=reference[0])
    keep = [v[1] for v in valid] + ([] if reference is None else [reference[1]])
    if train_axis:
        ax.set_zorder(tax.get_zorder() + 1)  # the validation score over the batches' cloud
        ax.patch.set_visible(False)
        _fit_view(tax, values)
        _fit_view(ax, [], keep)
        tax.set_ylabel(train_axis)
    else:
        _fit_view(ax, values + [v[1] for v in valid], keep)
    ax.set(xlabel="training time (s; validation and checkpoints excluded)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    handles = [h for a in {ax: None, tax: None} for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles=handles, fontsize=8)
    save_figure(fig, path, title)
