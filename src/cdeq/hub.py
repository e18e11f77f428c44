"""Saving, loading and exporting a distilled C-DEQ student.

A *pretrained directory* holds everything needed to rebuild a student without the run that made
it::

    DIR/model.safetensors   the student's state dict (teacher included), versioned + checksummed
    DIR/config.json         task name + task config (rebuilds the teacher architecture through
                            ``cdeq.tasks.TASKS[task](Config.from_dict(task_config)).build_model()``),
                            schedule config, student config and the inference plans

Deployment: :class:`OneStepStudent` wraps a student as ``x -> logits`` with exactly one layer call
(the 1-NFE plan) and no data-dependent control flow, so ``torch.export`` and ``torch.compile``
handle it; :func:`export_one_step` writes it with ``torch.export`` (``.pt2``) and falls back to
TorchScript tracing when export fails for a model.

Example:
    >>> save_pretrained(student, "my-cdeq", task="digits", task_config={})     # doctest: +SKIP
    >>> student = from_pretrained("my-cdeq")                                   # doctest: +SKIP
    >>> export_one_step(student, example_x, "student.pt2")                     # doctest: +SKIP
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ConfigError
from .consistency.inference import plan_from_json, plan_to_json
from .consistency.schedule import ScheduleConfig, TimeSchedule
from .consistency.student import ConsistencyStudent, StudentConfig
from .io import CorruptFileError, load_tensors, read_json, save_tensors, write_json

HUB_FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_pretrained(student: ConsistencyStudent, directory: str | os.PathLike, task: str,
                    task_config: dict[str, Any] | None = None) -> Path:
    """Write ``student`` to ``directory`` (weights + a config that rebuilds it); returns the dir.

    ``task``/``task_config`` name the registered task whose ``build_model()`` rebuilds the
    teacher's architecture (the weights then come from the file).
    """
    from .tasks import TASKS

    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / WEIGHTS, student.state_dict(), kind="student")
    write_json(directory / CONFIG, {
        "cdeq_hub_format": HUB_FORMAT,
        "task": task,
        "task_config": dict(task_config or {}),
        "schedule": student.schedule.config.to_dict(),
        "student": student.config.to_dict(),
        "plans": {str(k): plan_to_json(p) for k, p in sorted(student.plans.items())},
    })
    return directory


def from_pretrained(directory: str | os.PathLike) -> ConsistencyStudent:
    """Rebuild the student saved by :func:`save_pretrained` (in eval mode)."""
    from .tasks import TASKS

    directory = Path(directory)
    cfg_path = directory / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} does not exist: not a directory written by save_pretrained")
    cfg = read_json(cfg_path)
    if cfg.get("cdeq_hub_format") != HUB_FORMAT:
        raise CorruptFileError(f"{cfg_path} has hub format {cfg.get('cdeq_hub_format')!r}; this cdeq "
                               f"reads format {HUB_FORMAT}")
    name = cfg.get("task")
    if name not in TASKS:
        raise ConfigError(f"{cfg_path} names task {name!r}, which is not registered; known tasks: "
                          f"{sorted(TASKS)}")
    task_cls = TASKS[name]
    teacher = task_cls(task_cls.Config.from_dict(cfg.get("task_config", {}))).build_model()
    student = ConsistencyStudent(teacher, TimeSchedule(ScheduleConfig.from_dict(cfg["schedule"])),
                                 StudentConfig.from_dict(cfg["student"]))
    tensors, _ = load_tensors(directory / WEIGHTS, kind="student")
    try:
        student.load_state_dict(tensors)
    except RuntimeError as err:
        raise ConfigError(f"{directory / WEIGHTS} does not match the model rebuilt from {cfg_path}: "
                          f"{str(err).splitlines()[0]}") from err
    student.plans = {int(k): plan_from_json(v) for k, v in cfg["plans"].items()}
    student.eval()
    return student


def save_run_pretrained(run_dir: str | os.PathLike, directory: str | os.PathLike) -> Path:
    """The student of a finished run directory, written as a pretrained directory."""
    from .pipeline import Run

    run = Run(run_dir)
    return save_pretrained(run.student(), directory, run.config.task, run.config.task_config)


class OneStepStudent(nn.Module):
    """``x -> logits`` with one layer call: the student's 1-NFE plan, export-friendly.

    Equal to ``student.predict(x, nfe=1)[0]`` (the 1-NFE plan is a single jump from ``z_0``),
    written without the data-dependent branches of :meth:`ConsistencyStudent.F` so that
    ``torch.export``, TorchScript tracing and ``torch.compile`` see one static graph.
    """

    def __init__(self, student: ConsistencyStudent) -> None:
        super().__init__()
        plan = student.plans.get(1, [("jump", student.schedule.t_min)])
        if len(plan) != 1 or plan[0][0] != "jump":
            raise ValueError(f"the student's 1-NFE plan {plan!r} is not a single jump")
        self.student = student
        t = float(plan[0][1])
        c_skip, c_out = student.schedule.scalings(torch.tensor([t], dtype=torch.float64))
        self.t, self.c_skip, self.c_out = t, float(c_skip), float(c_out)

    def forward(self, x: Tensor) -> Tensor:
        s = self.student
        u = s.inject(x)
        z = s.initial_state(u)
        if self.c_out != 0.0:
            t = torch.full((z.shape[0],), self.t, dtype=z.dtype, device=z.device)
            z = self.c_skip * z + self.c_out * s.G(z, t, u)
        return s.head(z)


def export_one_step(student: ConsistencyStudent, example_x: Tensor, path: str | os.PathLike
                    ) -> tuple[Path, str]:
    """Export :class:`OneStepStudent` to ``path``; returns ``(path, method)``.

    ``method`` is ``"torch.export"`` (a ``torch.export.save`` archive, load it with
    ``torch.export.load(path).module()``; the batch dimension is dynamic where the model allows)
    or ``"torchscript"`` (``torch.jit.load``) when export fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = OneStepStudent(student).eval()
    tmp = path.with_name(f".tmp-{path.name}")  # same suffix (.pt2) as the target
    errors = []
    with torch.no_grad():
        for dynamic in (True, False):
            try:
                shapes = None
                if dynamic:
                    shapes = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)
                program = torch.export.export(module, (example_x,), dynamic_shapes=shapes)
                torch.export.save(program, tmp)
                os.replace(tmp, path)
                return path, "torch.export"
            except Exception as err:  # noqa: BLE001 - try the next way, report all if none works
                errors.append(f"torch.export (dynamic={dynamic}): {type(err).__name__}: {err}")
        warnings.warn("torch.export failed (" + "; ".join(e[:200] for e in errors)
                      + "); falling back to TorchScript tracing", stacklevel=2)
        traced = torch.jit.trace(module, (example_x,), check_trace=False)
        torch.jit.save(traced, str(tmp))
        os.replace(tmp, path)
    return path, "torchscript"


def load_exported(path: str | os.PathLike) -> nn.Module:
    """Load a file written by :func:`export_one_step` as a callable ``x -> logits`` module."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return torch.export.load(path).module()
    except Exception:  # noqa: BLE001 - not an export archive: try TorchScript
        try:
            return torch.jit.load(str(path))
        except Exception as err:  # noqa: BLE001
            raise CorruptFileError(f"{path} is neither a torch.export archive nor a TorchScript "
                                   f"file ({err})") from err


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, batch: int = 2) -> tuple[Path, str]:
    """Export the one-step student of a finished run (example input: its first test batch)."""
    from .pipeline import Run

    run = Run(run_dir)
    student = run.student()
    x, _ = next(iter(run.task.test_batches(batch)))
    if not isinstance(x, Tensor):
        raise ValueError(f"export needs a task whose inputs are one tensor; {run.config.task!r} "
                         f"gives {type(x).__name__}")
    return export_one_step(student, x, out)
