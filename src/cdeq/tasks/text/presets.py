"""Presets of the text tasks, as data.

- ``QUICK_TASK``: the ``task_config`` values ``quick=True`` puts in place of fields left at
  their defaults (a few thousand characters, a 32-wide block).
- ``TEXT``: the run defaults ``{"full": sections, "quick": sections}``: the teacher settings
  that reach the documented accuracy (docs/concepts/text.md), and the later stages sized for text windows
  (B windows x seq_len positions x d_model per state). The teacher's solvers here are also the
  ones :meth:`TextTask.build_model` gives the model.
"""

from __future__ import annotations

from typing import Any

QUICK_TASK: dict[str, Any] = {
    "d_model": 32, "n_heads": 2, "mlp_ratio": 2.0, "seq_len": 32,
    "max_train_tokens": 4000, "max_eval_tokens": 800, "eval_windows": 8, "record_windows": 16,
    "epoch_windows": 64,
}

FULL_RUN: dict[str, Any] = {
    # sized so that a seed, its teacher trained to the validation plateau (epochs of 4,000 windows,
    # at most 60; the cosine schedule runs over them), fits in about half an hour of one idle core.
    # A plateau is 3 epochs without a gain of 0.005 nats/char: with no threshold the loss still
    # crept down by 0.002-0.003 a epoch at a cap of 40 (docs/decisions/teacher-plateau.md)
    "task_config": {"d_model": 64, "n_heads": 4, "epoch_windows": 4000, "record_windows": 1024},
    "teacher": {"epochs": 60, "min_delta": 0.005, "batch_size": 32,
                "optim": {"lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 100},
                "backward": "jacobian_free",
                "train_solver": {"name": "anderson", "max_iter": 8, "tol": 1e-3},
                "eval_solver": {"name": "anderson", "max_iter": 60, "tol": 1e-5}},
    "record": {"batch_size": 64, "dtype": "float16",
               "solver": {"name": "anderson", "max_iter": 40, "tol": 1e-4}},
    "distill": {"epochs": 20, "batch_size": 32, "max_residual": 1e-2},
    "evaluate": {"batch_size": 64, "latency_batch": 32, "timing_budgets": [1, 2, 3, 4]},
}

QUICK_RUN: dict[str, Any] = {
    "threads": 1,  # a tiny model gains nothing from more threads, and they slow it on busy cores
    "task_config": {"quick": True},
    "teacher": {"epochs": 4, "batch_size": 8, "optim": {"lr": 1e-2}, "backward": "jacobian_free",
                "train_solver": {"name": "anderson", "max_iter": 8, "tol": 1e-3},
                "eval_solver": {"name": "anderson", "max_iter": 30, "tol": 1e-5}},
    "record": {"batch_size": 16, "solver": {"name": "anderson", "max_iter": 12, "tol": 1e-4}},
    "distill": {"epochs": 2, "batch_size": 8},
    "plans": {"max_nfe": 4, "batches": 1},
    "evaluate": {"budgets": [1, 2, 4], "latency_repeats": 1, "batch_size": 8, "latency_batch": 8},
}

TEXT: dict[str, dict[str, Any]] = {"full": FULL_RUN, "quick": QUICK_RUN}

# `task_config.size="paper"`: the DEQ-Transformer of Bai et al. (2019) on WikiText-103 (its medium
# model: d_model 410, 10 heads, feed-forward 2100, 150-token context) and its solver budgets
# (Broyden, 30 forward and 40 backward iterations). Sized for a GPU; tested at a tiny size here.
PAPER_TASK: dict[str, Any] = {"d_model": 410, "n_heads": 10, "mlp_ratio": 2100 / 410, "seq_len": 150,
                              "level": "word"}
PAPER_RUN: dict[str, Any] = {
    "teacher": {"backward": "implicit", "backward_options": {"max_iter": 40},
                "train_solver": {"name": "broyden", "max_iter": 30, "tol": 1e-3},
                "eval_solver": {"name": "broyden", "max_iter": 30, "tol": 1e-4}},
    "record": {"solver": {"name": "broyden", "max_iter": 40, "tol": 1e-4}},
}
