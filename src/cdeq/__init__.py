"""cdeq: deep equilibrium models and their consistency-distilled (C-DEQ) students.

Examples:
    >>> teacher = cdeq.DEQModel(injection, cell, head, solver="anderson")  # doctest: +SKIP
    >>> trajectories = cdeq.record(teacher, train_batches, cdeq.RecordConfig())  # doctest: +SKIP
    >>> student = cdeq.ConsistencyStudent(teacher)                          # doctest: +SKIP
    >>> cdeq.distill(student, trajectories, cdeq.DistillConfig(), task_loss=loss)  # doctest: +SKIP
    >>> pipe = cdeq.Pipeline(student).select_plans(train_batches, loss=loss)  # doctest: +SKIP
    >>> logits = pipe(x, nfe=2)                                             # doctest: +SKIP
"""

from .consistency import (
    ConsistencyStudent,
    DistillConfig,
    PlanSearchConfig,
    RecordConfig,
    ScheduleConfig,
    StudentConfig,
    TimeSchedule,
    TrajectoryArrays,
    TrajectoryStore,
    distill,
    record,
    record_arrays,
)
from .deq import DEQ, DEQModel, ImplicitBackward, JacobianFreeBackward, PhantomBackward, SolverSpec
from .engine.batches import TensorItems, pairs
from .engine.config import Config, ConfigError
from .engine.deprecation import install_aliases
from .hub.describe import saveable
from .hub.pipeline import Pipeline
from .solvers import Solver, SolverResult, get_solver, register_solver

__version__ = "0.1.0"

# Where the modules of cdeq 0.1's flat layout live now: the old paths import with a warning.
install_aliases(__name__, {
    "config": "cdeq.engine.config", "io": "cdeq.engine.io", "fit": "cdeq.engine.fit",
    "precision": "cdeq.engine.precision", "distributed": "cdeq.engine.distributed",
    "threads": "cdeq.engine.threads", "progress": "cdeq.engine.progress", "checks": "cdeq.engine.checks",
    "consistency.inference": "cdeq.consistency.search", "plus": "cdeq.consistency.plus",
    "export": "cdeq.hub.export", "compile": "cdeq.hub.compile", "describe": "cdeq.hub.describe",
    "runconfig": "cdeq.run.config", "rundir": "cdeq.run.directory", "pipeline": "cdeq.run.stages",
    "training": "cdeq.run.teacher", "baselines": "cdeq.run.baselines", "evaluate": "cdeq.run.evaluate",
    "cost": "cdeq.run.cost", "report": "cdeq.run.report", "summary": "cdeq.run.summary",
    "sweep": "cdeq.run.seeds",
})

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
    "TensorItems",
    "TimeSchedule",
    "TrajectoryArrays",
    "TrajectoryStore",
    "distill",
    "get_solver",
    "pairs",
    "record",
    "record_arrays",
    "register_solver",
    "saveable",
]


def __getattr__(name: str) -> object:
    """Names of cdeq 0.1 kept for one release: ``cdeq.select_plans`` is now
    ``cdeq.Pipeline(student).select_plans`` (its engine: :func:`cdeq.consistency.search.select_plans`)."""
    if name == "select_plans":
        import warnings

        from .consistency.search import select_plans

        warnings.warn("cdeq.select_plans is deprecated; use cdeq.Pipeline(student).select_plans(batches, "
                      "loss=...) (the old name goes in the next release)", DeprecationWarning, stacklevel=2)
        return select_plans
    raise AttributeError(f"module 'cdeq' has no attribute {name!r}")
