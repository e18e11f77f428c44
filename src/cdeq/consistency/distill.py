"""Consistency distillation: train the student on recorded teacher trajectories.

For a recorded point ``z_n`` at time ``t_n`` and the next recorded point ``z_m`` (``m > n``):

    L = w_g d(F(z_n, t_n), z*) + w_l d(F(z_n, t_n), sg F_ema(z_m, t_m)) + w_task task(h(F(z_n, t_n)), y)
        [+ w_kl KL(h(z*) || h(F(z_n, t_n)))] [+ sum_j w_j term_j]

The last sum holds the caller's extra terms (:class:`LossTerm`), each given the step's recorded
minibatch, its injection and its row weights; C-DEQ+ adds its start term that way
(:class:`cdeq.consistency.plus.StartTerm`).

``d`` is the squared distance relative to ``|z*|^2`` (so ``sqrt(d)`` is the relative error) or its
pseudo-Huber version; samples whose solution residual exceeds ``max_residual`` drop out of the
consistency terms.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F_
from torch import Tensor, nn
from torch.utils._pytree import tree_structure

from ..deq.layer import SolverSpec
from ..engine import distributed
from ..engine.config import Config, check_choice, check_int, check_positive, check_range
from ..engine.fit import Hooks, OptimConfig, fit, model_device
from ..engine.precision import to_device
from ..engine.tree import Layout, leaves, squared_norms, tree_map
from .arrays import TrajectoryArrays
from .ema import EMA
from .pairs import PairSampler, get_pair_sampler
from .student import ConsistencyStudent
from .trajectory import TrajectoryBatch, check_labels

TaskBatches = Callable[[torch.Generator], Iterable[tuple[Any, Any]]]
"""``generator -> (x, y)`` training batches, reshuffled by the generator."""


@dataclasses.dataclass
class DistillConfig(Config):
    """Distillation settings (the OPEN choices of the method are all here).

    Attributes:
        epochs, batch_size: the loop's length and minibatch (of recorded samples).
        optim: the optimiser loop (:class:`cdeq.engine.fit.OptimConfig`).
        global_weight, local_weight, task_weight, kl_weight: the loss weights.
        ema_decay: decay of the target network for the local term.
        distance: ``mse`` (relative squared error) or ``huber`` (pseudo-Huber of it).
        pairs: a registered pair sampler, by name or ``{"name": ..., **options}``: ``uniform``
            (option ``gap``), ``early`` (weights ``(n+1)^-power``) or ``curriculum`` (target ``m``
            moves from the end of the path to ``n + final_gap`` over training).
        max_residual: drop samples whose recorded solution residual is above this.
        train_cell, train_head: fine-tune the copied layer / head, or freeze them.
        loader_workers: ``DataLoader`` worker processes reading stored per-sample trajectories
            (:mod:`cdeq.consistency.arrays`; 0: read in the training process).
    """

    epochs: int = 30
    batch_size: int = 64
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0, grad_clip=1.0))
    global_weight: float = 0.9
    local_weight: float = 0.1
    task_weight: float = 0.1
    kl_weight: float = 0.0
    ema_decay: float = 0.98
    distance: str = "mse"
    pairs: str | dict = "uniform"
    max_residual: float = 1e-2
    train_cell: bool = True
    train_head: bool = True
    loader_workers: int = 0

    def validate(self) -> None:
        check_int("loader_workers", self.loader_workers, minimum=0)
        check_int("epochs", self.epochs, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        for name in ("global_weight", "local_weight", "task_weight", "kl_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)
        check_range("ema_decay", self.ema_decay, 0.0, 1.0)
        check_choice("distance", self.distance, ["mse", "huber"])
        get_pair_sampler(self.pairs)
        check_positive("max_residual", self.max_residual)


@dataclasses.dataclass
class TermInputs:
    """What an extra loss term sees of one distillation step (this rank's rows).

    Attributes:
        student: the student being trained.
        batch: the recorded minibatch (``x``, ``y``, ``z_star`` ``(B, ...)``...).
        u: the student's injection of ``batch.x``.
        weight: ``(B,)`` each row's weight in the consistency terms (unconverged rows 0; the rows'
            weights sum to one over the global minibatch).
        share: this rank's share of a mean over the global minibatch (1 in one process).
        config: the distillation settings.
        task_loss: ``(logits, y) -> mean loss``, or ``None``.
        index: the step's index in its epoch (a batch that cannot be split by rows, such as a
            graph, is computed by rank ``index % N``: :func:`cdeq.engine.distributed.part`).
    """

    student: ConsistencyStudent
    batch: TrajectoryBatch
    u: Any
    weight: Tensor
    share: float
    config: DistillConfig
    task_loss: Callable[[Tensor, Any], Tensor] | None
    index: int = 0


class LossTerm:
    """An extra term of the distillation loss: ``weight * term(inputs)`` is added to the step's
    loss, its value logged as ``name`` in the history.

    Subclasses implement :meth:`__call__`; a term that reads training data of its own (not the
    recorded minibatch) says how many samples it read in :attr:`samples` (they count in the
    history's ``samples``)."""

    name: str = "extra"
    weight: float = 1.0

    def __call__(self, inputs: TermInputs) -> Tensor:
        """The term's value (a 0-dim tensor, before :attr:`weight`), summed over ranks like the
        loss: weight rows by ``inputs.weight`` or means by ``inputs.share``."""
        raise NotImplementedError

    @property
    def samples(self) -> int:
        """Training samples the last call read on this rank besides the recorded minibatch."""
        return 0


# --- losses ---------------------------------------------------------------------------------------
def relative_distance(a: Any, b: Any, ref: Any, kind: str = "mse") -> Tensor:
    """Per-sample ``|a - b|^2 / |ref|^2`` (``mse``) or its pseudo-Huber form, shape ``(B,)``; for
    structured states the squared norms are summed over the parts."""
    if isinstance(a, Tensor):
        bsz = a.shape[0]
        d = (a - b).reshape(bsz, -1).pow(2).sum(1) / (ref.reshape(bsz, -1).pow(2).sum(1) + 1e-8)
    else:
        d = squared_norms(tree_map(torch.sub, a, b)) / (squared_norms(ref) + 1e-8)
    if kind == "huber":
        c = 0.03
        d = torch.sqrt(d + c * c) - c
    return d


def _select(points: Any, z_star: Any, idx: Tensor) -> Any:
    """``points (B, L, ...)`` with ``z*`` appended as point ``L``; pick ``idx (B,)`` (part by part
    for a structured state)."""
    def pick(points: Tensor, z_star: Tensor) -> Tensor:
        full = torch.cat([points, z_star[:, None]], dim=1)
        return full[torch.arange(full.shape[0], device=full.device), idx]

    return tree_map(pick, points, z_star)


def _grid_index(batch: TrajectoryBatch, idx: Tensor) -> Tensor:
    """``(B,)`` the iterate index of each sample's point ``idx`` (``L``: the equilibrium)."""
    grid = batch.grid().to(idx.device)
    full = torch.cat([grid, torch.full_like(grid[:, :1], batch.last)], dim=1)
    return full[torch.arange(full.shape[0], device=idx.device), idx]


def _times(student: ConsistencyStudent, batch: TrajectoryBatch, idx: Tensor) -> Tensor:
    index = _grid_index(batch, idx)
    res = torch.cat([batch.residual, batch.star_residual[:, None]], dim=1)
    res = res[torch.arange(res.shape[0], device=res.device), idx.to(res.device)]
    return student.schedule.times(index, batch.last, res)


def _take(batch: TrajectoryBatch, rows: Tensor) -> TrajectoryBatch:
    """Rows ``rows`` of a recorded batch."""
    return batch.take(rows)


def _states(student: ConsistencyStudent, mb: TrajectoryBatch, idx: list[Tensor], solver: Any
            ) -> list[Any]:
    """The states at points ``idx`` (each ``(B,)``; ``L`` is ``z*``) of each sample: read from the
    recorded iterates, or (online: none recorded) regenerated by the teacher's solver, each sample
    solved only as far as the latest iterate it needs."""
    if mb.iterates is not None:
        return [_select(mb.iterates, mb.z_star, i) for i in idx]
    from .online import regenerate

    b, last = mb.batch_size, mb.num_points
    grid = torch.stack([_grid_index(mb, i) for i in idx], dim=1)  # (B, J)
    at_star = torch.stack([i == last for i in idx], dim=1)
    need = torch.where(at_star, torch.zeros_like(grid), grid)  # z* is not regenerated
    with torch.no_grad():
        u_t = student.teacher.inject(mb.x)
    made = regenerate(student.teacher, need, u_t, solver)  # (B, J, ...) per part
    out = []
    for j in range(len(idx)):
        def pick(t: Tensor, star: Tensor, j: int = j) -> Tensor:
            mask = at_star[:, j].reshape(b, *([1] * (star.dim() - 1)))
            return torch.where(mask, star, t[:, j].to(star.dtype))
        out.append(tree_map(pick, made, mb.z_star))
    return out


def _minibatches(batch: TrajectoryBatch, size: int, gen: torch.Generator):
    """Split a recorded batch into random minibatches (single-example batches pass through)."""
    n = batch.batch_size
    if n <= size:
        yield batch
        return
    perm = torch.randperm(n, generator=gen, device=gen.device)  # the same order on every rank
    for start in range(0, n, size):
        yield _take(batch, perm[start : start + size])


def trainable_parameters(student: nn.Module) -> list[nn.Parameter]:
    """The student's own parameters that require gradients: ``student.trainable_parameters()``
    when the student has it (the teacher left out), otherwise every parameter with requires_grad."""
    own = student.trainable_parameters() if hasattr(student, "trainable_parameters") \
        else student.parameters()
    return [p for p in own if p.requires_grad]


def _inject(student: ConsistencyStudent, x: Any) -> Any:
    """The student's injection of ``x``; the teacher's own (shared) injection runs without grad."""
    if getattr(student, "injection", None) is None:
        with torch.no_grad():
            return student.inject(x)
    return student.inject(x)


def distill(
    student: ConsistencyStudent,
    trajectories: Sequence[TrajectoryBatch] | Any,
    config: DistillConfig,
    task_loss: Callable[[Tensor, Any], Tensor] | None = None,
    seed: int = 0,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    start_epoch: int = 0,
    resume_state: dict | None = None,
    terms: Sequence[LossTerm] = (),
) -> dict[str, list]:
    """Train ``student`` in place on recorded ``trajectories`` with :func:`cdeq.engine.fit.fit`; returns the
    history (per epoch: ``loss``, ``global``, ``local``, ``task``, ``samples``, cumulative ``steps``,
    ``epoch_time``).

    Args:
        trajectories: a sequence of :class:`TrajectoryBatch` or a :class:`TrajectoryStore`
            (streamed shard by shard, in a random order each epoch).
        task_loss: ``(logits, y) -> loss``; required when ``task_weight > 0``.
        on_epoch_end: called with ``(epoch, state)`` after each epoch (checkpointing); ``start_epoch``
            and ``resume_state`` (that state) resume a run.
        terms: extra loss terms (:class:`LossTerm`), added to every step's loss in order.
    """
    if config.task_weight > 0 and task_loss is None:
        raise ValueError("task_weight > 0 needs task_loss=(logits, y) -> loss")
    for p in student.cell.parameters():
        p.requires_grad_(config.train_cell)
    for p in student.head.parameters():
        p.requires_grad_(config.train_head)
    n_batches = len(trajectories)
    if n_batches == 0:
        raise ValueError("no trajectories to distil from: the record stage produced no batch")
    device = model_device(student)
    arrays = isinstance(trajectories, TrajectoryArrays)
    check_trajectory_shapes(student, to_device(trajectories[0], device))
    solver = None  # the online source: the iterates are regenerated with the recording's solver
    if arrays and trajectories.keep == 0:
        solver = SolverSpec.from_dict(trajectories.manifest()["solver"]).build()
    ema = EMA(student, decay=config.ema_decay)
    if resume_state is not None:
        ema.target.load_state_dict(resume_state["ema"])
        ema.steps = resume_state["ema_steps"]
    sampler = get_pair_sampler(config.pairs)

    def batches(epoch: int, gen: torch.Generator):
        if arrays:  # minibatches drawn across shards, each rank reading its rows
            loader = trajectories.loader(config.batch_size, seed, epoch, workers=config.loader_workers,
                                         pin_memory=device.type == "cuda")
            for j, mb in enumerate(loader):
                yield to_device(mb, device), gen, j
            return
        order = list(range(n_batches))
        random.Random(seed * 1000 + epoch).shuffle(order)
        j = 0
        for i in order:  # a recorded batch (read to the CPU) is moved to the student's device
            for mb in _minibatches(to_device(trajectories[i], device), config.batch_size, gen):
                yield mb, gen, j  # the pair draws use the loop's per-epoch generator too
                j += 1

    names = ["global", "local", "task", "loss"] + [term.name for term in terms]

    def step(batch: tuple[TrajectoryBatch, torch.Generator, int], progress_: float
             ) -> tuple[Tensor | None, dict[str, Any]]:
        # Under torchrun every rank draws the same pairs for the global minibatch and computes its
        # own rows (or, for a minibatch that cannot be split, its owner computes it whole); the
        # parts are scaled so that their sum over ranks is the global loss.
        mb, gen, index = batch
        out = _loss(student, ema, mb, config, sampler, progress_, gen, task_loss, terms, index,
                    solver, checking["on"])
        if out is None:
            return None, {**dict.fromkeys(names, 0.0), "samples": 0}
        parts, rows = out
        distributed.TALLY.add("distill", rows)
        return parts["loss"], {**{k: v.detach() for k, v in parts.items()}, "samples": rows}

    checking = {"on": True}

    def start(epoch: int) -> None:
        student.teacher.eval()  # the frozen teacher (and a shared injection) runs without dropout
        checking["on"] = epoch == start_epoch  # labels are checked in the first epoch run

    hooks = Hooks(on_epoch_start=start, on_epoch_end=on_epoch_end, after_step=lambda: ema.update(student),
                  extra_state=lambda: {"ema": ema.target.state_dict(), "ema_steps": ema.steps})
    history = fit(student, step, batches, config.optim, epochs=config.epochs,
                  steps_per_epoch=_steps_per_epoch(trajectories, config.batch_size),
                  params=trainable_parameters(student), seed=seed, name="distillation", hooks=hooks,
                  hint="check the recorded trajectories for NaN/inf or lower distill.optim.lr",
                  start_epoch=start_epoch, state=resume_state)
    student.eval()
    return history


def check_trajectory_shapes(student: ConsistencyStudent, batch: TrajectoryBatch) -> None:
    """The recorded states must have the structure and shape of the student's state: a clear
    error naming the part otherwise."""
    with torch.no_grad():
        z = student.initial_state(student.inject(batch.x))
    layout = Layout.of(z)
    if batch.iterates is None:  # the online source keeps no iterate: z* alone is checked
        batch = dataclasses.replace(batch, iterates=tree_map(
            lambda t: t[:, None].expand(-1, batch.num_points, *t.shape[1:]), batch.z_star))
    if not isinstance(z, Tensor) and (tree_structure(batch.z_star) != layout.spec
                                      or tree_structure(batch.iterates) != layout.spec):
        raise ValueError(
            f"the trajectories do not match the model: the student's state has the parts "
            f"{layout.names}, the recorded z_star {Layout.of(batch.z_star).names}; were they "
            "recorded with another model?")
    for name, state, star, its in zip(layout.names, layout.leaves(z), leaves(batch.z_star),
                                      leaves(batch.iterates), strict=True):
        state, star, its = tuple(state.shape), tuple(star.shape), tuple(its.shape)
        part = f" (part z{name})" if name else ""
        if star != state or its[:1] + its[2:] != state or its[1] != batch.num_points:
            raise ValueError(
                f"the trajectories do not match the model{part}: z_star has shape {star} and "
                f"iterates {its}, but the student's state for these inputs has shape {state} "
                f"(iterates should be {(state[0], len(batch.index), *state[1:])}); were they "
                "recorded with another model?")


def _steps_per_epoch(trajectories: Any, batch_size: int) -> int:
    if isinstance(trajectories, TrajectoryArrays):
        return trajectories.steps_per_epoch(batch_size)
    if isinstance(trajectories, Sequence):
        return sum(max(1, -(-t.batch_size // batch_size)) for t in trajectories)
    manifest = trajectories.manifest()  # a TrajectoryStore: estimate from the sample count
    return max(int(manifest["shards"]), -(-int(manifest["samples"]) // batch_size))


def _loss(student: ConsistencyStudent, ema: EMA, mb: TrajectoryBatch, config: DistillConfig,
          sampler: PairSampler, progress_: float, gen: torch.Generator,
          task_loss: Callable | None, terms: Sequence[LossTerm] = (), index: int = 0,
          solver: Any = None, check: bool = True) -> tuple[dict[str, Tensor], int] | None:
    """This rank's part of minibatch ``index``'s loss terms and the rows it computed (training
    samples); ``None`` when this rank computes nothing of it (another rank owns the unsplittable
    minibatch, or this rank's part of a minibatch with fewer rows than ranks is empty). ``check``: check the
    labels' range (a host read; the first epoch of a run does)."""
    bsz, num_points = (mb.part[2] if mb.part else mb.batch_size), mb.num_points
    star = leaves(mb.z_star)[0]
    n, m = sampler.sample(bsz, num_points, progress_, gen)  # the same draws on every rank
    n, m = n.to(star.device), m.to(star.device)
    star_res = mb.global_star_residual if mb.part else mb.star_residual
    keep = (star_res.to(star.device) <= config.max_residual).to(star.dtype)
    weight = keep / keep.sum().clamp_min(1.0)  # normalised over the global minibatch
    share = 1.0
    if mb.part is not None:  # this rank read only its rows of the global minibatch
        lo, hi, _ = mb.part
        if hi == lo:
            return None  # fewer rows than ranks: the others compute this minibatch
        n, m, weight, share = n[lo:hi], m[lo:hi], weight[lo:hi], (hi - lo) / bsz
    elif distributed.world_size() > 1:
        if distributed.splittable(mb.x, mb.y) and bsz >= distributed.world_size():
            lo, hi = distributed.split_range(bsz)  # this rank's rows
            rows = torch.arange(lo, hi, device=star.device)
            mb = _take(mb, rows)
            n, m, weight, share = n[rows], m[rows], weight[rows], (hi - lo) / bsz
        elif distributed.owner(index) != distributed.rank():
            return None  # another rank computes this minibatch whole
    # consistency terms are sums of globally weighted rows: they sum over ranks to the global loss
    wanted = [n, m] if config.local_weight > 0 else [n]
    states = _states(student, mb, wanted, solver)
    z_n = states[0]
    t_n = _times(student, mb, n).to(star.dtype)
    u = _inject(student, mb.x)
    out = student.F(z_n, t_n, u)
    zero = star.new_zeros(())
    parts = {"global": zero, "local": zero, "task": zero}
    if config.global_weight > 0:
        parts["global"] = (relative_distance(out, mb.z_star, mb.z_star, config.distance) * weight).sum()
    if config.local_weight > 0:
        with torch.no_grad():
            z_m = states[1]
            t_m = _times(student, mb, m).to(star.dtype)
            target = ema.target.F(z_m, t_m, ema.target.inject(mb.x))
        parts["local"] = (relative_distance(out, target, mb.z_star, config.distance) * weight).sum()
    if config.task_weight > 0 or config.kl_weight > 0:
        logits = student.head(out)
        task = zero
        if config.task_weight > 0:
            if check:
                check_labels(logits, mb.y, "distill")
            task = config.task_weight * share * task_loss(logits, mb.y)
        if config.kl_weight > 0:
            with torch.no_grad():
                ref = student.teacher.head(mb.z_star)
            task = task + config.kl_weight * share * F_.kl_div(
                F_.log_softmax(logits, -1), F_.log_softmax(ref, -1), log_target=True,
                reduction="batchmean")
        parts["task"] = task
    parts["loss"] = (config.global_weight * parts["global"] + config.local_weight * parts["local"]
                     + parts["task"])
    rows = mb.batch_size
    if terms:
        inputs = TermInputs(student, mb, u, weight, share, config, task_loss, index)
        for term in terms:
            parts[term.name] = term(inputs)
            parts["loss"] = parts["loss"] + term.weight * parts[term.name]
            rows += term.samples
    return parts, rows
