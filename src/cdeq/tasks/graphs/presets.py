"""Run defaults of the graph tasks, as data: ``{"full": sections, "quick": sections}`` per task.

One graph is one batch: every batch size is 1, and a teacher "epoch" is ``steps_per_epoch``
steps (docs/concepts/graphs.md has the measurements behind the full settings). The full teacher's solvers
and backward are also the ones :meth:`GraphTask.build_model` gives the model.
"""

from __future__ import annotations

import copy
from typing import Any

FULL_RUN: dict[str, Any] = {
    "teacher": {"epochs": 10, "batch_size": 1, "optim": {"lr": 0.01, "weight_decay": 0.1},
                "backward": "implicit",
                "train_solver": {"name": "anderson", "max_iter": 30, "tol": 1e-3},
                "eval_solver": {"name": "anderson", "max_iter": 100, "tol": 1e-5}},
    "record": {"batch_size": 1, "solver": {"name": "anderson", "max_iter": 40, "tol": 1e-5}},
    "distill": {"batch_size": 1, "epochs": 30},
    "plans": {"batches": 1},
    "evaluate": {"batch_size": 1, "latency_batch": 1},
}

QUICK_RUN: dict[str, Any] = {
    "task_config": {"hidden": 16, "steps_per_epoch": 10, "record_copies": 3},
    "teacher": {"epochs": 4, "batch_size": 1, "optim": {"lr": 0.05, "weight_decay": 0.1},
                "train_solver": {"name": "anderson", "max_iter": 15, "tol": 1e-3},
                "eval_solver": {"name": "anderson", "max_iter": 40, "tol": 1e-5}},
    "record": {"batch_size": 1, "solver": {"name": "anderson", "max_iter": 16, "tol": 1e-5}},
    "distill": {"batch_size": 1, "epochs": 2},
    "plans": {"max_nfe": 4, "batches": 1},
    "evaluate": {"budgets": [1, 2, 4], "batch_size": 1, "latency_batch": 1, "latency_repeats": 1},
}

GRAPHS: dict[str, dict[str, Any]] = {"full": FULL_RUN, "quick": QUICK_RUN}

# Facebook records 8 copies: one trajectory of the full graph at width 64 is about 70 MB in float32.
FACEBOOK: dict[str, dict[str, Any]] = {
    "full": {**copy.deepcopy(FULL_RUN), "task_config": {"record_copies": 8}},
    "quick": QUICK_RUN,
}
