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
from ..engine.config import Config, ConfigError, check_int, merged
from ..engine.fit import OptimConfig
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


def _pop(data: dict, key: str) -> tuple[bool, Any]:
    section, name = key.rsplit(".", 1)
    parent = data.get(section)
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
    ``cpu`` by default, as the GPU path is tested on CPU only (docs/gpu.md). It records where the
    run last started: a run may resume or be evaluated elsewhere. ``precision`` (``fp32``,
    ``bf16``) is the one place for mixed precision: it sets every optimiser loop's
    ``optim.precision`` (left unset in a run) and autocasts recording, plan search and evaluation.
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
        for key, optim in self.optim_sections().items():  # one place: the run's precision
            if optim.precision not in ("fp32", self.precision):
                raise ConfigError(f"{key}.precision={optim.precision!r} is not valid in a run "
                                  f"configuration; set the run-level precision instead (--set "
                                  f"precision={optim.precision})")
            optim.precision = self.precision
        self.task_cls().Config.from_dict(self.task_config, key_path="task_config")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None = None, *, key_path: str = "",
                  **overrides: Any) -> RunConfig:
        """As :meth:`Config.from_dict`, reading the keys of earlier versions (:func:`upgraded`, not
        strict: a saved run keeps loading; :func:`build_config` checks a user's settings)."""
        return super().from_dict(upgraded(data, strict=False), key_path=key_path, **overrides)

    def optim_sections(self) -> dict[str, OptimConfig]:
        """The optimiser loops of the run by key path (each takes the run's ``precision``)."""
        return {"teacher.optim": self.teacher.optim, "distill.optim": self.distill.optim,
                "baselines.init_optim": self.baselines.init_optim,
                "baselines.unrolled_optim": self.baselines.unrolled_optim}

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
    for key in RunConfig().optim_sections():  # a run's config.json, reused, agrees with itself
        section, name = key.split(".")
        given = (user.get(section) or {}).get(name) if isinstance(user.get(section), dict) else None
        if isinstance(given, dict) and given.get("precision", user.get("precision", "fp32")) != \
                user.get("precision", "fp32"):
            raise ConfigError(f"{key}.precision={given['precision']!r} is not a setting of its own: "
                              "the run-level precision sets every stage (--set precision=bf16)")
    data = merged(TASKS[task].run_defaults(quick), user)
    data["task"] = task
    return RunConfig.from_dict(data)


def with_defaults(old: dict) -> dict:
    """``old`` (a run's config.json) with the sections and keys added since filled by defaults."""
    try:
        return json.loads(json.dumps(RunConfig.from_dict(old).to_dict()))
    except (ConfigError, TypeError, ValueError):
        return old
