"""The configuration of a run (``DIR/config.json``): every section, validated, and how the
command line builds it from a task's defaults and the user's settings."""

from __future__ import annotations

import dataclasses
import json

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
    user = dict(user or {})
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
