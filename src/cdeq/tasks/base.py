"""What a task provides to the pipeline: data, a DEQ model, a loss and a metric.

The pipeline (teacher training, trajectory recording, distillation, evaluation) is written
against :class:`Task` only, so a new domain needs one subclass and nothing else.

Every task has three disjoint splits: training (``train_batches``, ``record_batches``),
validation (``validation_batches``; ``selection_batches`` defaults to it: every choice is made
there) and test (``test_batches``, evaluated once at the end). ``split_sizes`` counts them.

Batches are pairs ``(x, y)``: ``x`` is whatever the model's injection takes (a tensor, or a
tuple such as ``(features, adjacency)``), ``y`` whatever the task's loss and metric take.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..deq.model import DEQModel
from ..engine.config import Config, merged
from ..solvers import SolverSpec

Batch = tuple[Any, Any]


class Task:
    """Base class of a task. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the task's name in reports (``"digits"``).
        metric: the metric's name (``"accuracy"``, ``"nats_per_char"``).
        higher_is_better: direction of the metric.
        Config: the dataclass of the task's settings (model size, data, training).
        presets: ``{"full": sections, "quick": sections}``, the task's run defaults as data
            (kept in the domain's ``presets.py``).
        paper: the run sections ``task_config.size="paper"`` selects (the paper's model sizes
            and solver budgets, ``task_config`` among them), or ``None`` where the task has no
            paper size.
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    Config: ClassVar[type[Config]] = Config
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    paper: ClassVar[dict[str, Any] | None] = None

    def __init__(self, config: Config) -> None:
        self.config = config

    # --- model --------------------------------------------------------------------------------
    def build_model(self) -> DEQModel:
        """A fresh, untrained teacher."""
        raise NotImplementedError

    # --- data ---------------------------------------------------------------------------------
    def train_batches(self, batch_size: int, shuffle: bool = True,
                      generator: torch.Generator | None = None) -> Iterable[Batch]:
        """Training batches (a fresh iterable each call)."""
        raise NotImplementedError

    def record_batches(self, batch_size: int) -> Iterable[Batch]:
        """Batches whose teacher trajectories are recorded: training data only.

        Default: the training split in a fixed order. Tasks with one training example (a
        graph) override this to yield perturbed copies.
        """
        return self.train_batches(batch_size, shuffle=False)

    def train_items(self) -> Any:
        """The training split as an indexable data set (``items[i] -> (x, y)``, ``len``, and a
        batched ``items.take(ids) -> (x, y)`` where it can), in the order of
        :meth:`record_batches`, or ``None`` (the default). With it, stored trajectories keep each
        sample's index rather than a copy of its input (:mod:`cdeq.consistency.arrays`)."""
        return None

    def validation_batches(self, batch_size: int) -> Iterable[Batch]:
        """Held-out validation batches in a fixed order (disjoint from training and test)."""
        raise NotImplementedError

    def test_batches(self, batch_size: int) -> Iterable[Batch]:
        """Held-out test batches in a fixed order: evaluated once, at the end, never used to
        choose anything."""
        raise NotImplementedError

    def selection_batches(self, batch_size: int) -> Iterable[Batch]:
        """Batches every choice is made on (plan search, the exact-mode warm plan, a baseline's
        solvers): the validation batches by default, never the test split."""
        return self.validation_batches(batch_size)

    def split_sizes(self) -> dict[str, int]:
        """``{"train": n, "valid": n, "test": n}`` in the task's items (images, nodes, tokens)."""
        raise NotImplementedError

    # --- loss and metric ----------------------------------------------------------------------
    def loss(self, logits: Tensor, y: Any) -> Tensor:
        """Scalar training loss (mean over the batch)."""
        raise NotImplementedError

    def metric_items(self, logits: Tensor, y: Any) -> Tensor:
        """The metric of each item (image, node, token), ``(N,)`` float: what the plan search's
        standard errors are computed from."""
        raise NotImplementedError

    def metric_sum(self, logits: Tensor, y: Any) -> tuple[float, int]:
        """``(sum of the metric over items, number of items)``; the pipeline averages."""
        items = self.metric_items(logits, y)
        return float(items.sum()), int(items.numel())

    # --- presets and the command line -------------------------------------------------------
    @classmethod
    def run_defaults(cls, quick: bool = False) -> dict[str, Any]:
        """Overrides of the run configuration's sections for this task (``quick``: smoke size):
        a copy of ``presets["quick"]`` or ``presets["full"]``."""
        return copy.deepcopy(cls.presets.get("quick" if quick else "full", {}))

    @classmethod
    def resolve_user_config(cls, user: dict[str, Any], data: str | None) -> dict[str, Any]:
        """The user's configuration sections completed with what this task infers from the data
        path (``data``, from ``--data``); with ``task_config.size="paper"``, the :attr:`paper`
        sections over the task's preset and under the user's settings. Returns a new dict."""
        out = copy.deepcopy(user)
        if cls.paper is not None and out.get("task_config", {}).get("size") == "paper":
            out = merged(copy.deepcopy(cls.paper), out)
        return out

    @classmethod
    def variants(cls, user: dict[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
        """The sub-runs one ``cdeq run`` makes: ``(sub-directory name or None, user config)``.
        The default is one run in the run directory itself."""
        return [(None, user)]

    def preset_solvers(self, quick: bool = False) -> dict[str, Any]:
        """:class:`DEQModel` keyword arguments (``solver``, ``eval_solver``, ``backward``) from the
        teacher section of this task's preset, so that a model built outside a run and a run's
        model start from the same settings."""
        teacher = self.run_defaults(quick).get("teacher", {})
        if self.paper is not None and getattr(self.config, "size", "") == "paper":
            teacher = merged(teacher, self.paper.get("teacher", {}))
        out: dict[str, Any] = {}
        for key, arg in (("train_solver", "solver"), ("eval_solver", "eval_solver")):
            if key in teacher:
                out[arg] = SolverSpec.from_dict(teacher[key])
        if "backward" in teacher:
            out["backward"] = teacher["backward"]
        return out

    def data_report(self, teacher: DEQModel | None = None) -> dict[str, Any]:
        """What the data readers found that the report keeps (files skipped, a sampled graph's
        distance to the full graph, which needs the trained ``teacher``); ``{}`` by default.
        Called after the evaluation, so it covers every batch the run read."""
        return {}

    def describe(self) -> dict[str, Any]:
        """The task's name, metric, settings and (where the task counts them) split sizes."""
        out = {"task": self.name, "metric": self.metric, "higher_is_better": self.higher_is_better,
               "config": dataclasses.asdict(self.config)}
        with contextlib.suppress(NotImplementedError):
            out["splits"] = self.split_sizes()
        return out


class OnDevice:
    """``task`` with its batches on ``device``: the five batch methods yield each batch moved there
    (:func:`cdeq.engine.precision.to_device`: tensors, and tuples such as a graph's ``(features,
    adjacency)``); every other attribute is the task's own. The data stay where the task keeps
    them (the CPU); each batch is copied when it is used.
    """

    _BATCHES = ("train_batches", "record_batches", "validation_batches", "test_batches",
                "selection_batches")

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task, self.device = task, torch.device(device)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.task, name)
        if name not in self._BATCHES:
            return value

        def batches(*args: Any, **kwargs: Any) -> Iterable[Batch]:
            from ..engine.precision import to_device

            inner = value(*args, **kwargs)  # called now: NotImplementedError is raised here
            return (to_device(batch, self.device) for batch in inner)

        return batches


def on_device(task: Task, device: torch.device | str) -> Task:
    """``task`` itself on the CPU, otherwise :class:`OnDevice` (the same interface)."""
    device = torch.device(device)
    return task if device.type == "cpu" else OnDevice(task, device)  # type: ignore[return-value]


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by name to :func:`get_task` and the CLI."""
    TASKS[cls.name] = cls
    return cls
