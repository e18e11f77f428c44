"""Checks of what a user's data feeds a model: finite inputs, labels within the classes.

Used by teacher training, trajectory recording and distillation; neutral ground, so that no
stage imports another to check its inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["check_finite_inputs", "check_labels"]


def check_finite_inputs(x: Any, where: str) -> None:
    """Raise a clear ``ValueError`` when a floating-point tensor in ``x`` (a tensor, or a tuple,
    list or dict of them) holds NaN or inf."""
    if isinstance(x, Tensor):
        if x.is_floating_point() and not x.is_sparse and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{where}: the input of shape {tuple(x.shape)} holds {bad} NaN/inf "
                             "values; clean or impute the data first")
    elif isinstance(x, (tuple, list)):
        for item in x:
            check_finite_inputs(item, where)
    elif isinstance(x, dict):
        for item in x.values():
            check_finite_inputs(item, where)


def check_labels(logits: Tensor, y: Any, where: str) -> None:
    """Class-index labels ``y`` must lie in ``[0, C)`` for ``C = logits.shape[-1]``."""
    if isinstance(y, Tensor) and not y.is_floating_point() and y.numel() and logits.dim() >= 2:
        lo, hi, c = int(y.min()), int(y.max()), int(logits.shape[-1])
        if lo < 0 or hi >= c:
            raise ValueError(f"{where}: labels must be class indices in [0, {c - 1}] (the model has "
                             f"{c} outputs), found values in [{lo}, {hi}]")
