"""Seeds: whole pipelines per seed, and their aggregate report.

``cdeq run TASK --seeds N --out DIR`` runs the pipeline (teacher included) with seeds
``s, s+1, ..., s+N-1`` (``s`` the configured seed, 0 by default) into ``DIR/seed_<seed>/``, then
writes ``DIR/report.json``, ``table.md`` and ``plot.png``: per method and budget the mean, the
standard deviation (``*_std``, sample std, 0 for one seed) and the per-seed values
(``*_per_seed``). The teacher-accuracy cost is chosen again on the mean validation figures, with
the seeds' standard deviation of the converged teacher's validation metric as the tolerance
(unless ``evaluate.teacher_tolerance`` is set; the default rule when the std is 0).
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

from .cost import teacher_accuracy_cost
from .recommend import recommend
from .report import write_report

log = logging.getLogger(__name__)


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _nested(reports: list[dict], get: Any) -> tuple[dict, dict, dict]:
    """Mean, std and per-seed values of ``{name: {k: value}}`` tables, over the keys every seed has."""
    tables = [get(r) for r in reports]
    mean: dict = {}
    std: dict = {}
    per: dict = {}
    for name in tables[0]:
        if not all(name in t for t in tables):
            continue
        keys = [k for k in tables[0][name] if all(k in t[name] for t in tables)]
        vals = {k: [t[name][k] for t in tables] for k in keys}
        mean[name] = {k: _mean_std(v)[0] for k, v in vals.items()}
        std[name] = {k: _mean_std(v)[1] for k, v in vals.items()}
        per[name] = vals
    return mean, std, per


def _teacher(reports: list[dict], get: Any) -> dict[str, Any]:
    metrics = [get(r)["metric"] for r in reports]
    mean, std = _mean_std(metrics)
    out = {"metric": mean, "metric_std": std, "metric_per_seed": metrics}
    if "nfe" in get(reports[0]):
        out["nfe"] = statistics.fmean(get(r)["nfe"] for r in reports)
    return out


def _timing(reports: list[dict]) -> dict[str, Any]:
    first = reports[0]["timing"]
    out = {k: v for k, v in first.items() if not isinstance(v, dict)}
    out["teacher"] = {"median_ms": statistics.fmean(r["timing"]["teacher"]["median_ms"] for r in reports)}
    medians = _nested(reports, lambda r: {n: {k: v["median_ms"] for k, v in per.items()}
                                          for n, per in r["timing"].items()
                                          if isinstance(per, dict) and n != "teacher"})
    for name, per in medians[0].items():
        out[name] = {k: {"median_ms": v, "median_ms_std": medians[1][name][k]} for k, v in per.items()}
    out["note"] = "mean over seeds of each seed's median"
    return out


def aggregate(reports: list[dict[str, Any]], tolerance: float | None = None,
              runs: list[str] | None = None) -> dict[str, Any]:
    """The aggregate report of one task's per-seed reports (module docstring)."""
    if not reports:
        raise ValueError("aggregate needs at least one report")
    first = reports[0]
    out: dict[str, Any] = {key: first[key] for key in ("task", "metric", "higher_is_better", "budgets")}
    out["seeds"] = [r.get("seed") for r in reports]
    out["runs"] = runs or []
    out["splits"] = first.get("splits")
    out["precision"] = first.get("precision")  # the seeds share the configuration
    out["teacher"] = _teacher(reports, lambda r: r["teacher"])
    for key in ("stopped", "epochs", "best_epoch"):  # how each seed's teacher training ended
        if all(key in r["teacher"] for r in reports):
            out["teacher"][f"{key}_per_seed"] = [r["teacher"][key] for r in reports]
    if "stopped_per_seed" in out["teacher"]:
        stops = set(out["teacher"]["stopped_per_seed"])
        out["teacher"]["stopped"] = stops.pop() if len(stops) == 1 else "mixed"
    for section in ("methods", "relative_error"):
        out[section], out[f"{section}_std"], out[f"{section}_per_seed"] = _nested(
            reports, lambda r, s=section: r[s])
    if all("valid" in r for r in reports):
        mean, std, _ = _nested(reports, lambda r: r["valid"]["methods"])
        out["valid"] = {"teacher": _teacher(reports, lambda r: r["valid"]["teacher"]),
                        "methods": mean, "methods_std": std}
    if all("cost" in r for r in reports):
        cost = {k: v for k, v in first["cost"].items() if k not in ("flops", "layer_calls")}
        cost["flops"] = _nested(reports, lambda r: r["cost"]["flops"])[0]
        cost["layer_calls"] = _nested(reports, lambda r: r["cost"]["layer_calls"])[0]
        out["cost"] = cost
    if all("timing" in r for r in reports):
        out["timing"] = _timing(reports)
    if "valid" in out and "cost" in out:
        std = out["valid"]["teacher"]["metric_std"]
        tol = tolerance if tolerance is not None else (std if std > 0 else None)
        out["teacher_accuracy_cost"] = teacher_accuracy_cost(out, tol)
        out["teacher_accuracy_cost"]["tolerance_rule"] = (
            "configured" if tolerance is not None else "seeds' std" if std > 0 else "default")
    if "valid" in out and "cost" in out:
        out["recommend"] = recommend(out)
    if all("train_work" in r for r in reports):  # each method's whole work, mean over the seeds
        names = [n for n, w in first["train_work"].items() if isinstance(w, dict) and "total" in w
                 and all("total" in (r["train_work"].get(n) or {}) for r in reports)]
        out["train_work"] = {n: {"total": {k: statistics.fmean(r["train_work"][n]["total"][k]
                                                               for r in reports)
                                           for k in first["train_work"][n]["total"]}}
                             for n in names}
    if all("train_time_s" in r for r in reports):
        out["train_time_s"] = {k: statistics.fmean(r["train_time_s"].get(k, 0.0) for r in reports)
                               for k in first["train_time_s"]}
    return out


def run_seeds(task: str, user: dict[str, Any], seeds: int, out: str | Path, quick: bool = False,
              ) -> dict[str, Any]:
    """Run ``seeds`` whole pipelines into ``out/seed_<seed>/`` and write their aggregate into
    ``out``; returns the aggregate report."""
    from ..engine.config import ConfigError, merged
    from .stages import Run, build_config

    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds {seeds!r} is not valid; give a positive number of seeds")
    out = Path(out)
    base = int(user.get("seed", 0))
    reports, runs, tolerance = [], [], None
    for seed in range(base, base + seeds):
        config = build_config(task, merged(user, {"seed": seed}), quick=quick)
        run = Run(out / f"seed_{seed}", config)
        run.log(f"run {task} seed {seed} of {base}..{base + seeds - 1} in {run.dir}")
        report = run.run_all()
        if not report:  # under torchrun, ranks other than 0 report nothing
            return {}
        reports.append(report)
        runs.append(f"seed_{seed}")
        tol = config.evaluate.teacher_tolerance
        tolerance = tol if tol >= 0 else None
    agg = aggregate(reports, tolerance, runs)
    files = write_report(agg, out)
    log.info("wrote %s", ", ".join(str(p) for p in files.values()))
    return agg
