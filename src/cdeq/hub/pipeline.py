"""The C-DEQ pipeline object (teacher + student + plans), saved and loaded in the hub layout.

A *pretrained directory* holds everything needed to rebuild a pipeline without the run or the
script that made it::

    DIR/model.safetensors   the student's state dict (teacher included), versioned + checksummed
    DIR/config.json         how to rebuild the teacher: each module's import path and init
                            arguments (``cdeq.hub.describe``), or a registered task and its config;
                            the teacher's solvers and backward as it ran them (``solvers``,
                            applied on load), schedule, student config and inference plans;
                            for a C-DEQ+ student (:class:`cdeq.consistency.plus.PlusStudent`)
                            its start (``plus``)

With ``huggingface_hub`` installed (``pip install cdeq[hub]``) :class:`Pipeline` also mixes in
its ``PyTorchModelHubMixin``: ``from_pretrained`` then also takes a hub repository id, and
``push_to_hub`` uploads. Deployment: :class:`OneStepStudent` wraps a student as ``x -> logits``
with exactly one layer call and no data-dependent control flow, so ``torch.export`` and
``torch.compile`` handle it; :func:`export_one_step` writes it (``.pt2``).

Examples:
    >>> pipe = Pipeline(student).select_plans(train_batches, loss=F.cross_entropy)   # doctest: +SKIP
    >>> logits = pipe(x, nfe=2)                                    # doctest: +SKIP
    >>> pipe.save_pretrained("my-cdeq"); Pipeline.from_pretrained("my-cdeq")      # doctest: +SKIP
    >>> export_one_step(pipe.student, example_x, "student.pt2")    # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from ..consistency.plans import plans_from_json, plans_to_json
from ..consistency.plus import PlusStudent
from ..consistency.schedule import ScheduleConfig, TimeSchedule
from ..consistency.search import PlanSearchConfig, select_plans
from ..consistency.student import ConsistencyStudent, Plan, StudentConfig
from ..deq.layer import _is_shape
from ..deq.model import DEQModel
from ..engine.config import ConfigError
from ..engine.io import CorruptFileError, load_tensors, read_json, save_tensors, write_json
from ..engine.precision import resolve_device
from ..solvers import Solver, SolverSpec
from .describe import build, describe

__all__ = ["Pipeline", "from_pretrained", "load_student", "save_pretrained"]
log = logging.getLogger(__name__)
HUB_FORMAT = 2
READS = (1, 2)
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MAKE_PRETRAINED = "cdeq export --model RUN --out FILE --pretrained DIR"

try:  # the optional hub integration (extra "hub")
    from huggingface_hub import PyTorchModelHubMixin

    _MIXIN: tuple[type, ...] = (PyTorchModelHubMixin,)
    _MIXIN_KW: dict[str, Any] = {"library_name": "cdeq", "tags": ["deq", "c-deq"]}
except ImportError:  # pragma: no cover - depends on the environment
    _MIXIN, _MIXIN_KW = (), {}


def _solver_json(spec: Any) -> Any:
    if isinstance(spec, SolverSpec):
        return {"name": spec.name, "max_iter": spec.max_iter, "tol": spec.tol,
                "stop_mode": spec.stop_mode, **spec.options}
    if isinstance(spec, Solver):
        return {"name": spec.name, **spec.options.to_dict()}
    return spec


def teacher_recipe(teacher: DEQModel, channels: Any, channel_dim: Any) -> dict[str, Any]:
    """The JSON that rebuilds ``teacher``'s architecture (see :mod:`cdeq.hub.describe`)."""
    deq = {k: _solver_json(v) for k, v in teacher.deq_kwargs.items()}
    bad = [k for k, v in deq.items() if not isinstance(v, (str, int, float, dict))]
    if bad:
        kinds = [type(deq[k]).__name__ for k in bad]
        raise ConfigError(f"cannot save the DEQModel's {bad} settings ({kinds}); give solvers and "
                          "the backward by name or as dicts")
    shape = teacher.state_shape
    if callable(shape):
        shape = {"__module__": describe(shape)}
    elif shape is not None and not _is_shape(shape):  # a structured state's per-part dims
        flat, spec = tree_flatten(shape, is_leaf=_is_shape)
        shape = {"__structure__": treespec_dumps(spec), "shapes": [list(s) for s in flat]}
    return {"injection": describe(teacher.injection), "cell": describe(teacher.cell),
            "head": describe(teacher.head), "state_shape": shape if shape is None or isinstance(shape, dict)
            else list(shape), "channels": channels, "channel_dim": channel_dim, "deq": deq}


