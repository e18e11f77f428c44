"""Node classification tasks: ``cora``, ``facebook`` and ``planetoid`` (a user's own graph).

Batches are ``(x, y)`` with ``x = (features (N, F), adjacency (N, N))`` (sparse COO) and
``y = (labels (N,), mask (N,))``: one graph per batch, the loss and metric over the masked nodes.

Settings (config key ``setting``):

- ``transductive``: every batch is the full graph; training uses the train mask, selection the
  validation mask, test the test mask.
- ``inductive``: training, recording and selection batches are the subgraph induced by the
  non-test nodes (no test node, no edge touching one); test batches are the full graph with the
  test mask.

``record_batches`` yields ``record_copies`` perturbed copies of the training graph (random
node subsets, edge dropout, feature dropout; the first copy is the unperturbed graph) so that a
student learns the map to the fixed point rather than one ``z*``.

Examples:
    >>> task = CoraTask(CoraTask.Config(setting="inductive"))  # doctest: +SKIP
    >>> model = task.build_model()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ...deq.model import DEQModel
from ...engine.config import Config, ConfigError, check_choice, check_int, check_range
from ..base import Batch, Task, register_task
from ..datadir import data_dir
from . import presets
from .data import Graph, graph_batch, perturb_graph
from .model import GraphInjection, IGNNCell, NodeHead
from .readers import load_facebook, load_planetoid, load_saved_graph

__all__ = ["CoraTask", "FacebookTask", "GraphConfig", "GraphTask", "PlanetoidTask"]

def check_ignn(config: Any) -> None:
    """Check the IGNN model's settings that the graph configurations share (``hidden``, ``kappa``,
    the weight constraint and initialisation, activation, injection hops, dropouts, head width);
    a bad value is a :class:`ConfigError` naming its key."""
    check_int("hidden", config.hidden, minimum=1)
    if isinstance(config.kappa, bool) or not isinstance(config.kappa, (int, float)) \
            or not 0 < config.kappa < 1:
        raise ConfigError(f"kappa={config.kappa!r} is not valid; it must lie in (0, 1)")
    check_choice("w_constraint", config.w_constraint, ["scale", "project"])
    check_choice("w_init", config.w_init, ["random", "identity"])
    check_choice("activation", config.activation, ["relu", "tanh"])
    check_int("inject_hops", config.inject_hops, minimum=0)
    check_range("input_dropout", config.input_dropout, 0.0, 0.95)
    check_range("head_dropout", config.head_dropout, 0.0, 0.95)
    check_int("head_hidden", config.head_hidden, minimum=0)


@dataclasses.dataclass
class GraphConfig(Config):
    """Settings of a graph task.

    Attributes:
        data: the dataset's file or folder ("" = the shared data folder, see
            :func:`~cdeq.tasks.datadir.data_dir`).
        setting: ``"transductive"`` or ``"inductive"`` (module docstring).
        hidden: state width ``d``.
        kappa: bound on ``||W||_inf`` (the contraction rate), in (0, 1).
        w_constraint: ``"scale"`` or ``"project"`` (see :mod:`~cdeq.tasks.graphs.model`).
        w_init: ``"random"`` or ``"identity"`` (``W`` starts near ``kappa I``, APPNP-like).
        activation: ``"relu"`` or ``"tanh"``.
        inject_hops: propagation steps ``A^h`` applied to the injection (IGNN uses 1).
        input_dropout, head_dropout: dropout on the input features and before the head.
        head_hidden: hidden width of an MLP head (0: a linear head).
        normalize_features: scale each node's features to sum 1.
        steps_per_epoch: how many times an epoch of ``train_batches`` repeats the training graph.
        selection_mask: ``"val"`` or ``"train"``: the nodes ``selection_batches`` score.
        record_copies: how many graphs ``record_batches`` yields (the first is unperturbed).
        record_node_keep, record_edge_drop, record_feature_drop: the perturbations.
        record_seed: seed of the perturbations.
    """

    data: str = ""
    setting: str = "transductive"
    hidden: int = 64
    kappa: float = 0.9
    w_constraint: str = "scale"
    w_init: str = "identity"
    activation: str = "relu"
    inject_hops: int = 1
    input_dropout: float = 0.5
    head_dropout: float = 0.5
    head_hidden: int = 0
    normalize_features: bool = True
    steps_per_epoch: int = 10
    selection_mask: str = "val"
    record_copies: int = 32
    record_node_keep: float = 0.9
    record_edge_drop: float = 0.1
    record_feature_drop: float = 0.1
    record_seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.data, str):
            raise ConfigError(f"data={self.data!r} is not valid; it must be a path string")
        check_choice("setting", self.setting, ["transductive", "inductive"])
        check_ignn(self)
        if not isinstance(self.normalize_features, bool):
            raise ConfigError(f"normalize_features={self.normalize_features!r} must be true or false")
        check_int("steps_per_epoch", self.steps_per_epoch, minimum=1)
        check_choice("selection_mask", self.selection_mask, ["val", "train"])
        check_int("record_copies", self.record_copies, minimum=1)
        check_range("record_node_keep", self.record_node_keep, 0.05, 1.0)
        check_range("record_edge_drop", self.record_edge_drop, 0.0, 0.95)
        check_range("record_feature_drop", self.record_feature_drop, 0.0, 0.95)
        check_int("record_seed", self.record_seed, minimum=0)


@dataclasses.dataclass
class SplitConfig(GraphConfig):
    """A graph task with a seeded random split (where the data brings none).

    Attributes:
        split_seed, train_frac, val_frac: the split: ``train_frac`` / ``val_frac`` / rest.
    """

    split_seed: int = 0
    train_frac: float = 0.1
    val_frac: float = 0.1

    def validate(self) -> None:
        super().validate()
        check_int("split_seed", self.split_seed, minimum=0)
        check_range("train_frac", self.train_frac, 1e-6, 0.98)
        check_range("val_frac", self.val_frac, 0.0, 0.98)
        if self.train_frac + self.val_frac >= 1:
            raise ConfigError(
                f"train_frac + val_frac = {self.train_frac + self.val_frac} must be below 1"
            )


@dataclasses.dataclass
class PlanetoidConfig(SplitConfig):
    """A user's graph: ``data`` is a Planetoid-layout folder (with ``name`` the dataset's file
    prefix, ``ind.<name>.*``) or a ``.pt`` file saved with ``torch.save`` (a dict of tensors or
    a torch_geometric ``Data``). The split fields apply to a ``.pt`` graph without masks."""

    name: str = ""

    def validate(self) -> None:
        super().validate()
        if not self.data:
            raise ConfigError("the planetoid task needs data: a Planetoid folder or a saved .pt graph")
        if not isinstance(self.name, str):
            raise ConfigError(f"name={self.name!r} is not valid; it must be a dataset name string")
        if not self.name and not Path(self.data).is_file():
            raise ConfigError("the planetoid task needs name (the ind.<name>.* prefix) for a folder")


class GraphTask(Task):
    """Node classification on one graph with an IGNN teacher (module docstring)."""

    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    Config: ClassVar[type[Config]] = GraphConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = presets.GRAPHS

    def __init__(self, config: GraphConfig | None = None) -> None:
        super().__init__(config if config is not None else self.Config())
        self._graph: Graph | None = None
        self._train_graph: Graph | None = None
        self._cache: dict[str, Batch] = {}

    @classmethod
    def variants(cls, user: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
        """Both settings, in sub-directories ``transductive/`` and ``inductive/``, unless
        ``task_config.setting`` is given (then one run in the run directory)."""
        if "setting" in user.get("task_config", {}):
            return [(None, user)]
        return [(setting, {**user, "task_config": {**user.get("task_config", {}), "setting": setting}})
                for setting in ("transductive", "inductive")]

    # --- data ---------------------------------------------------------------------------------
    def load_graph(self) -> Graph:
        """Read the full graph with its split (subclasses)."""
        raise NotImplementedError

    @property
    def graph(self) -> Graph:
        """The full graph (loaded once)."""
        if self._graph is None:
            self._graph = self.load_graph()
        return self._graph

    @property
    def train_graph(self) -> Graph:
        """The graph the teacher and student see in training: the full graph (transductive) or
        the subgraph induced by the non-test nodes (inductive)."""
        if self._train_graph is None:
            g = self.graph
            self._train_graph = g.subgraph(~g.test_mask) if self.config.setting == "inductive" else g
        return self._train_graph

    def _batch(self, key: str) -> Batch:
        if key not in self._cache:
            g = self.graph if key == "test" else self.train_graph
            mask = {"train": g.train_mask, "val": g.val_mask, "test": g.test_mask}[key]
            self._cache[key] = graph_batch(g, mask, self.config.normalize_features)
        return self._cache[key]

    def train_batches(self, batch_size: int, shuffle: bool = True,
                      generator: torch.Generator | None = None) -> Iterator[Batch]:
        """The training graph with its train mask, ``steps_per_epoch`` times (``batch_size`` and
        ``shuffle`` do not apply to one graph)."""
        batch = self._batch("train")
        for _ in range(self.config.steps_per_epoch):
            yield batch

    def record_batches(self, batch_size: int) -> Iterator[Batch]:
        """``record_copies`` graphs: the training graph, then perturbed copies of it (train mask)."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.record_seed)
        yield self._batch("train")
        for _ in range(cfg.record_copies - 1):
            g = perturb_graph(self.train_graph, gen, node_keep=cfg.record_node_keep,
                              edge_drop=cfg.record_edge_drop, feature_drop=cfg.record_feature_drop)
            yield graph_batch(g, g.train_mask, cfg.normalize_features)

    def selection_batches(self, batch_size: int) -> Iterator[Batch]:
        """The unperturbed training graph with its validation (or train) mask; never test nodes."""
        yield self._batch(self.config.selection_mask)

    def validation_batches(self, batch_size: int) -> Iterator[Batch]:
        """The training graph with its validation mask."""
        yield self._batch("val")

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        """The full graph with its test mask."""
        yield self._batch("test")

    def split_sizes(self) -> dict[str, int]:
        """Labelled nodes per split (the masks' sizes)."""
        g = self.graph
        return {"train": int(g.train_mask.sum()), "valid": int(g.val_mask.sum()),
                "test": int(g.test_mask.sum())}

    # --- model --------------------------------------------------------------------------------
    def build_model(self) -> DEQModel:
        cfg = self.config
        g = self.graph
        injection = GraphInjection(g.num_features, cfg.hidden, cfg.input_dropout, cfg.inject_hops)
        cell = IGNNCell(cfg.hidden, cfg.kappa, cfg.w_constraint, cfg.activation, cfg.w_init)
        head = NodeHead(cfg.hidden, g.num_classes, cfg.head_hidden, cfg.head_dropout)
        return DEQModel(injection, cell, head, **self.preset_solvers())  # presets.py's teacher

    # --- loss and metric ----------------------------------------------------------------------
    @staticmethod
    def _masked(logits: Tensor, y: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        labels, mask = y
        flat = logits.reshape(-1, logits.shape[-1])
        if flat.shape[0] != labels.shape[0]:
            raise ValueError(f"logits cover {flat.shape[0]} nodes but the labels {labels.shape[0]}")
        return flat[mask], labels[mask]

    def loss(self, logits: Tensor, y: tuple[Tensor, Tensor]) -> Tensor:
        """Cross-entropy over the masked nodes (0 with a gradient if no node is masked)."""
        out, labels = self._masked(logits, y)
        if labels.numel() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(out, labels)

    def metric_items(self, logits: Tensor, y: tuple[Tensor, Tensor]) -> Tensor:
        """1.0 for each correctly predicted masked node, else 0.0: ``(masked nodes,)``."""
        out, labels = self._masked(logits, y)
        return (out.argmax(-1) == labels).float()

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        g, tg = self.graph, self.train_graph
        info["graph"] = {
            "nodes": g.num_nodes, "edges": g.num_edges // 2, "features": g.num_features,
            "classes": g.num_classes, "train": int(g.train_mask.sum()), "val": int(g.val_mask.sum()),
            "test": int(g.test_mask.sum()), "train_graph_nodes": tg.num_nodes,
        }
        return info


@register_task
class CoraTask(GraphTask):
    """Cora (Planetoid split: 140 train / 500 val / 1000 test), read from ``data`` (default:
    ``<shared data>/planetoid``)."""

    name: ClassVar[str] = "cora"

    def load_graph(self) -> Graph:
        root = self.config.data or data_dir() / "planetoid"
        return load_planetoid(root, "cora")


@register_task
class FacebookTask(GraphTask):
    """Facebook Page-Page (MUSAE), seeded random split 10% / 10% / 80%, read from ``data``
    (default: ``<shared data>/facebook``)."""

    name: ClassVar[str] = "facebook"
    Config: ClassVar[type[Config]] = SplitConfig

    presets: ClassVar[dict[str, dict[str, Any]]] = presets.FACEBOOK

    def load_graph(self) -> Graph:
        cfg = self.config
        folder = cfg.data or data_dir() / "facebook"
        return load_facebook(folder, cfg.split_seed, cfg.train_frac, cfg.val_frac)


@register_task
class PlanetoidTask(GraphTask):
    """A user's graph: a Planetoid-layout folder with ``name``, or a saved ``.pt`` graph."""

    name: ClassVar[str] = "planetoid"
    Config: ClassVar[type[Config]] = PlanetoidConfig

    def load_graph(self) -> Graph:
        cfg = self.config
        path = Path(cfg.data)
        if path.is_file():
            return load_saved_graph(path, cfg.split_seed, cfg.train_frac, cfg.val_frac)
        return load_planetoid(path, cfg.name)
