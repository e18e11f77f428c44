"""Exporting the student of a finished run: a standalone one-step model, or a pretrained
directory that :meth:`cdeq.Pipeline.from_pretrained` loads."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor

from ..hub.export import export_one_step
from ..hub.pipeline import save_pretrained
from .stages import Run


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, batch: int = 2) -> tuple[Path, str]:
    """Export the one-step student of a finished run (example input: its first test batch)."""
    run = Run(run_dir, device="cpu")
    student = run.student()
    x, _ = next(iter(run.task.test_batches(batch)))
    if not isinstance(x, Tensor):
        raise ValueError(f"export needs a task whose inputs are one tensor; {run.config.task!r} "
                         f"gives {type(x).__name__}")
    return export_one_step(student, x, out)


def save_run_pretrained(run_dir: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """The student of a finished run directory, written as a pretrained directory."""
    run = Run(run_dir, device="cpu")
    return save_pretrained(run.student(), directory, run.config.task, run.config.task_config)