def build_teacher(recipe: dict[str, Any]) -> DEQModel:
    """A fresh :class:`DEQModel` from :func:`teacher_recipe`'s JSON."""
    shape = recipe.get("state_shape")
    if isinstance(shape, dict) and "__structure__" in shape:
        shape = tree_unflatten([tuple(s) for s in shape["shapes"]], treespec_loads(shape["__structure__"]))
    elif isinstance(shape, dict):
        shape = build(shape["__module__"])
    deq = dict(recipe.get("deq", {}))
    defaults = {"max_iter": deq.get("max_iter", 30), "tol": deq.get("tol", 1e-4)}  # DEQ's
    for key in ("solver", "eval_solver"):  # a solver saved as JSON is read into its spec
        if isinstance(deq.get(key), dict):
            deq[key] = SolverSpec.from_json({**defaults, **deq[key]})
    return DEQModel(build(recipe["injection"]), build(recipe["cell"]), build(recipe["head"]),
                    state_shape=shape, channels=recipe["channels"], channel_dim=recipe["channel_dim"],
                    **deq)


def solver_settings(teacher: DEQModel) -> dict[str, Any]:
    """The solvers and backward ``teacher`` runs now (those a run's ``TeacherConfig`` set, say), as
    JSON: ``{"solver": ..., "eval_solver": ..., "backward": ...}``."""
    deq = teacher.deq
    backward = teacher.deq_kwargs.get("backward", deq.backward_strategy.name)
    return {"solver": _solver_json(deq.solver), "eval_solver": _solver_json(deq.eval_solver),
            "backward": backward if isinstance(backward, (str, dict)) else deq.backward_strategy.name}


def apply_solver_settings(teacher: DEQModel, settings: dict[str, Any]) -> None:
    """Give ``teacher`` the solvers and backward of :func:`solver_settings`' JSON."""
    from ..deq.backward import get_backward

    teacher.deq.solver = SolverSpec.from_json(settings["solver"]).build()
    teacher.deq.eval_solver = SolverSpec.from_json(settings["eval_solver"]).build()
    teacher.deq.backward_strategy = get_backward(settings["backward"])
    teacher.deq_kwargs.update(settings)


def _read_config(directory: Path) -> dict[str, Any]:
    cfg_path = directory / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} does not exist: not a directory written by save_pretrained")
    cfg = read_json(cfg_path)
    fmt = cfg.get("cdeq_hub_format") if isinstance(cfg, dict) else None
    if fmt is None and ((directory / "student.safetensors").exists() or (
            isinstance(cfg, dict) and {"task", "distill"} <= set(cfg))):
        raise ConfigError(f"{directory} is a cdeq run directory, not a pretrained directory; make one "
                          f"from it with `{MAKE_PRETRAINED}`, or load the run's student with "
                          f"cdeq.run.stages.Run({str(directory)!r}).student()")
    if fmt not in READS:
        raise CorruptFileError(f"{cfg_path} has hub format {fmt!r}; this cdeq reads formats {list(READS)} "
                               "(written by save_pretrained)")
    return cfg


def load_student(directory: str | os.PathLike, device: str | torch.device = "cpu") -> ConsistencyStudent:
    """Rebuild the student saved in a pretrained directory (in eval mode), on ``device``
    (a name for :func:`cdeq.engine.precision.resolve_device`, or a :class:`torch.device`)."""
    directory = Path(directory)
    cfg = _read_config(directory)
    cfg_path = directory / CONFIG
    if "teacher" in cfg:
        teacher = build_teacher(cfg["teacher"])
    else:
        from ..tasks import TASKS

        name = cfg.get("task")
        if name not in TASKS:
            raise ConfigError(f"{cfg_path} names task {name!r}, which is not registered; known tasks: "
                              f"{sorted(TASKS)}")
        task_cls = TASKS[name]
        teacher = task_cls(task_cls.Config.from_dict(cfg.get("task_config", {}))).build_model()
    if "solvers" in cfg:  # written since the format recorded them; the task's defaults otherwise
        apply_solver_settings(teacher, cfg["solvers"])
    schedule = TimeSchedule(ScheduleConfig.from_dict(cfg["schedule"]))
    student_config = StudentConfig.from_dict(cfg["student"])
    if "plus" in cfg:  # C-DEQ+: its start h(u) and times
        student: ConsistencyStudent = PlusStudent(teacher, schedule, student_config, **cfg["plus"])
    else:
        student = ConsistencyStudent(teacher, schedule, student_config)
    tensors, _ = load_tensors(directory / WEIGHTS, kind="student")
    try:
        student.load_state_dict(tensors)
    except RuntimeError as err:
        raise ConfigError(f"{directory / WEIGHTS} does not match the model rebuilt from {cfg_path}: "
                          f"{err}") from err
    plans = plans_from_json(cfg["plans"])
    if cfg.get("plans_selected", True):
        student.plans = plans
    return student.to(resolve_device(device)).eval()


