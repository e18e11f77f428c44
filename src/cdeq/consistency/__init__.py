"""C-DEQ: the time schedule, trajectories, the consistency student, distillation and inference."""

from ..engine.tree import relative_error
from .arrays import TrajectoryArrays
from .distill import DistillConfig, distill, relative_distance
from .ema import EMA
from .online import projected_bytes, record_arrays, regenerate
from .pairs import PAIR_SAMPLERS, PairSampler
from .schedule import ScheduleConfig, TimeSchedule
from .search import PlanSearchConfig, loss_score, select_plans
from .student import ConsistencyStudent, Plan, StudentConfig, frozen_call
from .trajectory import RecordConfig, TrajectoryBatch, TrajectoryStore, record, record_batch

__all__ = [
    "EMA",
    "PAIR_SAMPLERS",
    "ConsistencyStudent",
    "DistillConfig",
    "PairSampler",
    "Plan",
    "PlanSearchConfig",
    "RecordConfig",
    "ScheduleConfig",
    "StudentConfig",
    "TimeSchedule",
    "TrajectoryArrays",
    "TrajectoryBatch",
    "TrajectoryStore",
    "distill",
    "frozen_call",
    "loss_score",
    "projected_bytes",
    "record",
    "record_arrays",
    "record_batch",
    "regenerate",
    "relative_distance",
    "relative_error",
    "select_plans",
]
