"""The configuration of a run (``DIR/config.json``): every section, validated, and how the
command line builds it from a task's defaults and the user's settings."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import Any

from ..consistency.distill import DistillConfig
from ..consistency.plus import PlusConfig
from ..consistency.schedule import ScheduleConfig
from ..consistency.search import PlanSearchConfig
from ..consistency.student import StudentConfig
from ..consistency.trajectory import RecordConfig
from ..consistency.tune import TuneConfig
from ..engine.config import Config, ConfigError, check_int, merged
from ..engine.precision import check_device, check_precision
from ..tasks import TASKS, Task
from .baselines import BaselineConfig
from .evaluate import EvalConfig
from .teacher import TeacherConfig

logger = logging.getLogger(__name__)

MOVED: dict[str, str] = {
    "distill.start_weight": "plus.start_weight",
    "distill.init_weight": "plus.init_weight",
    "distill.chain_k": "plus.chain_k",
    "distill.chain_data": "plus.chain_data",
}
"""Settings that moved, old key -> new key: a configuration written with the old key (a saved run's
``config.json``, ``--config``, ``--set``) is read with it in its new place (logged)."""

_FIXED_RULE = ("the plan search's rule is fixed (cdeq.consistency.search); benchmarks/tie_rule.py "
               "compares the alternatives")
REMOVED: dict[str, tuple[Any, str]] = {
    "plus.train_injection": (False, "C-DEQ+ has its own injection when the C-DEQ student has one "
                                    "(student.train_injection)"),
    "plans.error_must_not_rise": (True, _FIXED_RULE),
    "plans.tie_break": ("error", _FIXED_RULE),
    "plans.tie_within_se": (1.0, _FIXED_RULE),
    "plans.tie_with_teacher": (True, _FIXED_RULE),
    "plans.teacher_within_se": (0.0, _FIXED_RULE),
    "plans.teacher_head": (True, _FIXED_RULE),
    "evaluate.reference": (None, "the report's converged teacher and z* use the teacher's eval solver: "
                                 "set teacher.eval_solver (e.g. --set teacher.eval_solver.max_iter=30)"),
}
"""Settings that were removed, key -> (the value that meant today's behaviour, or ``None`` for
none; what to do instead). That value is dropped. Any other is an error that says what replaced
it in the settings a user gives (:func:`build_config`), and is logged and dropped in a saved run's
configuration (which keeps loading: its stages' outputs were made with it)."""


OPTIM_SECTIONS = ("teacher.optim", "distill.optim", "baselines.init_optim", "baselines.unrolled_optim")
"""The optimiser loops of a run, which had a ``precision`` of their own before the run's was the
one place for it."""


def _pop(data: dict, key: str) -> tuple[bool, Any]:
    """Remove the dotted ``key`` from the nested mapping ``data``: ``(found, value)``."""
    *sections, name = key.split(".")
    parent: Any = data
    for section in sections:
        parent = parent.get(section) if isinstance(parent, dict) else None
    if isinstance(parent, dict) and name in parent:
        return True, parent.pop(name)
    return False, None


def upgraded(data: Mapping[str, Any] | None, strict: bool = True) -> dict[str, Any]:
    """``data`` (a run configuration as written by any cdeq 0.1) with :data:`MOVED` keys in their
    new place and :data:`REMOVED` keys dropped. A moved key given beside its new key with another
    value is a :class:`ConfigError`; so is a removed key set to anything but its neutral value when
    ``strict`` (otherwise it is logged and dropped)."""
    data = copy.deepcopy(dict(data or {}))
    for old, new in MOVED.items():
        found, value = _pop(data, old)
        if not found:
            continue
        section, name = new.rsplit(".", 1)
        target = data.setdefault(section, {})
        if not isinstance(target, dict):
            continue  # the new section is not a mapping: its own error follows
        if name in target and target[name] != value:
            raise ConfigError(f"{old}={value!r} and {new}={target[name]!r} disagree: {old} is now "
                              f"{new}; set only {new}")
        target[name] = value
        logger.info("%s is now %s: read as %s=%r", old, new, new, value)
    run_precision = data.get("precision", "fp32")
    for section in OPTIM_SECTIONS:  # each loop's precision was the run's (or unset: fp32)
        found, value = _pop(data, f"{section}.precision")
        if found and value not in ("fp32", run_precision):
            message = (f"{section}.precision={value!r} is no longer a setting: the run-level "
                       f"precision sets every stage (--set precision={value})")
            if strict:
                raise ConfigError(message)
            logger.info("%s: ignored", message)
    for key, (neutral, instead) in REMOVED.items():
        found, value = _pop(data, key)
        if found and value != neutral:
            if strict:
                raise ConfigError(f"{key}={value!r} is no longer a setting: {instead}")
            logger.info("%s=%r is no longer a setting (%s): ignored", key, value, instead)
    return data


@dataclasses.dataclass
class RunConfig(Config):
    """Everything a run needs; written to ``DIR/config.json``.

    ``task`` holds the task's own settings (validated by the task's config class). ``device``
    (``cpu``, ``cuda[:N]``, ``auto``) is where every stage runs, models and batches moved there;
    ``cpu`` by default, as the GPU path is tested on CPU only (docs/how-to/gpu.md). It records where the
    run last started: a run may resume or be evaluated elsewhere. ``precision`` (``fp32``,
    ``bf16``) is the one place for mixed precision: every stage runs under its autocast (the
    optimiser steps of the trained stages, recording, plan search and evaluation).
    """

    task: str = "digits"
    task_config: dict = dataclasses.field(default_factory=dict)
    teacher: TeacherConfig = dataclasses.field(default_factory=TeacherConfig)
    record: RecordConfig = dataclasses.field(default_factory=RecordConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    student: StudentConfig = dataclasses.field(default_factory=StudentConfig)
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)
    plans: PlanSearchConfig = dataclasses.field(default_factory=PlanSearchConfig)
    evaluate: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    baselines: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)
    plus: PlusConfig = dataclasses.field(default_factory=PlusConfig)
    tune: TuneConfig = dataclasses.field(default_factory=TuneConfig)
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    precision: str = "fp32"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not valid; choose from {sorted(TASKS)}")
        check_int("seed", self.seed, minimum=0)
        check_int("threads", self.threads, minimum=0)
        check_device(self.device)
        check_precision(self.precision)
        self.task_cls().Config.from_dict(self.task_config, key_path="task_config")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, *, key_path: str = "",
                  **overrides: Any) -> RunConfig:
        """As :meth:`Config.from_dict`, reading the keys of earlier versions (:func:`upgraded`, not
        strict: a saved run keeps loading; :func:`build_config` checks a user's settings)."""
        return super().from_dict(upgraded(data, strict=False), key_path=key_path, **overrides)

    def task_cls(self) -> type[Task]:
        return TASKS[self.task]


def build_config(task: str, user: dict | None = None, quick: bool = False) -> RunConfig:
    """The task's defaults (its quick preset with ``quick``), overridden by ``user``."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    user = upgraded(user)
    if user.get("task", task) != task:
        raise ConfigError(f"task={user['task']!r} is not valid here: the run's task is {task!r} (the "
                          "TASK of `cdeq run TASK`); leave task out of --set and --config")
    data = merged(TASKS[task].run_defaults(quick), user)
    data["task"] = task
    return RunConfig.from_dict(data)


def with_defaults(old: dict) -> dict:
    """``old`` (a run's config.json) with the sections and keys added since filled by defaults."""
    try:
        return json.loads(json.dumps(RunConfig.from_dict(old).to_dict()))
    except (ConfigError, TypeError, ValueError):
        return old
