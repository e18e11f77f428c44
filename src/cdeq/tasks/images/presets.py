"""Run defaults of the image tasks, as data: ``{"full": sections, "quick": sections}`` per task.

Each is a set of overrides of the run configuration's sections (``task_config``, ``teacher``,
``record``, ...); a user's ``--config`` and ``--set`` values override them in turn.
"""

from __future__ import annotations

from typing import Any

# C-DEQ+'s initialiser on images: a 4-wide channel MLP of u without the convolution, cheap enough
# that a k-call plan fits a cost of k layer calls (tests/test_student_cost.py). Chosen on the
# digits validation loss at equal cost (docs/concepts/method.md, C-DEQ+).
PLUS: dict[str, Any] = {"init_hidden": 4, "init_conv": False}

# A smoke-size run for any image task (seconds on a CPU).
QUICK: dict[str, Any] = {
    "task_config": {"channels": 8, "hidden_mult": 1, "train_subset": 256, "test_subset": 128},
    "teacher": {"epochs": 1, "batch_size": 64,
                "train_solver": {"name": "anderson", "max_iter": 8, "tol": 1e-3},
                "eval_solver": {"name": "anderson", "max_iter": 30, "tol": 1e-5}},
    "record": {"batch_size": 128, "solver": {"name": "anderson", "max_iter": 12}},
    "distill": {"epochs": 2, "batch_size": 64},
    "baselines": {"init_select_batches": 1},
    "plans": {"max_nfe": 4, "batches": 1},
    "plus": PLUS,
    "evaluate": {"budgets": [1, 2, 4], "latency_repeats": 1, "batch_size": 128,
                 "latency_batch": 64},
}

IMAGES: dict[str, dict[str, Any]] = {"full": {"plus": PLUS}, "quick": QUICK}

# The demo (`cdeq demo`): sized to finish in about a minute on 2 idle CPU cores (README), with the
# teacher's training solver and adjoint cut short (its converged figures use the full eval solver).
DIGITS_DEMO: dict[str, Any] = {
    "task_config": {"channels": 16},
    # the validation loss of 140 images can creep down for tens of epochs: a high cap (epochs of
    # 1,260 images take seconds), so that training ends at the plateau
    "teacher": {"epochs": 100, "batch_size": 64, "train_solver": {"max_iter": 12},
                "backward_options": {"max_iter": 20, "tol": 1e-4}},
    "distill": {"epochs": 10},
    "plans": {"batches": 1},
    "plus": PLUS,
    "baselines": {"unrolled_ks": [1]},
    "evaluate": {"timing_budgets": [1, 2, 4], "latency_batch": 128, "exact_select_batches": 1},
}
DIGITS: dict[str, dict[str, Any]] = {"full": DIGITS_DEMO, "quick": QUICK}

# Sized for 2 CPU cores shared with other work (docs/results.md): a seed, its teacher trained to
# the validation plateau (at most 20 epochs; the cosine schedule runs over them), in about half an
# hour of one idle core. The test split is the whole MNIST test set.
MNIST: dict[str, dict[str, Any]] = {
    "full": {
        "task_config": {"stride": 4, "channels": 32, "train_subset": 6000},
        "teacher": {"epochs": 20, "batch_size": 32},
        "record": {"max_samples": 3000},
        "distill": {"epochs": 10},
        "plus": PLUS,
        "evaluate": {"timing_budgets": [1, 2, 3, 4]},
    },
    "quick": QUICK,
}

# About an hour on 2 CPU cores (docs/results.md); baselines would add 4x the distillation.
CIFAR10: dict[str, dict[str, Any]] = {
    "full": {
        "task_config": {"stride": 2, "channels": 32, "augment": True},
        "teacher": {"epochs": 30, "batch_size": 128, "train_solver": {"max_iter": 10, "tol": 1e-4}},
        "record": {"max_samples": 10000, "dtype": "float16"},
        "distill": {"epochs": 8},
        "plus": PLUS,
        "baselines": {"enabled": False},
    },
    "quick": QUICK,
}

# `task_config.size="paper"`: the shape of MDEQ-small on ImageNet (Bai et al. 2020, "Multiscale
# Deep Equilibrium Models", configuration cls_mdeq_SMALL): 4 resolutions 32/64/128/256 channels
# wide, residual blocks 5 times as wide inside, 224x224 crops (the shorter side resized to 256 for
# evaluation) brought to 56x56 by two stride-2 convolutions. Sized for a GPU; tested at a tiny size.
PAPER_TASK: dict[str, Any] = {"scales": 4, "widths": (32, 64, 128, 256), "hidden_mult": 5, "stride": 4,
                              "image_size": 224, "resize": 256, "augment": True}
# Its solver budgets: Broyden, 26 forward iterations (F_THRES) and 27 for the implicit backward
# (B_THRES); MDEQ stops at a residual of 1e-5 sqrt(n) for a state of n numbers, about a relative
# residual of 1e-5 on its group-normalised states. Its batch: 4 x 32 images, 100 epochs.
PAPER_RUN: dict[str, Any] = {
    "teacher": {"epochs": 100, "batch_size": 128, "backward": "implicit",
                "backward_options": {"max_iter": 27},
                "train_solver": {"name": "broyden", "max_iter": 26, "tol": 1e-5},
                "eval_solver": {"name": "broyden", "max_iter": 26, "tol": 1e-5}},
    "record": {"solver": {"name": "broyden", "max_iter": 27, "tol": 1e-5}},
}
