"""The stages of a run and the files each leaves in the run directory.

::

    DIR/config.json                     the full, validated configuration of the run
    DIR/teacher.safetensors (+ .json)   stage ``train``   (checkpoint: DIR/teacher.ckpt)
    DIR/trajectories/shard_*.safetensors, manifest.json, work.json, work/*.json  stage ``record``
    DIR/student.safetensors (+ .json)   stage ``distill`` (checkpoint: DIR/student.ckpt)
    DIR/student_plus.safetensors (+ .json)  stage ``plus`` (C-DEQ+, :mod:`cdeq.consistency.plus`)
    DIR/student_tuned.safetensors (+ .json) stage ``tune`` (C-DEQ tuned, :mod:`cdeq.consistency.tune`)
                                        stage ``plans`` chooses the students' plans again
    DIR/learned_init, unrolled_*.safetensors (+ .json)  stage ``baselines``
    DIR/report.json, table.md, plot.png stage ``evaluate``

Each stage reads the files of the one before, so a user can rerun one stage alone. A stage whose
output exists is skipped by :meth:`Run.run_all` (delete the file to redo it); a stage interrupted
after an epoch resumes from its checkpoint. ``run_all`` checks what it skips: a damaged output or
checkpoint is renamed ``NAME.corrupt-<time>`` and its stage redone, and shards missing from the
trajectories are recorded again.

One process writes a run directory at a time: writing a configuration and every stage hold the OS
lock ``DIR/.lock`` (a second process gets :class:`cdeq.engine.io.BusyError` naming the holder's PID; see
:mod:`cdeq.run.directory`). Loading a finished run (:meth:`Run.teacher`, :meth:`Run.student`, ``cdeq
export``, ``cdeq generate``) takes no lock: every file is replaced atomically, so a reader sees
whole files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..consistency.arrays import TrajectoryArrays
from ..consistency.distill import DistillConfig, TaskBatches, distill
from ..consistency.online import choose_mode, record_arrays
from ..consistency.plans import plan_to_json, plans_from_json, plans_to_json
from ..consistency.plus import PlusConfig, load_plus, train_plus
from ..consistency.schedule import TimeSchedule
from ..consistency.search import select_plans
from ..consistency.student import ConsistencyStudent
from ..consistency.trajectory import (
    RecordConfig,
    ShardWork,
    TrajectoryStore,
    record_counted,
    residual_summary,
    warn_unconverged,
)
from ..consistency.tune import handover_warning, tune, tune_times, tuned_plans, tuned_student
from ..deq.model import DEQModel
from ..engine import distributed
from ..engine.fit import LayerCalls, batch_rows
from ..engine.io import read_json, write_json
from ..engine.precision import autocast, clock, resolve_device, to_device
from ..engine.threads import apply_thread_policy
from ..engine.tree import leaves
from ..tasks.base import Task, on_device
from . import baselines as bl
from .config import RunConfig, build_config, with_defaults
from .directory import RunDirectory, writes
from .evaluate import evaluate, exact_mode
from .recommend import recommend, with_totals
from .report import markdown_table, write_report
from .teacher import configure_teacher, evaluate_model, stop_warning, train_teacher

__all__ = ["Run", "RunConfig", "build_config"]


def chain_batches(plus_config: PlusConfig, distill_config: DistillConfig, task: Task,
                  record_config: RecordConfig) -> TaskBatches | None:
    """The training batches C-DEQ+'s chain task term reads (``plus.chain_data``), or ``None``
    for the recorded minibatch: ``train``, or ``auto`` when ``record.max_samples`` caps the
    recording (it holds a subset of the training split); batches of ``distill.batch_size``."""
    choice = plus_config.chain_data
    if choice == "recorded" or (choice == "auto" and record_config.max_samples <= 0):
        return None
    size = distill_config.batch_size
    return lambda gen: task.train_batches(size, shuffle=True, generator=gen)


class Run(RunDirectory):
    """A run directory and the stages that fill it (the directory's mechanics: :class:`RunDirectory`).

    With a ``config`` the task is built first (its data read and checked), then the directory is
    locked and ``config.json`` written: a configuration or data set that fails leaves nothing
    behind. The lock is held until :meth:`close` (use ``with Run(...) as run:``). Without a
    ``config`` the directory's own ``config.json`` is read and nothing is written until a stage runs.
    """

    def __init__(self, out_dir: str | Path, config: RunConfig | None = None,
                 device: str | None = None) -> None:
        super().__init__(out_dir)
        self._task: Task | None = None
        self._device_name = device  # overrides the configuration's device (`--device`)
        cfg_path = self.dir / "config.json"
        if config is None:
            if not cfg_path.exists():
                raise FileNotFoundError(f"{cfg_path} does not exist: start the run with `cdeq run` "
                                        "or `cdeq train`, which write it")
            self.config = RunConfig.from_dict(read_json(cfg_path))
        else:
            self.config = config
            _ = self.task  # builds the task: its data are read and checked before anything is written
            self.hold()
            try:
                new = json.loads(json.dumps(config.to_dict()))
                # the device is where the run starts now, not part of what it computes
                self.adopt_config(new, lambda old: {**with_defaults(old), "device": new["device"]})
            except BaseException:
                self.close()
                raise
        self._threads: int | None = None  # set when a stage starts: read-only uses never sample

    @property
    def threads(self) -> int:
        """The run's intra-op threads: the thread policy (0: a fair share of the free cores),
        applied once, on first use."""
        if self._threads is None:
            self._threads = apply_thread_policy(self.config.threads)
        return self._threads

    def locked(self) -> Any:
        """The lock every stage (``@writes``) runs under; the thread policy is applied first."""
        _ = self.threads
        return super().locked()

    @property
    def device(self) -> torch.device:
        """Where the stages run: ``device`` given to the constructor, else the configuration's."""
        return resolve_device(self._device_name or self.config.device)

    @property
    def task(self) -> Task:
        """The run's task; its batches come on :attr:`device`."""
        if self._task is None:
            cls = self.config.task_cls()
            task = cls(cls.Config.from_dict(self.config.task_config, key_path="task_config"))
            self._task = on_device(task, self.device)
        return self._task

    def autocast(self) -> Any:
        """The run's precision (:func:`cdeq.engine.precision.autocast`): every stage runs under it
        (the optimiser steps of the trained stages, recording, plan search and evaluation)."""
        return autocast(self.config.precision, self.device)

    def teacher(self) -> DEQModel:
        """The trained teacher with the configuration's solvers and backward (eval mode)."""
        model = self.task.build_model().to(self.device)
        configure_teacher(model, self.config.teacher)
        self.load_module("teacher", model)
        model.eval()
        return model

    def student(self, teacher: DEQModel | None = None) -> ConsistencyStudent:
        """The distilled C-DEQ student (stage ``distill``) with its selected plans (eval mode);
        ``teacher``: the run's teacher when already loaded."""
        teacher = teacher or self.teacher()
        student = ConsistencyStudent(teacher, TimeSchedule(self.config.schedule),
                                     self.config.student).to(self.device)
        meta = self.load_module("student", student)
        student.plans = plans_from_json(meta["plans"])
        student.eval()
        return student

    # --- stages -------------------------------------------------------------------------------
    @writes
    def train(self) -> dict[str, Any]:
        """Stage ``train``: the teacher DEQ (:mod:`cdeq.run.teacher`), resumed from its checkpoint
        when one exists; returns its held-out metric and NFE (also in ``teacher.safetensors``)."""
        cfg = self.config
        distributed.TALLY.reset("train")
        torch.manual_seed(cfg.seed)
        model = self.task.build_model().to(self.device)
        with self.autocast():  # the run's precision: each optimiser step autocasts
            history = self.resumed("teacher", model, "teacher training", lambda start, state, save: (
                train_teacher(self.task, model, cfg.teacher, seed=cfg.seed,
                              on_epoch_end=save, start_epoch=start, optimizer_state=state)),
                stage="train")
        elapsed = sum(history["epoch_time"])  # every epoch's, those before a resume included
        model.eval()
        with self.autocast():
            result = evaluate_model(self.task, model, cfg.evaluate.batch_size)
        best = history.get("best_epoch", [len(history["steps"]) - 1])[-1]  # no validation: the last
        stopped = history["stopped"][-1]
        self.log(f"teacher: held-out {self.task.metric} {result['metric']:.4f} at "
                 f"{result['nfe']:.1f} NFE ({elapsed:.0f}s training; {len(history['steps'])} epochs, "
                 f"stopped: {stopped}; the weights of epoch {best + 1}, the best on validation)")
        warning = stop_warning(history, cfg.teacher)
        if warning is not None:
            self.log(f"warning: {warning}")
        work = {"steps": history["steps"][-1], "samples": sum(history["samples"]),
                "epochs": len(history["steps"]), "best_epoch": best, "stopped": stopped,
                **history["layer_calls"][-1], "distributed": distributed.TALLY.summary("train")}
        self.save_module("teacher", model, {"task": cfg.task, "train_time_s": elapsed, "work": work,
                                             **result})
        return result

    @writes
    def record(self) -> TrajectoryStore | TrajectoryArrays:
        """Stage ``record``: the teacher's trajectories on the training split, in the mode
        ``record.mode`` gives (``auto``: chosen from the projected store size, logged): stored on
        disk (``record.format``: per-sample arrays, or the shards of earlier versions), or online
        (each sample's ``z*`` held in memory; the iterates are regenerated while distilling)."""
        cfg = self.config
        teacher = self.teacher()
        root = self.dir / "trajectories"
        mode = self._mode(teacher)
        distributed.TALLY.reset("record")
        t0 = clock(self.device)
        if mode == "stored" and cfg.record.format == "shards":
            store: TrajectoryStore | TrajectoryArrays = TrajectoryStore(root)
            with LayerCalls(teacher.cell) as calls, self.autocast():  # part of the student's cost
                work = record_counted(teacher, self.task.record_batches(cfg.record.batch_size),
                                      cfg.record, store, calls.as_dict)
        else:
            items = self.task.train_items()
            store = TrajectoryArrays(None if mode == "online" else root, items=items,
                                     cache_bytes=cfg.record.cache_bytes)
            source = items if items is not None else self.task.record_batches(cfg.record.batch_size)
            with LayerCalls(teacher.cell) as calls, self.autocast():
                # each shard's layer calls, kept beside it (a resumed recording counts the shards
                # it kept); the online source, recorded whole in each process, keeps them in memory
                shard_work = ShardWork(None if mode == "online" else root / "work", calls.as_dict)
                record_arrays(teacher, source, cfg.record, store, keep=0 if mode == "online" else None,
                              seed=cfg.seed, on_recorded=shard_work)
            work = shard_work.totals(len(store))  # every rank's shards
            if mode == "online":
                self._online = store
        spread = distributed.TALLY.summary("record")
        samples = store.manifest()["samples"]
        if distributed.is_main():
            root.mkdir(parents=True, exist_ok=True)
            if mode == "online":  # no trajectory on disk: what was solved, and how
                write_json(root / "manifest.json", {**store.manifest(), "mode": "online"})
            write_json(root / "work.json", {"samples": samples, **work, "mode": mode,
                                            "distributed": spread})
        distributed.barrier()
        summary = residual_summary(store, cfg.distill.max_residual)
        self.log(f"recorded {samples} training samples in {len(store)} shards ({mode}; "
                 f"{clock(self.device) - t0:.0f}s); unconverged (residual > "
                 f"{cfg.distill.max_residual:g}): {100 * summary['unconverged_fraction']:.1f}%")
        if summary["unconverged_fraction"] > 0.05:
            self.log(f"warning: {100 * summary['unconverged_fraction']:.1f}% of the recorded samples "
                     f"did not converge (max residual {summary['max_residual']:.2e}); they are left "
                     "out of the consistency losses")
            warn_unconverged(summary, cfg.distill.max_residual, 0.05)  # a real warning, too
        return store

    def _mode(self, teacher: DEQModel) -> str:
        """``stored`` or ``online``: ``record.mode``, or for ``auto`` chosen from the projected
        size of the store (logged with the projection)."""
        cfg = self.config.record
        if cfg.mode != "auto":
            return cfg.mode
        samples, numel, input_bytes = 0, 0, 0
        for x, y in self.task.record_batches(cfg.batch_size):
            if not numel:  # one sample's state entries and input bytes, from the first batch
                with torch.no_grad():
                    z = teacher.initial_state(teacher.inject(to_device(x, self.device)))
                rows = leaves(z)[0].shape[0]
                numel = sum(t.numel() for t in leaves(z)) // rows
                input_bytes = sum(t.numel() * t.element_size() for t in leaves(x) if isinstance(
                    t, torch.Tensor) and t.layout == torch.strided) // rows
            samples += batch_rows(y)
            if cfg.max_samples and samples >= cfg.max_samples:
                samples = cfg.max_samples
                break
        mode, sizes = choose_mode(cfg, numel, samples, input_bytes)
        self.log(f"trajectories: {mode} (record.mode=auto): {samples} samples would take "
                 f"{sizes['arrays'] / 1e9:.3g} GB stored (limit record.max_store_bytes "
                 f"{cfg.max_store_bytes / 1e9:.3g} GB; {sizes['shards'] / 1e9:.3g} GB as shards), "
                 f"{sizes['online'] / 1e9:.3g} GB online")
        return mode

    def trajectories(self) -> Any:
        """The recorded trajectories the later stages read: per-sample arrays (on disk, or the
        online source in memory: recorded again in a new process), or the shards of earlier
        versions (read into memory when they fit)."""
        root = self.dir / "trajectories"
        manifest = read_json(root / "manifest.json")
        if manifest.get("mode") == "online":
            if getattr(self, "_online", None) is None:
                self.log("the online source holds z* in memory: solving it again in this process")
                self.record()
            return self._online
        if manifest.get("format") == "arrays":
            return TrajectoryArrays(root, items=self.task.train_items(),
                                    cache_bytes=self.config.record.cache_bytes)
        store = TrajectoryStore(root)
        return list(store) if store.fits_in_memory() else store

    @writes
    def distill(self) -> ConsistencyStudent:
        """Stage ``distill``: the C-DEQ student distilled from the recorded trajectories (resumed
        from its checkpoint when one exists), then its plans chosen on the selection batches."""
        cfg = self.config
        teacher = self.teacher()
        trajectories = self.trajectories()
        distributed.TALLY.reset("distill")
        torch.manual_seed(cfg.seed)
        student = ConsistencyStudent(teacher, TimeSchedule(cfg.schedule), cfg.student).to(self.device)
        with self.autocast(), self.counted(teacher) as counted:
            history = self.resumed("student", student, "distillation", lambda start, state, save: (
                distill(student, trajectories, cfg.distill, task_loss=self.task.loss, seed=cfg.seed,
                        on_epoch_end=save, start_epoch=start, resume_state=state)),
                stage="distill", counted=counted)
        elapsed = sum(history["epoch_time"])
        self.log(f"distilled in {elapsed:.0f}s")
        search, calls = self._search_plans(student, teacher)
        work_file = self.dir / "trajectories" / "work.json"
        work = {"distill": {"steps": history["steps"][-1], "samples": sum(history["samples"]),
                            "epochs": len(history["steps"]), **counted.across_ranks(),
                            "distributed": distributed.TALLY.summary("distill")},
                "record": read_json(work_file) if work_file.exists() else {},
                "plan_search": calls}
        meta = dict(plans=plans_to_json(student.plans), search=search, train_time_s=elapsed, work=work)
        self.save_module("student", student, meta)
        return student

    def counted(self, teacher: DEQModel) -> LayerCalls:
        """Counts every call of a layer of the teacher's cell class in a ``with`` block: a stage's
        training work in layer calls (the student's, its EMA target's, a baseline's, the teacher's)."""
        return LayerCalls(kind=type(teacher.cell))

    def _last(self) -> int:
        return int(read_json(self.dir / "trajectories" / "manifest.json")["last"])

    def _search_plans(self, student: ConsistencyStudent, teacher: DEQModel,
                      fixed: dict[int, list] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Select ``student``'s plans on the selection (validation) batches (``fixed``: a tuned
        student's chains, see :func:`select_plans`); returns the search log and its layer calls
        (part of the student's training work)."""
        distributed.TALLY.reset("plan_search")
        t1 = clock(self.device)
        with LayerCalls(student.cell, teacher.cell) as calls, self.autocast():
            search = select_plans(student, self.task.selection_batches(self.config.evaluate.batch_size),
                                  self._score, self.task.higher_is_better, self._last(),
                                  self.config.plans, fixed=fixed)
        self.log(f"plan search on the selection (validation) batches {clock(self.device) - t1:.0f}s")
        spread = distributed.TALLY.summary("plan_search")
        return search, {**calls.across_ranks(), "distributed": spread}

    @writes
    def plus(self) -> ConsistencyStudent:
        """Stage ``plus``: C-DEQ+ from the distilled student (:mod:`cdeq.consistency.plus`), its
        plans chosen on the selection (validation) data."""

        cfg = self.config
        teacher = self.teacher()
        trajectories = self.trajectories()
        chain = chain_batches(cfg.plus, cfg.distill, self.task, cfg.record)
        torch.manual_seed(cfg.seed)
        with self.autocast(), self.counted(teacher) as counted:
            plus, info = train_plus(self.student(teacher), trajectories, cfg.plus, cfg.distill,
                                    self.task.loss, seed=cfg.seed, task_batches=chain)
        info["work"]["joint"].update(counted.across_ranks())  # the initialiser's fit calls no layer
        search, calls = self._search_plans(plus, teacher)
        self.save_module("student_plus", plus, {
            "plans": plans_to_json(plus.plans), "search": search,
            "start": info["start"], "train_time_s": info["train_time_s"],
            "work": {**info["work"], "plan_search": calls}})
        return plus

    def student_plus(self, teacher: DEQModel | None = None,
                     student: ConsistencyStudent | None = None) -> ConsistencyStudent:
        """The trained C-DEQ+ student (stage ``plus``), eval mode; ``student``: the C-DEQ student
        when already loaded (only its shape is used)."""
        meta = self.read_meta("student_plus")
        plus = load_plus(student or self.student(teacher), self.config.plus, meta["start"])
        self.load_module("student_plus", plus)
        plus.plans = plans_from_json(meta["plans"])
        plus.eval()
        return plus

    @writes
    def tune(self) -> ConsistencyStudent:
        """Stage ``tune``: C-DEQ tuned (:mod:`cdeq.consistency.tune`), a copy of the distilled
        student whose plans of ``1 .. tune.max_k`` jumps are trained end to end on the task over the
        training split; its hand-over plans are chosen on the selection (validation) data."""

        cfg = self.config
        warning = handover_warning(cfg.tune, cfg.plans.max_nfe)
        if warning is not None:
            self.log(f"warning: {warning}")
        teacher = self.teacher()
        source = self.student(teacher)
        torch.manual_seed(cfg.seed)
        tuned = tuned_student(source, cfg.tune)
        times = tune_times(tuned, cfg.tune, self._last())
        samples = cfg.tune.samples or 2 * int(self.read_meta("student")["work"]["distill"]["samples"])
        size = cfg.tune.batch_size
        per_epoch = max(1, sum(1 for _ in self.task.train_batches(size, shuffle=False)))
        with self.autocast(), self.counted(teacher) as counted:
            history = tune(tuned, lambda epoch, gen: self.task.train_batches(size, shuffle=True,
                                                                              generator=gen),
                           per_epoch, cfg.tune, self.task.loss, samples, times, seed=cfg.seed)
        search, calls = self._search_plans(tuned, teacher, fixed=tuned_plans(times))
        self.log(f"C-DEQ tuned: plans {plans_to_json(tuned.plans)}")
        work = {"tune": {"steps": history["steps"][-1], "samples": sum(history["samples"]),
                         "epochs": len(history["steps"]), **counted.across_ranks()},
                "plan_search": calls}
        self.save_module("student_tuned", tuned, {
            "plans": plans_to_json(tuned.plans), "search": search, "times": times,
            "train_time_s": sum(history["epoch_time"]), "work": work})
        return tuned

    def student_tuned(self, teacher: DEQModel | None = None) -> ConsistencyStudent:
        """The trained C-DEQ tuned student (stage ``tune``), eval mode."""

        teacher = teacher or self.teacher()
        shell = ConsistencyStudent(teacher, TimeSchedule(self.config.schedule), self.config.student)
        tuned = tuned_student(shell.to(self.device), self.config.tune)
        meta = self.load_module("student_tuned", tuned)
        tuned.plans = plans_from_json(meta["plans"])
        tuned.eval()
        return tuned

    @writes
    def plans(self) -> None:
        """Stage ``plans``: choose the plans of C-DEQ, and of C-DEQ+ when it was trained, again on
        the selection (validation) data with the run's plan search settings; the weights stay.
        Run ``cdeq evaluate`` next for a report with them."""
        teacher = self.teacher()
        student = self.student(teacher)
        models = [("student", student)]
        if (self.dir / "student_plus.safetensors").exists():
            models.append(("student_plus", self.student_plus(teacher, student)))
        if (self.dir / "student_tuned.safetensors").exists():
            models.append(("student_tuned", self.student_tuned(teacher)))
        for name, model in models:
            meta = self.read_meta(name)
            fixed = None
            if name == "student_tuned":
                fixed = tuned_plans(meta["times"])
            search, calls = self._search_plans(model, teacher, fixed)
            meta["search"] = search
            meta.setdefault("work", {})["plan_search"] = calls
            meta["plans"] = plans_to_json(model.plans)
            self.save_module(name, model, meta)

    def _score(self, logits: torch.Tensor, y: Any) -> tuple[torch.Tensor, float]:
        """The plan search's score: the task metric of each item and the loss summed over them."""
        items = self.task.metric_items(logits, y)
        return items, float(self.task.loss(logits, y)) * items.numel()

    @writes
    def baselines(self, redo: bool = True) -> None:
        """Stage ``baselines``: the learned initialiser, the unrolled k-step networks and the anytime
        unrolled network (see :mod:`cdeq.run.baselines`), trained from the teacher, each for the
        student's distillation samples (or ``baselines.samples``)."""

        cfg, bcfg = self.config, self.config.baselines
        teacher = self.teacher()
        samples = bcfg.samples or self._student_samples()
        if redo or not self.done("learned_init", "the learned initialiser"):
            torch.manual_seed(cfg.seed)
            init = bl.LearnedInit.for_teacher(teacher, bcfg.init_hidden, bcfg.init_conv).to(self.device)
            trajectories = self.trajectories()
            with self.autocast():
                info = bl.train_learned_init(init, teacher, trajectories, samples,
                                             batch_size=bcfg.init_batch_size, optim=bcfg.init_optim,
                                             max_residual=bcfg.max_residual, seed=cfg.seed)
            info["work"].update(layer_calls=0, layer_call_rows=0)  # h(u) is no layer call
            with self.autocast():
                solvers = bl.select_init_solvers(
                    init, teacher, self.task, self.task.selection_batches(cfg.evaluate.batch_size),
                    sorted(set(cfg.evaluate.budgets)), bcfg.init_select_batches)
            self.log(f"learned initialiser: solver per budget (chosen on validation data) {solvers}")
            self.save_module("learned_init", init, {
                "train_time_s": info["train_time_s"], "work": info["work"],
                "loss_first": info["losses"][0], "loss_last": info["losses"][-1],
                "solvers": {str(k): s for k, s in solvers.items()}})
        for name, k, anytime in bl.unrolled_nets(bcfg):
            if not redo and self.done(name, f"the {name} network"):
                continue
            torch.manual_seed(cfg.seed)
            net = bl.UnrolledNet(teacher, k, anytime=anytime).to(self.device)
            with self.autocast(), self.counted(teacher) as counted:
                info = bl.train_unrolled(net, self.task, bcfg, samples, seed=cfg.seed)
            info["work"].update(counted.across_ranks())
            meta = {"k": k, "anytime": anytime, "train_time_s": info["train_time_s"],
                    "work": info["work"], "losses": info["losses"]}
            self.save_module(name, net, meta)

    def _student_samples(self) -> int:
        """The baselines' budget: the training samples of the most trained cdeq model built, each
        counted from C-DEQ's distillation on (C-DEQ; C-DEQ+ adds its initialiser's fit and joint
        distillation; C-DEQ tuned its tuning), so that every cdeq model meets baselines given at
        least its own work."""
        def samples(name: str, parts: tuple[str, ...]) -> int:
            if not (self.dir / f"{name}.safetensors").exists():
                return 0
            work = self.read_meta(name).get("work", {})
            return sum(int(work.get(p, {}).get("samples", 0)) for p in parts)

        distilled = samples("student", ("distill",))
        return distilled + max(samples("student_plus", ("init", "joint")),
                               samples("student_tuned", ("tune",)))

    def _extra_methods(self, teacher: DEQModel, plus: ConsistencyStudent | None,
                       tuned: ConsistencyStudent | None = None
                       ) -> tuple[dict, dict[str, float], dict[str, dict]]:
        """C-DEQ+ and C-DEQ tuned (when given: the loaded students) and the trained baselines as
        ``evaluate``'s ``extra_methods``, their training wall times and their training work
        (steps, samples)."""

        methods: dict = {}
        costs: dict[str, float] = {}
        work: dict[str, dict] = {}
        if plus is not None:
            methods["cdeq_plus"] = lambda x, k: plus.predict(x, nfe=k)
            meta, own = self.read_meta("student_plus"), self.read_meta("student")
            costs["cdeq_plus"] = own.get("train_time_s", 0.0) + meta.get("train_time_s", 0.0)
            work["cdeq_plus"] = {"from_cdeq": own.get("work"), **meta.get("work", {})}
        if tuned is not None:
            methods["cdeq_tuned"] = lambda x, k: tuned.predict(x, nfe=k)
            meta, own = self.read_meta("student_tuned"), self.read_meta("student")
            costs["cdeq_tuned"] = own.get("train_time_s", 0.0) + meta.get("train_time_s", 0.0)
            work["cdeq_tuned"] = {"from_cdeq": own.get("work"), **meta.get("work", {})}
        if (self.dir / "learned_init.safetensors").exists():
            init = bl.LearnedInit.for_teacher(teacher, self.config.baselines.init_hidden,
                                             self.config.baselines.init_conv).to(self.device)
            meta = self.load_module("learned_init", init)
            methods["learned_init"] = bl.learned_init_method(
                init, teacher, {int(k): s for k, s in meta["solvers"].items()})
            costs["learned_init"], work["learned_init"] = meta.get("train_time_s", 0.0), meta.get("work")
        nets = {}
        for name, k, anytime in bl.unrolled_nets(self.config.baselines):
            if (self.dir / f"{name}.safetensors").exists():
                net = bl.UnrolledNet(teacher, k, anytime=anytime).to(self.device)
                meta = self.load_module(name, net)
                costs[name], work[name] = meta.get("train_time_s", 0.0), meta.get("work")
                if anytime:
                    methods["unrolled_any_k"] = bl.anytime_method(net)
                else:
                    nets[k] = net
        if nets:
            methods["unrolled"] = bl.unrolled_method(nets)
        return methods, costs, work

    @writes
    def evaluate(self) -> dict[str, Any]:
        """Stage ``evaluate``: every trained method at every budget against the truncated and the
        converged teacher (:mod:`cdeq.run.evaluate`); writes ``report.json``, ``table.md`` and
        ``plot.png`` and returns the report."""
        distributed.TALLY.reset("evaluate")
        teacher = self.teacher()
        student = self.student(teacher)
        has_plus = (self.dir / "student_plus.safetensors").exists()
        plus = self.student_plus(teacher, student) if has_plus else None
        has_tuned = (self.dir / "student_tuned.safetensors").exists()
        tuned = self.student_tuned(teacher) if has_tuned else None
        extra, extra_costs, extra_work = self._extra_methods(teacher, plus, tuned)
        with self.autocast():
            report = evaluate(self.task, teacher, student, self.config.evaluate, extra_methods=extra,
                              seed=self.config.seed)
            if plus is not None:
                report["plans_plus"] = {str(k): [list(op) for op in plus.plan_for(k)]
                                        for k in report["budgets"]}
                report["exact_mode_plus"] = exact_mode(self.task, teacher, plus, self.config.evaluate,
                                                       report["budgets"])
            if tuned is not None:
                report["plans_tuned"] = {str(k): plan_to_json(tuned.plan_for(k))
                                         for k in report["budgets"]}
        report["precision"] = self.config.precision
        if "timing" in report:  # measured by rank 0
            report["timing"]["device"] = str(self.device)
        costs, work = {}, {}
        for name, key in (("teacher", "teacher"), ("student", "cdeq")):
            meta = self.read_meta(name)
            costs[key], work[key] = meta.get("train_time_s", 0.0), meta.get("work")
        report["train_time_s"] = {**costs, **extra_costs}
        # steps, samples, layer calls; the student's recording and search; each method's total
        report["train_work"] = with_totals({**work, **extra_work})
        teacher_work = report["train_work"].get("teacher") or {}
        report["teacher"].update({k: teacher_work[k] for k in ("stopped", "epochs", "best_epoch")
                                  if k in teacher_work})
        report["train_threads"] = self.stage_threads()
        report["distributed"] = self._spread(report["train_work"])
        if not distributed.is_main():
            return report
        report["recommend"] = recommend(report)  # reads the cost section, which rank 0 measures
        files = write_report(report, self.dir)
        self.log("\n" + markdown_table(report))
        self.log("wrote " + ", ".join(str(p) for p in files.values()))
        return report

    def _spread(self, work: dict[str, Any]) -> dict[str, Any]:
        """The report's ``distributed`` section: the evaluation's world size and, per stage, the
        world size it ran with and the samples each rank computed (from the stages' files)."""
        stages: dict[str, Any] = {}
        teacher, cdeq = work.get("teacher") or {}, work.get("cdeq") or {}
        for name, entry in (("train", teacher), ("record", cdeq.get("record") or {}),
                            ("distill", cdeq.get("distill") or {}),
                            ("plan_search", cdeq.get("plan_search") or {})):
            if "distributed" in entry:
                stages[name] = entry["distributed"]
        stages["evaluate"] = distributed.TALLY.summary("evaluate")
        return {"world_size": distributed.world_size(), "stages": stages}

    @writes
    def run_all(self) -> dict[str, Any]:
        """Every stage whose output is missing or damaged, in order; returns the report."""
        self._repair = True  # damaged checkpoints too are set aside rather than refused
        try:
            if not self.done("teacher", "training"):
                self.train()
            if not self.recorded():
                self.record()
            if not self.done("student", "distillation"):
                self.distill()
            if self.config.plus.enabled and not self.done("student_plus", "C-DEQ+"):
                self.plus()
            if self.config.tune.enabled and not self.done("student_tuned", "C-DEQ tuned"):
                self.tune()  # before the baselines: its samples are part of their budget
            if self.config.baselines.enabled:
                self.baselines(redo=False)
            return self.evaluate()
        finally:
            self._repair = False
