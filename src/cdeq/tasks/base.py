"""What a task provides to the pipeline: data, a DEQ model, a loss and a metric.

The pipeline (teacher training, trajectory recording, distillation, evaluation) is written
against :class:`Task` only, so a new domain needs one subclass and nothing else.

Batches are pairs ``(x, y)``: ``x`` is whatever the model's injection takes (a tensor, or a
tuple such as ``(features, adjacency)``), ``y`` whatever the task's loss and metric take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..config import Config
from ..deq.model import DEQModel

Batch = tuple[Any, Any]


class Task:
    """Base class of a task. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the task's name in reports (``"digits"``).
        metric: the metric's name (``"accuracy"``, ``"nats_per_char"``).
        higher_is_better: direction of the metric.
        Config: the dataclass of the task's settings (model size, data, training).
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    Config: ClassVar[type[Config]] = Config

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

    def test_batches(self, batch_size: int) -> Iterable[Batch]:
        """Held-out batches for evaluation."""
        raise NotImplementedError

    def selection_batches(self, batch_size: int) -> Iterable[Batch]:
        """Training-split batches used to choose inference schedules (never test data)."""
        return self.train_batches(batch_size, shuffle=False)

    def validation_batches(self, batch_size: int) -> Iterable[Batch]:
        """Held-out batches for choosing the teacher's stopping epoch (never test data)."""
        return self.selection_batches(batch_size)

    # --- loss and metric ----------------------------------------------------------------------
    def loss(self, logits: Tensor, y: Any) -> Tensor:
        """Scalar training loss (mean over the batch)."""
        raise NotImplementedError

    def metric_sum(self, logits: Tensor, y: Any) -> tuple[float, int]:
        """``(sum of the metric over items, number of items)``; the pipeline averages."""
        raise NotImplementedError

    @classmethod
    def run_defaults(cls, quick: bool = False) -> dict[str, Any]:
        """Overrides of the run configuration's sections for this task (``quick``: smoke size)."""
        return {}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "metric": self.metric, "higher_is_better": self.higher_is_better,
                "config": dataclasses.asdict(self.config)}


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by name to :func:`get_task` and the CLI."""
    TASKS[cls.name] = cls
    return cls
