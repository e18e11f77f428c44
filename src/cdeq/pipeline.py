"""The stages of a run and the files each leaves in the run directory.

::

    DIR/config.json                     the full, validated configuration of the run
    DIR/teacher.safetensors (+ .json)   stage ``train``   (checkpoint: DIR/teacher.ckpt)
    DIR/trajectories/shard_*.safetensors + manifest.json    stage ``record``
    DIR/student.safetensors (+ .json)   stage ``distill`` (checkpoint: DIR/student.ckpt)
    DIR/report.json, table.md, plot.png stage ``evaluate``

Each stage reads the files of the one before, so a user can rerun one stage alone. A stage whose
output exists is skipped by :func:`run` (delete the file to redo it); a stage interrupted after an
epoch resumes from its checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .baselines import BaselineConfig
from .config import Config, ConfigError, check_int
from .consistency.distill import DistillConfig, distill
from .consistency.inference import PlanSearchConfig, plan_from_json, plan_to_json, select_plans
from .consistency.schedule import ScheduleConfig, TimeSchedule
from .consistency.student import ConsistencyStudent, StudentConfig
from .consistency.trajectory import (
    RecordConfig,
    TrajectoryStore,
    record,
    residual_summary,
    warn_unconverged,
)
from .deq.model import DEQModel
from .evaluate import EvalConfig, evaluate
from .io import load_checkpoint, load_tensors, read_json, save_checkpoint, save_tensors, write_json
from .report import markdown_table, write_report
from .tasks import TASKS, Task
from .threads import apply_thread_policy
from .training import TeacherConfig, evaluate_model, train_teacher


@dataclasses.dataclass
class RunConfig(Config):
    """Everything a run needs; written to ``DIR/config.json``.

    ``task`` holds the task's own settings (validated by the task's config class).
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
    seed: int = 0
    threads: int = 0

    def validate(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not valid; choose from {sorted(TASKS)}")
        check_int("seed", self.seed, minimum=0)
        check_int("threads", self.threads, minimum=0)
        self.task_cls().Config.from_dict(self.task_config)  # validates the task's keys

    def task_cls(self) -> type[Task]:
        return TASKS[self.task]


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "options":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(task: str, user: dict | None = None, quick: bool = False) -> RunConfig:
    """The task's defaults (its quick preset with ``quick``), overridden by ``user``."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    defaults = TASKS[task].run_defaults(quick)
    merged = _merge(defaults, dict(user or {}))
    merged["task"] = task
    return RunConfig.from_dict(merged)


class Run:
    """A run directory and the stages that fill it."""

    def __init__(self, out_dir: str | Path, config: RunConfig | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.dir = Path(out_dir)
        cfg_path = self.dir / "config.json"
        if config is None:
            if not cfg_path.exists():
                raise FileNotFoundError(f"{cfg_path} does not exist: start the run with `cdeq run` "
                                        "or `cdeq train`, which write it")
            config = RunConfig.from_dict(read_json(cfg_path))
        elif cfg_path.exists():
            old = _with_defaults(read_json(cfg_path))  # sections added since are at their defaults
            if old != json.loads(json.dumps(config.to_dict())):
                raise ConfigError(
                    f"{self.dir} already holds a run with another configuration; use a new --out "
                    "directory, or delete the old run to start over")
        self.config = config
        self.dir.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():  # under torchrun only rank 0 writes run files
            write_json(cfg_path, config.to_dict())
        self._log = log or print
        self._task: Task | None = None
        self._solo = False
        self.threads = apply_thread_policy(config.threads)  # 0: a fair share of the free cores

    def log(self, msg: str) -> None:
        if not distributed.is_main():
            return
        self._log(msg)
        with open(self.dir / "log.txt", "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    @property
    def task(self) -> Task:
        if self._task is None:
            cls = self.config.task_cls()
            self._task = cls(cls.Config.from_dict(self.config.task_config))
        return self._task

    # --- files ------------------------------------------------------------------------------
    def _save_module(self, name: str, module: torch.nn.Module, meta: dict) -> None:
        if distributed.is_main():
            save_tensors(self.dir / f"{name}.safetensors", module.state_dict(), kind=name, meta=meta)
        if not self._solo:
            distributed.barrier()  # the other ranks read it next

    def _load_module(self, name: str, module: torch.nn.Module) -> dict:
        tensors, meta = load_tensors(self.dir / f"{name}.safetensors", kind=name)
        try:
            module.load_state_dict(tensors)
        except RuntimeError as err:
            raise ConfigError(f"{self.dir / (name + '.safetensors')} does not match the model built "
                              f"from config.json: {str(err).splitlines()[0]}") from err
        return meta

    def _save_checkpoint(self, name: str, payload: dict) -> None:
        if distributed.is_main():
            save_checkpoint(self.dir / f"{name}.ckpt", payload)  # versioned + checksummed, atomic

    def _load_checkpoint(self, name: str) -> dict | None:
        path = self.dir / f"{name}.ckpt"
        if not path.exists():
            return None
        return load_checkpoint(path)  # CorruptFileError naming the file when it is damaged

    def teacher(self) -> DEQModel:
        model = self.task.build_model()
        self._load_module("teacher", model)
        model.eval()
        return model

    def student(self, teacher: DEQModel | None = None) -> ConsistencyStudent:
        teacher = teacher or self.teacher()
        student = ConsistencyStudent(teacher, TimeSchedule(self.config.schedule), self.config.student)
        meta = self._load_module("student", student)
        student.plans = {int(k): plan_from_json(v) for k, v in meta["plans"].items()}
        student.eval()
        return student

    # --- stages -------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        model = self.task.build_model()
        start, state = 0, None
        ckpt = self._load_checkpoint("teacher")
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            start, state = ckpt["epoch"] + 1, ckpt["state"]
            self.log(f"resuming teacher training after epoch {start}")

        def save(epoch: int, st: dict) -> None:
            self._save_checkpoint("teacher", {"epoch": epoch, "model": model.state_dict(), "state": st})

        history = train_teacher(self.task, model, cfg.teacher, seed=cfg.seed, log=self.log,
                                on_epoch_end=save, start_epoch=start, optimizer_state=state)
        elapsed = sum(history["epoch_time"])  # every epoch's, a resumed run's earlier ones too
        model.eval()
        result = evaluate_model(self.task, model, cfg.evaluate.batch_size)
        self.log(f"teacher: held-out {self.task.metric} {result['metric']:.4f} at "
                 f"{result['nfe']:.1f} NFE ({elapsed:.0f}s training)")
        self._save_module("teacher", model, {"task": cfg.task, "train_time_s": elapsed, **result})
        return result

    def record(self) -> TrajectoryStore:
        cfg = self.config
        teacher = self.teacher()
        store = TrajectoryStore(self.dir / "trajectories")
        t0 = time.perf_counter()
        record(teacher, self.task.record_batches(cfg.record.batch_size), cfg.record, store=store)
        summary = residual_summary(store, cfg.distill.max_residual)
        self.log(f"recorded {store.manifest()['samples']} training samples in {len(store)} shards "
                 f"({time.perf_counter() - t0:.0f}s); unconverged (residual > "
                 f"{cfg.distill.max_residual:g}): {100 * summary['unconverged_fraction']:.1f}%")
        if summary["unconverged_fraction"] > 0.05:
            self.log(f"warning: {100 * summary['unconverged_fraction']:.1f}% of the recorded samples "
                     f"did not converge (max residual {summary['max_residual']:.2e}); they are left "
                     "out of the consistency losses")
            warn_unconverged(summary, cfg.distill.max_residual, 0.05)  # a real warning, too
        return store

    def distill(self) -> ConsistencyStudent:
        cfg = self.config
        teacher = self.teacher()
        store = TrajectoryStore(self.dir / "trajectories")
        trajectories = list(store) if _fits_in_memory(store) else store
        torch.manual_seed(cfg.seed)
        student = ConsistencyStudent(teacher, TimeSchedule(cfg.schedule), cfg.student)
        start, state = 0, None
        ckpt = self._load_checkpoint("student")
        if ckpt is not None:
            student.load_state_dict(ckpt["model"])
            start, state = ckpt["epoch"] + 1, ckpt["state"]
            self.log(f"resuming distillation after epoch {start}")

        def save(epoch: int, st: dict) -> None:
            self._save_checkpoint("student", {"epoch": epoch, "model": student.state_dict(), "state": st})

        history = distill(student, trajectories, cfg.distill, task_loss=self.task.loss, seed=cfg.seed,
                          log=self.log, on_epoch_end=save, start_epoch=start, resume_state=state)
        elapsed = sum(history["epoch_time"])  # every epoch's, a resumed run's earlier ones too
        last = int(store.manifest()["last"])
        t1 = time.perf_counter()
        search = select_plans(student, self.task.selection_batches(cfg.evaluate.batch_size),
                              self._score, self.task.higher_is_better, last, cfg.plans)
        self.log(f"distilled in {elapsed:.0f}s; plan search on training data "
                 f"{time.perf_counter() - t1:.0f}s")
        meta = {"plans": {str(k): plan_to_json(p) for k, p in student.plans.items()},
                "search": search, "train_time_s": elapsed}
        self._save_module("student", student, meta)
        return student

    def _score(self, logits: torch.Tensor, y: Any) -> tuple[float, int, float]:
        m, c = self.task.metric_sum(logits, y)
        return m, c, float(self.task.loss(logits, y)) * c

    def baselines(self, redo: bool = True) -> None:
        """Stage ``baselines``: the learned initialiser and the unrolled k-step networks
        (see :mod:`cdeq.baselines`), trained from the teacher with the student's wall-clock budget."""
        from . import baselines as bl

        cfg, bcfg = self.config, self.config.baselines
        teacher = self.teacher()
        student_path = self.dir / "student.safetensors"
        student_s = load_tensors(student_path, kind="student")[1].get("train_time_s", 0.0) \
            if student_path.exists() else 0.0
        if redo or not (self.dir / "learned_init.safetensors").exists():
            torch.manual_seed(cfg.seed)
            init = bl.LearnedInit.for_teacher(teacher, bcfg)
            store = TrajectoryStore(self.dir / "trajectories")
            trajectories = list(store) if _fits_in_memory(store) else store
            info = bl.train_learned_init(init, teacher, trajectories, bcfg, bcfg.init_time_s or student_s,
                                         seed=cfg.seed, log=self.log)
            solvers = bl.select_init_solvers(init, teacher, self.task, self.task.selection_batches(
                cfg.evaluate.batch_size), sorted(set(cfg.evaluate.budgets)), bcfg.init_select_batches)
            self.log(f"learned initialiser: solver per budget (chosen on training data) {solvers}")
            self._save_module("learned_init", init, {
                "train_time_s": info["train_time_s"], "epochs": info["epochs"],
                "loss_first": info["losses"][0], "loss_last": info["losses"][-1],
                "solvers": {str(k): s for k, s in solvers.items()}})
        for k in bcfg.unrolled_ks:
            if not redo and (self.dir / f"unrolled_k{k}.safetensors").exists():
                continue
            torch.manual_seed(cfg.seed)
            net = bl.UnrolledNet(teacher, k)
            info = bl.train_unrolled(net, self.task, bcfg, bcfg.unrolled_time_s or student_s,
                                     seed=cfg.seed, log=self.log)
            self._save_module(f"unrolled_k{k}", net, {"k": k, "train_time_s": info["train_time_s"],
                                                      "steps": info["steps"], "losses": info["losses"]})

    def _baseline_methods(self, teacher: DEQModel) -> tuple[dict, dict[str, float]]:
        """The trained baselines as ``evaluate``'s ``extra_methods``, and their training wall times."""
        from . import baselines as bl

        methods: dict = {}
        costs: dict[str, float] = {}
        if (self.dir / "learned_init.safetensors").exists():
            init = bl.LearnedInit.for_teacher(teacher, self.config.baselines)
            meta = self._load_module("learned_init", init)
            methods["learned_init"] = bl.learned_init_method(
                init, teacher, {int(k): s for k, s in meta["solvers"].items()})
            costs["learned_init"] = meta.get("train_time_s", 0.0)
        nets = {}
        for k in self.config.baselines.unrolled_ks:
            if (self.dir / f"unrolled_k{k}.safetensors").exists():
                nets[k] = bl.UnrolledNet(teacher, k)
                meta = self._load_module(f"unrolled_k{k}", nets[k])
                costs[f"unrolled_k{k}"] = meta.get("train_time_s", 0.0)
        if nets:
            methods["unrolled"] = bl.unrolled_method(nets)
        return methods, costs

    def evaluate(self) -> dict[str, Any]:
        teacher = self.teacher()
        student = self.student(teacher)
        extra, extra_costs = self._baseline_methods(teacher)
        report = evaluate(self.task, teacher, student, self.config.evaluate, extra_methods=extra,
                          seed=self.config.seed)
        costs = {}
        for name in ("teacher", "student"):
            _, meta = load_tensors(self.dir / f"{name}.safetensors", kind=name)
            costs[{"teacher": "teacher", "student": "cdeq"}[name]] = meta.get("train_time_s", 0.0)
        costs.update(extra_costs)
        report["train_time_s"] = costs
        files = write_report(report, self.dir)
        self.log("\n" + markdown_table(report))
        self.log("wrote " + ", ".join(str(p) for p in files.values()))
        return report

    def run_all(self) -> dict[str, Any]:
        """Every stage whose output is missing, in order; returns the report."""
        if not (self.dir / "teacher.safetensors").exists():
            self.train()
        else:
            self.log("teacher.safetensors exists: skipping training")
        manifest = self.dir / "trajectories" / TrajectoryStore.MANIFEST
        if not manifest.exists():
            self.record()
        else:
            self.log("trajectories exist: skipping recording")
        if not (self.dir / "student.safetensors").exists():
            self.distill()
        else:
            self.log("student.safetensors exists: skipping distillation")
        if not distributed.is_main():  # under torchrun: rank 0 alone evaluates and reports
            return {}
        self._solo = True  # from here on no other rank takes part: no barriers
        if self.config.baselines.enabled:
            self.baselines(redo=False)
        return self.evaluate()


def _with_defaults(old: dict) -> dict:
    """``old`` (a run's config.json) with the sections and keys added since filled by defaults."""
    try:
        return json.loads(json.dumps(RunConfig.from_dict(old).to_dict()))
    except (ConfigError, TypeError, ValueError):
        return old


def _fits_in_memory(store: TrajectoryStore, limit_bytes: int = 2 << 30) -> bool:
    """Whether all shards, read back as float32, stay under ``limit_bytes``."""
    on_disk = sum(p.stat().st_size for p in store.root.glob("shard_*.safetensors"))
    widen = 2 if store.manifest().get("dtype") in ("float16", "bfloat16") else 1
    return on_disk * widen <= limit_bytes
