"""Task ``ogbn``: node classification on a large graph in OGB's layout, on sampled subgraphs.

The graph is parsed once into a store (:mod:`.ogb`, :mod:`.store`) and read through memory maps.
Every batch is a subgraph sampled around a set of seed nodes (:mod:`.sampler`): the teacher trains,
the trajectories are recorded, the student distils and every method is evaluated on such batches,
so memory follows the batch, not the graph. The setting is transductive, as OGB's: the whole graph
(test nodes' features and edges included) may appear around the seeds; only the seeds' labels
are scored.

- training batches: the training nodes in a shuffled order, ``batch_nodes`` seeds a batch, each
  with freshly drawn neighbours;
- recorded batches: ``record_batches`` fixed training batches (their sampled nodes' rows only);
- validation (every choice) and test batches: the split's nodes in order, ``eval_nodes`` seeds a
  batch, with neighbours drawn from a fixed seed, so every method sees the same subgraphs.

The implicit layer over a sampled subgraph approximates the full graph's fixed point. The report's
``data.subgraph_gap`` measures how far, on the seeds of ``gap_batches`` batches of each held-out
split, against the full-graph fixed point computed in node chunks (:mod:`.full`): accuracy there
and on the full graph, and the relative error to the full-graph ``z*``.

Example:
    >>> task = OgbnTask(OgbnConfig(data="ogbn-arxiv/"))        # doctest: +SKIP
    >>> (x, adj), (labels, seeds) = next(iter(task.train_batches(1)))   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ...deq.model import DEQModel
from ...engine.config import Config, ConfigError, check_choice, check_int
from ..base import Batch, register_task
from . import presets
from .data import GraphDataError
from .full import full_fixed_point, subgraph_gap
from .model import GraphInjection, IGNNCell, NodeHead
from .ogb import load_ogb
from .sampler import NeighbourSampler
from .store import GraphStore
from .task import GraphTask, check_ignn

__all__ = ["OgbnConfig", "OgbnTask"]

_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2, "record": 3}


@dataclasses.dataclass
class OgbnConfig(Config):
    """Settings of the ``ogbn`` task.

    Attributes:
        data: the OGB dataset folder (``raw/``, ``split/``), or a store folder (:mod:`.store`).
        split: the ``split/`` sub-folder (``""``: the only one).
        cache: where the parsed store goes (``""``: ``$CDEQ_CACHE/graphs`` or ``~/.cache/cdeq/graphs``).
        size: ``""`` or ``"paper"``: the IGNN width of the paper preset (``presets.OGBN_PAPER``) in
            place of the fields left at their defaults, and its run settings.
        hidden: the IGNN's state width (the other model fields as in :class:`~.task.GraphConfig`:
            ``kappa``, ``w_constraint``, ``w_init``, ``activation``, ``inject_hops``,
            ``input_dropout``, ``head_dropout``, ``head_hidden``).
        fanouts: neighbours drawn per node at each hop (:mod:`.sampler`).
        norm: ``"sub"`` or ``"full"``: the degrees that normalise a batch's adjacency (``"sub"``,
            the subgraph's own, chosen on validation data: docs/large-data.md).
        batch_nodes: seed nodes of a training (and recorded) batch.
        eval_nodes: seed nodes of a validation or test batch.
        epoch_batches: training batches an epoch (0: every training node once).
        record_batches: training batches whose trajectories are recorded.
        eval_batches: validation and test batches (0: every node of the split).
        gap_batches: batches of each held-out split on which the report measures the distance to
            the full-graph fixed point (0: not measured).
        gap_chunk: nodes a block of the full-graph solve.
        sample_seed: seeds the fixed batches (recorded, validation, test).
    """

    data: str = ""
    split: str = ""
    cache: str = ""
    size: str = ""
    hidden: int = 64
    kappa: float = 0.9
    w_constraint: str = "scale"
    w_init: str = "identity"
    activation: str = "relu"
    inject_hops: int = 1
    input_dropout: float = 0.2
    head_dropout: float = 0.2
    head_hidden: int = 0
    fanouts: tuple = (10, 5)
    norm: str = "sub"
    batch_nodes: int = 1024
    eval_nodes: int = 2048
    epoch_batches: int = 0
    record_batches: int = 16
    eval_batches: int = 0
    gap_batches: int = 4
    gap_chunk: int = 65536
    sample_seed: int = 0

    def __post_init__(self) -> None:
        if self.size == "paper":
            self.fill_defaults(presets.OGBN_PAPER["task_config"])
        super().__post_init__()

    def validate(self) -> None:
        for key in ("data", "split", "cache"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key}={getattr(self, key)!r} is not valid; it must be a string")
        if not self.data:
            raise ConfigError("the ogbn task needs data: an OGB dataset folder (raw/, split/), "
                              "e.g. --data ogbn-arxiv/")
        check_choice("size", self.size, ["", "paper"])
        check_ignn(self)
        if not isinstance(self.fanouts, (list, tuple)) or any(
                isinstance(f, bool) or not isinstance(f, int) or f < 1 for f in self.fanouts):
            raise ConfigError(f"fanouts={self.fanouts!r} is not valid; give a list of positive integers "
                              "(neighbours per hop), e.g. [10, 5], or [] for the seeds alone")
        self.fanouts = tuple(self.fanouts)
        check_choice("norm", self.norm, ["full", "sub"])
        for key in ("batch_nodes", "eval_nodes", "record_batches", "gap_chunk"):
            check_int(key, getattr(self, key), minimum=1)
        for key in ("epoch_batches", "eval_batches", "gap_batches", "sample_seed"):
            check_int(key, getattr(self, key), minimum=0)


@register_task
class OgbnTask(GraphTask):
    """A large graph in OGB's node-property layout (ogbn-arxiv, ogbn-products), on sampled subgraphs."""

    name: ClassVar[str] = "ogbn"
    Config: ClassVar[type[Config]] = OgbnConfig
    paper: ClassVar[dict[str, Any] | None] = presets.OGBN_PAPER  # IGNN's width, larger subgraphs
    presets: ClassVar[dict[str, dict[str, Any]]] = presets.OGBN

    def __init__(self, config: OgbnConfig | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        cfg = self.config
        path = Path(cfg.data)
        if (path / "meta.json").is_file() and (path / "indptr.bin").is_file():
            self.store: GraphStore = GraphStore(path)  # a store already written (:mod:`.store`)
        else:
            self.store = load_ogb(path, cfg.split, cfg.cache)
        self.sampler = NeighbourSampler(self.store, cfg.fanouts, cfg.norm)
        self._gap: dict[str, Any] | None = None

    @classmethod
    def variants(cls, user: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
        """One run (OGB's transductive setting)."""
        return [(None, user)]

    # --- batches ------------------------------------------------------------------------------
    def _batches(self, ids: np.ndarray, per_batch: int, limit: int, seeds: Iterator[int]
                 ) -> Iterator[Batch]:
        count = -(-len(ids) // per_batch)
        if limit:
            count = min(count, limit)
        for b in range(count):
            rng = np.random.default_rng(next(seeds))
            yield self.sampler.batch(ids[b * per_batch : (b + 1) * per_batch], rng)

    def _fixed_seeds(self, split: str) -> Iterator[int]:
        b = 0
        while True:
            yield int(np.random.SeedSequence([self.config.sample_seed, _SPLIT_CODE[split], b])
                      .generate_state(1)[0])
            b += 1

    def train_batches(self, batch_size: int, shuffle: bool = True,
                      generator: torch.Generator | None = None) -> Iterator[Batch]:
        """Subgraphs around ``batch_nodes`` training seeds each (``batch_size`` does not apply: a
        batch is one subgraph). Shuffled: a fresh order and fresh neighbours drawn from
        ``generator``; otherwise the fixed order and draws of ``sample_seed``."""
        cfg = self.config
        ids = np.asarray(self.store.splits["train"])
        if not shuffle:
            return self._batches(ids, cfg.batch_nodes, cfg.epoch_batches, self._fixed_seeds("train"))
        gen = generator or torch.Generator()
        order = ids[torch.randperm(len(ids), generator=gen).numpy()]

        def drawn() -> Iterator[int]:
            while True:
                yield int(torch.randint(0, 2**62, (1,), generator=gen))

        return self._batches(order, cfg.batch_nodes, cfg.epoch_batches, drawn())

    def record_batches(self, batch_size: int) -> Iterator[Batch]:
        """``record_batches`` fixed training subgraphs (a seeded order of the training nodes)."""
        cfg = self.config
        ids = np.asarray(self.store.splits["train"])
        order = ids[np.random.default_rng([cfg.sample_seed, _SPLIT_CODE["record"]]).permutation(len(ids))]
        return self._batches(order, cfg.batch_nodes, cfg.record_batches, self._fixed_seeds("record"))

    def _held_out(self, split: str, limit: int | None = None) -> Iterator[Batch]:
        cfg = self.config
        ids = np.asarray(self.store.splits[split])
        return self._batches(ids, cfg.eval_nodes, cfg.eval_batches if limit is None else limit,
                             self._fixed_seeds(split))

    def selection_batches(self, batch_size: int) -> Iterator[Batch]:
        """The validation batches (never test nodes as seeds)."""
        return self._held_out("valid")

    def validation_batches(self, batch_size: int) -> Iterator[Batch]:
        """Subgraphs around the validation nodes, ``eval_nodes`` seeds each, fixed draws."""
        return self._held_out("valid")

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        """Subgraphs around the test nodes, ``eval_nodes`` seeds each, fixed draws."""
        return self._held_out("test")

    def split_sizes(self) -> dict[str, int]:
        """Labelled nodes per split."""
        return {s: len(ids) for s, ids in self.store.splits.items()}

    # --- model --------------------------------------------------------------------------------
    def build_model(self) -> DEQModel:
        cfg = self.config
        injection = GraphInjection(self.store.num_features, cfg.hidden, cfg.input_dropout, cfg.inject_hops)
        cell = IGNNCell(cfg.hidden, cfg.kappa, cfg.w_constraint, cfg.activation, cfg.w_init)
        head = NodeHead(cfg.hidden, self.store.num_classes, cfg.head_hidden, cfg.head_dropout)
        return DEQModel(injection, cell, head, **self.preset_solvers())

    # --- the distance to the full graph ---------------------------------------------------------
    def full_graph_gap(self, teacher: DEQModel, solver: Any, batches: int) -> dict[str, Any]:
        """The sampled-versus-full-graph figures on ``batches`` batches of the validation and test
        splits (:func:`.full.subgraph_gap`), and the full-graph solve's iterations."""
        cfg = self.config
        z_full, info = full_fixed_point(teacher, self.store, cfg.gap_chunk)
        out: dict[str, Any] = {"full_solve": info, "batches": batches, "fanouts": list(cfg.fanouts),
                               "norm": cfg.norm}
        for split in ("valid", "test"):
            ids = np.asarray(self.store.splits[split])

            def with_nodes(split: str = split, ids: np.ndarray = ids) -> Iterator[tuple]:
                seeds = self._fixed_seeds(split)
                for b in range(min(batches, -(-len(ids) // cfg.eval_nodes))):
                    chunk = ids[b * cfg.eval_nodes : (b + 1) * cfg.eval_nodes]
                    nodes = self.sampler.sample_nodes(chunk, np.random.default_rng(next(seeds)))
                    x, y = self.sampler.build(nodes, len(chunk))  # the evaluation's own batch
                    yield x, y, nodes

            out[split] = subgraph_gap(teacher, z_full, with_nodes(), solver)
        return out

    def data_report(self, teacher: DEQModel | None = None) -> dict[str, Any]:
        """The store's sizes and, with the ``teacher``, ``subgraph_gap`` (:meth:`full_graph_gap`)
        with the teacher's evaluation solver."""
        out: dict[str, Any] = {"store": {k: self.store.meta[k] for k in
                                         ("num_nodes", "nnz", "num_features", "num_classes")}}
        if teacher is not None and self.config.gap_batches:
            if self._gap is None:
                self._gap = self.full_graph_gap(teacher, teacher.deq.eval_solver, self.config.gap_batches)
            out["subgraph_gap"] = self._gap
        return out

    def describe(self) -> dict[str, Any]:
        info = super(GraphTask, self).describe()
        info["graph"] = {"nodes": self.store.num_nodes, "edges": self.store.nnz // 2,
                         "features": self.store.num_features, "classes": self.store.num_classes,
                         **self.split_sizes(), "fanouts": list(self.config.fanouts)}
        return info

    @property
    def graph(self) -> Any:  # the whole graph is never built
        raise GraphDataError("the ogbn task works on sampled subgraphs; it has no in-memory graph")