class Pipeline(nn.Module, *_MIXIN, **_MIXIN_KW):
    """Teacher + student + plans: ``pipe(x, nfe=k)`` gives logits with at most ``k`` layer calls.

    The model (the student, holding the teacher) and the scheduler (its schedule and plans) stay
    separate objects; the pipeline joins them, chooses plans, and saves and loads them.

    Args:
        student: a (distilled) :class:`ConsistencyStudent`; ``pipe.teacher`` is its teacher.
        task: for students of a registered task, its name: the teacher is then rebuilt through
            the task instead of from its recorded modules.
        task_config: that task's settings (``task_config`` of a run).
    """

    def __init__(self, student: ConsistencyStudent, task: str | None = None,
                 task_config: dict | None = None) -> None:
        super().__init__()
        if not isinstance(student, ConsistencyStudent):
            raise TypeError(f"Pipeline takes a ConsistencyStudent, not {type(student).__name__}")
        self.student = student
        self.task, self.task_config = task, dict(task_config or {})
        self.search: dict[str, Any] | None = None  # the last plan search's log

    @property
    def teacher(self) -> DEQModel:
        return self.student.teacher

    @property
    def plans(self) -> dict[int, Plan]:
        return self.student.plans

    def select_plans(self, batches: Iterable[Any], loss: Callable[[Tensor, Any], Tensor] | None = None,
                     max_nfe: int = 4, **kwargs: Any) -> Pipeline:
        """Choose plans for ``1..max_nfe`` NFE on ``batches`` (validation or training data, never
        test); returns ``self``.

        ``batches``: ``(x, y)`` pairs with ``loss`` (a task loss ``(logits, y) -> mean``), or, with
        no ``loss``, inputs ``x`` (or pairs, labels ignored) scored against the converged teacher.
        ``kwargs`` go to :func:`cdeq.consistency.search.select_plans` (``score`` and
        ``higher_is_better`` for a metric of each item, ``config`` for the search's settings); the
        search log is kept in ``self.search``. This is the one way to choose plans; the search
        function is its engine."""
        config = kwargs.pop("config", None) or PlanSearchConfig(max_nfe=max_nfe)
        self.search = select_plans(self.student, batches, loss=loss, config=config, **kwargs)
        return self

    def forward(self, x: Any, nfe: int = 1) -> Tensor:
        """``pipe(x, nfe=k)``: the logits ``(B, ...)`` of the inputs ``x`` (a batch ``(B, ...)``)
        with at most ``nfe`` layer calls, without gradients (the plan chosen for that budget; its
        engine is :meth:`ConsistencyStudent.predict`, which also returns the state reached)."""
        return self.student.predict(x, nfe)[0]

    def predict(self, x: Any, nfe: int = 1) -> tuple[Tensor, Any]:
        """Deprecated: ``pipe(x, nfe)`` for the logits, ``pipe.student.predict(x, nfe)`` for
        ``(logits, z)``."""
        warnings.warn("Pipeline.predict is deprecated; use pipe(x, nfe) for the logits, or "
                      "pipe.student.predict(x, nfe) for (logits, z) (it goes in the next release)",
                      DeprecationWarning, stacklevel=2)
        return self.student.predict(x, nfe)

    def config_dict(self) -> dict[str, Any]:
        """The ``config.json`` content (raises ``ConfigError`` when a module cannot be recorded)."""
        s = self.student
        cfg: dict[str, Any] = {"cdeq_hub_format": HUB_FORMAT, "library": "cdeq"}
        if self.task is not None:
            from ..tasks import TASKS

            if self.task not in TASKS:
                raise ConfigError(f"unknown task {self.task!r}; choose from {sorted(TASKS)}, or leave "
                                  "task unset to record the model's own modules")
            cfg.update(task=self.task, task_config=self.task_config)
        else:
            cfg["teacher"] = teacher_recipe(s.teacher, s.channels, s.channel_dim)
        if isinstance(s, PlusStudent):
            cfg["plus"] = s.plus_settings()
        cfg.update(solvers=solver_settings(s.teacher), schedule=s.schedule.config.to_dict(),
                   student=s.config.to_dict(),
                   plans=plans_to_json(s.plans),
                   plans_selected=s.plans_selected)
        json.dumps(cfg)  # fail before writing anything
        return cfg

    def _save_pretrained(self, save_directory: Path) -> None:
        cfg = self.config_dict()
        save_directory.mkdir(parents=True, exist_ok=True)
        save_tensors(save_directory / WEIGHTS, self.student.state_dict(), kind="student")
        write_json(save_directory / CONFIG, cfg)

    def save_pretrained(self, directory: str | os.PathLike, **hub_kwargs: Any) -> Path:
        """Write the pipeline to ``directory``: ``config.json`` (how to rebuild the teacher, the
        schedule, the student's configuration and its plans) and ``model.safetensors``.

        Args:
            directory: the folder to write (created when missing).
            **hub_kwargs: ``push_to_hub``, ``repo_id``, ... of ``huggingface_hub``'s
                ``PyTorchModelHubMixin`` (needs the ``hub`` extra).

        Returns:
            The directory written.

        Raises:
            ConfigError: a module of the teacher cannot be recorded (the message says how to make
                it recordable); nothing is written then.
        """
        directory = Path(directory)
        self.config_dict()  # a module that cannot be recorded fails here, before any file is written
        if _MIXIN:
            PyTorchModelHubMixin.save_pretrained(self, directory, **hub_kwargs)
        elif hub_kwargs:
            raise ConfigError(f"{sorted(hub_kwargs)} need huggingface_hub: pip install 'cdeq[hub]'")
        else:
            self._save_pretrained(directory)
        return directory

    @classmethod
    def from_pretrained(cls, name_or_directory: str | os.PathLike, device: str | torch.device = "cpu",
                        **hub_kwargs: Any) -> Pipeline:
        """Load a pipeline written by :meth:`save_pretrained`.

        Args:
            name_or_directory: a pretrained directory or, with the ``hub`` extra, a Hugging Face
                Hub repository id.
            device: where to load it (``cpu``, ``cuda``, ``cuda:N``, ``auto``).
            **hub_kwargs: download options of ``huggingface_hub`` (``revision``, ``cache_dir``, ...).

        Returns:
            The pipeline, in eval mode, with the plans it was saved with.

        Raises:
            FileNotFoundError: no such directory (and not a repository id).
        """
        name = str(name_or_directory)
        local = os.path.isdir(name)
        if not local and (os.path.exists(name) or os.path.isabs(name) or name.startswith(".")
                          or name.count("/") > 1 or not _MIXIN):
            raise FileNotFoundError(f"{Path(name) / CONFIG} does not exist: not a directory written by "
                                    "save_pretrained" + ("" if _MIXIN else " (a hub repository id needs "
                                                         "huggingface_hub: pip install 'cdeq[hub]')"))
        if _MIXIN:  # a folder or a hub repository id, through the mixin's loader
            return PyTorchModelHubMixin.from_pretrained.__func__(cls, name, device=device, **hub_kwargs)
        return cls._load(Path(name), device)

    @classmethod
    def _load(cls, directory: Path, device: str | torch.device = "cpu") -> Pipeline:
        cfg = _read_config(directory)
        return cls(load_student(directory, device), cfg.get("task"), cfg.get("task_config"))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None = None, cache_dir: Any = None,
                         force_download: bool = False, local_files_only: bool = False,
                         token: Any = None, device: str | torch.device = "cpu", **_config: Any
                         ) -> Pipeline:
        """The hub mixin's loading hook: fetch the two files unless ``model_id`` is a folder."""
        if not os.path.isdir(model_id):
            from huggingface_hub import snapshot_download

            model_id = snapshot_download(model_id, revision=revision, cache_dir=cache_dir,
                                         force_download=force_download, token=token,
                                         local_files_only=local_files_only,
                                         allow_patterns=[CONFIG, WEIGHTS])
        return cls._load(Path(model_id), device)


def save_pretrained(student: ConsistencyStudent, directory: str | os.PathLike, task: str | None = None,
                    task_config: dict[str, Any] | None = None) -> Path:
    """``Pipeline(student, task, task_config).save_pretrained(directory)``."""
    return Pipeline(student, task, task_config).save_pretrained(directory)


def from_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu") -> ConsistencyStudent:
    """The student of ``Pipeline.from_pretrained(directory, device)`` (in eval mode)."""
    return Pipeline.from_pretrained(directory, device).student
