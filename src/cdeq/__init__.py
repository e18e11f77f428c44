"""cdeq: deep equilibrium models and their consistency-distilled (C-DEQ) students.

Example:
    >>> teacher = cdeq.DEQModel(injection, cell, head, solver="anderson")  # doctest: +SKIP
    >>> trajectories = cdeq.record(teacher, train_batches, cdeq.RecordConfig())  # doctest: +SKIP
    >>> student = cdeq.ConsistencyStudent(teacher)                          # doctest: +SKIP
    >>> cdeq.distill(student, trajectories, cdeq.DistillConfig(), task_loss=loss)  # doctest: +SKIP
    >>> pipe = cdeq.Pipeline(student).select_plans(train_batches, loss=loss)  # doctest: +SKIP
    >>> logits = pipe(x, nfe=2)                                             # doctest: +SKIP
"""

from .config import Config, ConfigError
from .consistency import (
    ConsistencyStudent,
    DistillConfig,
    PlanSearchConfig,
    RecordConfig,
    ScheduleConfig,
    StudentConfig,
    TimeSchedule,
    distill,
    record,
    select_plans,
)
from .deq import DEQ, DEQModel, ImplicitBackward, JacobianFreeBackward, PhantomBackward, SolverSpec
from .describe import saveable
from .hub import Pipeline
from .solvers import Solver, SolverResult, get_solver, register_solver

__version__ = "0.1.0"

__all__ = [
    "DEQ",
    "Config",
    "ConfigError",
    "ConsistencyStudent",
    "DEQModel",
    "DistillConfig",
    "ImplicitBackward",
    "JacobianFreeBackward",
    "PhantomBackward",
    "Pipeline",
    "PlanSearchConfig",
    "RecordConfig",
    "ScheduleConfig",
    "Solver",
    "SolverResult",
    "SolverSpec",
    "StudentConfig",
    "TimeSchedule",
    "distill",
    "get_solver",
    "record",
    "register_solver",
    "saveable",
    "select_plans",
]
