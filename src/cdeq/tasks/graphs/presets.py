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

# ogbn (sampled subgraphs of a large graph; one subgraph a batch, every batch size 1): sized so that
# an ogbn-arxiv-sized graph runs within an hour on 2 CPU cores (docs/graphs.md, large graphs).
OGBN_RUN: dict[str, Any] = {
    "teacher": {"epochs": 3, "batch_size": 1, "optim": {"lr": 0.01, "weight_decay": 0.0},
                "backward": "implicit",
                "train_solver": {"name": "anderson", "max_iter": 20, "tol": 1e-3},
                "eval_solver": {"name": "anderson", "max_iter": 40, "tol": 1e-4},
                "backward_options": {"max_iter": 20, "tol": 1e-4}},
    "record": {"batch_size": 1, "dtype": "float16",
               "solver": {"name": "anderson", "max_iter": 30, "tol": 1e-5}},
    "distill": {"batch_size": 1, "epochs": 8},
    "plans": {"batches": 2},
    "baselines": {"enabled": False},
    "plus": {"enabled": False},
    "evaluate": {"batch_size": 1, "latency_batch": 1, "budgets": [1, 2, 3, 4, 6, 8],
                 "reference": {"name": "anderson", "max_iter": 60, "tol": 1e-5},
                 "exact_select_batches": 1, "latency_repeats": 5},
}

OGBN_QUICK: dict[str, Any] = {
    "task_config": {"hidden": 16, "batch_nodes": 64, "eval_nodes": 64, "fanouts": [4, 2],
                    "record_batches": 3, "epoch_batches": 4, "eval_batches": 2, "gap_batches": 1},
    "teacher": {"epochs": 2, "batch_size": 1, "optim": {"lr": 0.02},
                "train_solver": {"name": "anderson", "max_iter": 12, "tol": 1e-3}},
    "record": {"batch_size": 1, "solver": {"name": "anderson", "max_iter": 16, "tol": 1e-5}},
    "distill": {"batch_size": 1, "epochs": 2},
    "plans": {"max_nfe": 4, "batches": 1},
    "baselines": {"enabled": False},
    "plus": {"enabled": False},
    "evaluate": {"budgets": [1, 2, 4], "batch_size": 1, "latency_batch": 1, "latency_repeats": 1,
                 "reference": {"max_iter": 40}, "exact_select_batches": 1},
}

OGBN: dict[str, dict[str, Any]] = {"full": OGBN_RUN, "quick": OGBN_QUICK}

# `task_config.size="paper"`: IGNN's width on its large node-classification benchmarks, with
# larger subgraphs and solver budgets (sized for a GPU; tested at a tiny size only).
OGBN_PAPER: dict[str, Any] = {
    "task_config": {"hidden": 128, "fanouts": [15, 10], "batch_nodes": 4096, "eval_nodes": 8192,
                    "record_batches": 64},
    "teacher": {"epochs": 20, "train_solver": {"name": "anderson", "max_iter": 30, "tol": 1e-4},
                "eval_solver": {"name": "anderson", "max_iter": 60, "tol": 1e-5}},
    "record": {"solver": {"name": "anderson", "max_iter": 60, "tol": 1e-5}},
    "distill": {"epochs": 30},
}
