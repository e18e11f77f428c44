"""Report files: ``report.json``, ``table.md`` and ``plot.png``.

The table shows the metric and the relative error to ``z*`` per NFE budget, what each budget
costs (layer-call equivalents from FLOPs, median wall time), the best metric of each method at
equal cost, and the teacher-accuracy cost. The plot is a Pareto view: the metric against
layer-call equivalents and against wall time, every method on one figure. Reports written before
the cost fields existed render without the columns they lack. An aggregate of several seeds
(:mod:`cdeq.run.seeds`) carries ``*_std`` fields beside the means; its cells read ``mean ± std``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..engine.io import atomic_write_bytes, atomic_write_text, write_json

LABELS = {"picard": "Picard", "anderson": "Anderson", "broyden": "Broyden", "cdeq": "C-DEQ",
          "cdeq_plus": "C-DEQ+", "cdeq_tuned": "C-DEQ tuned",
          "learned_init": "learned init", "unrolled": "unrolled k-step",
          "unrolled_any_k": "anytime unrolled"}
EQUAL_COSTS = (1, 2, 3, 4)
TRUNCATED_LABEL = "best truncated"
COST_SLACK = 1.05
"""A method fits the cost ``c`` when its layer-call equivalents are at most ``c * COST_SLACK``
(a truncated solver's residual norms add about 1% to its layer calls)."""


def _timing(key: str) -> bool:
    key = key.lower()
    return (any(word in key for word in ("time", "latency", "timing"))
            or key.endswith("_ms") or key.endswith("_s"))


def without_timing(value: Any) -> Any:
    """``value`` (a report) with every mapping entry whose key names a timing removed, at any
    depth: what two runs of one configuration must agree on."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not _timing(str(k))}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def label(name: str) -> str:
    """The display name of a method key of a report (``cdeq_plus`` -> ``C-DEQ+``)."""
    return LABELS.get(name, name)


def fmt(report: dict[str, Any], value: float | None, std: float | None = None) -> str:
    """A metric value in the report's unit (accuracy in %), with ``± std`` when given."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    scale = 100 if report["metric"] == "accuracy" else 1
    digits = 2 if scale == 100 else 3 if report["metric"] == "nats_per_char" else 4
    text = f"{scale * value:.{digits}f}"
    if std is not None:
        text += f" ± {scale * std:.{digits}f}"
    elif report["metric"] == "nats_per_char":
        text += f" ({value / math.log(2):.3f})"
    return text


def _std(report: dict[str, Any], section: str, name: str, k: str) -> float | None:
    return report.get(f"{section}_std", {}).get(name, {}).get(k)


def _best(report: dict[str, Any], values: list[float]) -> float | None:
    if not values:
        return None
    return max(values) if report["higher_is_better"] else min(values)


def _budget_table(report: dict[str, Any], section: str) -> list[str]:
    budgets = [str(k) for k in report["budgets"]]
    lines = ["| method | " + " | ".join(f"NFE {k}" for k in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    data = report.get(section, {})
    best = {k: _best(report, [v[k] for v in data.values() if k in v]) for k in budgets}
    for name, values in data.items():
        cells = []
        for k in budgets:
            v = values.get(k)
            if section == "relative_error":
                cell = f"{v:.3f}" if v is not None else "-"
            else:
                cell = fmt(report, v, _std(report, section, name, k))
                if v is not None and v == best[k]:
                    cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    return lines


def _cost_table(report: dict[str, Any]) -> list[str]:
    cost, timing = report["cost"], report.get("timing", {})
    names = list(cost["layer_calls"])
    lines = ["", f"Cost per budget: layer-call equivalents (FLOPs less the shared injection and "
             f"head, over one teacher layer call of {cost['layer_call_flops']:.3g} FLOPs per "
             f"sample) / median ms per batch of {timing.get('batch_size', '?')} "
             f"({timing.get('threads', '?')} thread(s), {timing.get('repeats', '?')} interleaved "
             "repeats):", "",
             "| budget | " + " | ".join(f"**{label(n)}**" for n in names) + " | converged teacher |",
             "|---|" + "---|" * (len(names) + 1)]
    t = cost["teacher"]
    t_ms = timing.get("teacher", {}).get("median_ms")
    t_cell = f"{t['layer_calls']:.2f}" + ("" if t_ms is None else f" / {t_ms:.1f}")
    for i, k in enumerate(map(str, report["budgets"])):
        cells = []
        for n in names:
            calls = cost["layer_calls"][n].get(k)
            ms = timing.get(n, {}).get(k, {}).get("median_ms") if isinstance(timing.get(n), dict) else None
            cells.append("-" if calls is None else f"{calls:.2f}" + ("" if ms is None else f" / {ms:.1f}"))
        lines.append(f"| NFE {k} | " + " | ".join(cells) + f" | {t_cell if i == 0 else ''} |")
    return lines


def fits_cost(layer_calls: float, cost: float) -> bool:
    """Whether a method's ``layer_calls`` (layer-call equivalents per sample) fit the cost ``cost``
    (:data:`COST_SLACK` included): the rule of every equal-cost comparison."""
    return layer_calls <= cost * COST_SLACK


def equal_cost(report: dict[str, Any], costs: tuple = EQUAL_COSTS
               ) -> dict[str, dict[int, tuple[float, float | None, str] | None]]:
    """``{method: {c: (metric, std, budget)}}``: each method's best metric at a cost of at most
    ``c`` layer-call equivalents (``None`` when no budget fits)."""
    out: dict[str, dict[int, Any]] = {}
    calls = report["cost"]["layer_calls"]
    for name, values in report["methods"].items():
        out[name] = {}
        for c in costs:
            fit = [k for k, v in calls.get(name, {}).items() if fits_cost(v, c) and k in values]
            if not fit:
                out[name][c] = None
                continue
            sign = 1 if report["higher_is_better"] else -1
            k = max(fit, key=lambda k: (sign * values[k], -int(k)))
            out[name][c] = (values[k], _std(report, "methods", name, k), k)
    return out


def _equal_cost_table(report: dict[str, Any]) -> list[str]:
    table = equal_cost(report)
    names = list(table)
    lines = ["", f"At equal cost (the best of each method with at most c layer-call equivalents, "
             f"{COST_SLACK:g}x slack; its budget in brackets):", "",
             "| cost | " + " | ".join(f"**{label(n)}**" for n in names)
             + " | converged teacher (reference) |",
             "|---|" + "---|" * (len(names) + 1)]
    t = report["teacher"]
    t_cell = (f"{fmt(report, t['metric'], t.get('metric_std'))} "
              f"[{report['cost']['teacher']['layer_calls']:.1f} calls]")
    for c in EQUAL_COSTS:
        cells = []
        for n in names:
            got = table[n][c]
            cells.append("-" if got is None else f"{fmt(report, got[0], got[1])} [{got[2]}]")
        lines.append(f"| <= {c} | " + " | ".join(cells) + f" | {t_cell} |")
    return lines


def _teacher_accuracy_lines(report: dict[str, Any]) -> list[str]:
    tac = report["teacher_accuracy_cost"]

    def pick(p: dict | None) -> str:
        if p is None:
            return "none within the tolerance"
        ms = "" if p.get("median_ms") is None else f", {p['median_ms']:.1f} ms"
        return (f"{label(p['method'])}@{p['budget']} ({p['layer_calls']:.2f} layer calls{ms}; "
                f"test {fmt(report, p['test_metric'])})")

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    return ["", f"Teacher-accuracy cost (chosen on validation data: within {fmt(report, tac['tolerance'])}"
            f" of the converged teacher's {fmt(report, tac['valid_teacher_metric'])}): cdeq's cheapest "
            f"{pick(tac['cdeq'])}; best truncated solver {pick(tac['best_truncated'])}; cheapest of "
            f"all {pick(tac['by_flops']['any_method'])}. Speed-up of cdeq over the truncated "
            f"solver: {ratio(tac['speedup_flops'])} in FLOPs, {ratio(tac['speedup_time'])} in time."]


def pick_text(report: dict[str, Any], p: dict[str, Any] | None) -> str:
    """One recommendation, said plainly: the method and budget, whether it is a cdeq model, its
    validation and test figures."""
    if p is None:
        return "nothing fits"
    kind = "a cdeq model" if p["cdeq"] else "not a cdeq model"
    return (f"{p['label']} at {p['budget']} NFE ({kind}; {p['layer_calls']:.2f} layer calls; "
            f"validation {fmt(report, p['valid_metric'])}, test {fmt(report, p['test_metric'])})")


def recommendation_lines(report: dict[str, Any]) -> list[str]:
    """The recommendation (``report["recommend"]``, chosen on validation data) as a table."""
    rec = report["recommend"]
    lines = ["", f"Recommendation ({rec['rule']}):", "", "| cost | pick |", "|---|---|"]
    for c, p in rec["costs"].items():
        lines.append(f"| <= {c} layer calls | {pick_text(report, p)} |")
    lines.append(f"| teacher accuracy | {pick_text(report, rec['teacher_accuracy'])} |")
    return lines


def _latency_line(report: dict[str, Any]) -> list[str]:
    """Converged teacher against C-DEQ@1 in time (new reports: ``timing``; old: ``latency_ms``)."""
    timing = report.get("timing")
    if timing and "teacher" in timing:
        t = timing["teacher"]["median_ms"]
        c1 = timing.get("cdeq", {}).get("1", {}).get("median_ms")
    else:
        lat = report.get("latency_ms", {})
        if "teacher" not in lat:
            return []
        t, c1 = lat["teacher"], lat.get("cdeq@1")
        return ["", f"Latency per batch of {int(lat.get('batch_size', 0))} (median, ms): converged "
                f"teacher {t:.1f}" + ("" if c1 is None else f"; cdeq@1 {c1:.1f} (converged teacher "
                                      f"/ C-DEQ@1 = {t / c1:.1f}x)")]
    if not c1:
        return []
    return ["", f"Converged teacher (solver to tolerance) / C-DEQ@1 time: {t / c1:.1f}x; this "
            "compares against a solve to tolerance, not the teacher-accuracy cost above."]


def markdown_table(report: dict[str, Any]) -> str:
    """The report as markdown: budget tables, cost, equal cost, teacher-accuracy cost."""
    unit = {"accuracy": "accuracy, %", "nats_per_char": "nats/char (bits/char)"}.get(
        report["metric"], report["metric"])
    better = "higher" if report["higher_is_better"] else "lower"
    t = report["teacher"]
    seeds = f" over {len(report['seeds'])} seeds (mean ± std)" if report.get("seeds") else ""
    lines = [f"### {report['task']}: {unit} on the test split{seeds} ({better} is better)", "",
             f"Converged teacher: {fmt(report, t['metric'], t.get('metric_std'))} at "
             f"{t['nfe']:.1f} NFE on average.", ""]
    lines += _budget_table(report, "methods")
    lines += ["", "Relative error to the teacher's equilibrium z*:", ""]
    lines += _budget_table(report, "relative_error")
    if "cost" in report:
        lines += _cost_table(report) + _equal_cost_table(report)
    if "teacher_accuracy_cost" in report:
        lines += _teacher_accuracy_lines(report)
    if report.get("recommend"):
        lines += recommendation_lines(report)
    lines += _latency_line(report)
    for key, name in (("exact_mode", "C-DEQ"), ("exact_mode_plus", "C-DEQ+")):
        ex = report.get(key)
        if not ex:
            continue
        cold = next(v for k, v in ex.items() if k.endswith("_nfe") and not k.startswith("cdeq"))
        by_plan = ", ".join(f"{v:.1f} after a {k}-NFE plan" for k, v in ex["warm_nfe_by_plan"].items())
        lines += ["", f"Exact mode (to relative residual {ex['tol']:g}): {cold:.1f} NFE from z_0; "
                  f"from the {name} warm start, in total {by_plan} "
                  f"(best {ex['speedup']:.2f}x fewer, its plan chosen on validation data)."]
    costs = report.get("train_time_s")
    if costs:
        lines += ["", "Training cost (wall time, s): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in costs.items())]
    return "\n".join(lines) + "\n"


def _points(report: dict[str, Any], name: str, axis: str) -> list[tuple[float, float, float]]:
    """``(cost, metric, std)`` per budget of one method; ``axis`` "calls" or "time"."""
    scale = 100 if report["metric"] == "accuracy" else 1
    values = report["methods"][name]
    pts = []
    for k in map(str, report["budgets"]):
        if k not in values:
            continue
        if axis == "calls":
            x = report["cost"]["layer_calls"].get(name, {}).get(k) if "cost" in report else int(k)
        elif "timing" in report:
            x = report["timing"].get(name, {}).get(k, {}).get("median_ms")
        else:
            x = report.get("latency_ms", {}).get(f"{name}@{k}")
        if x is not None:
            pts.append((x, scale * values[k], scale * (_std(report, "methods", name, k) or 0.0)))
    return pts


def plot(report: dict[str, Any], path: str | Path) -> bool:
    """The Pareto view; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import io

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    scale = 100 if report["metric"] == "accuracy" else 1
    for name in report["methods"]:
        for ax, axis in zip(axes, ("calls", "time"), strict=True):
            pts = _points(report, name, axis)
            if pts:
                xs, ys, es = zip(*sorted(pts), strict=True)
                ax.errorbar(xs, ys, yerr=es if any(es) else None, marker="o", label=label(name))
    t = scale * report["teacher"]["metric"]
    for ax in axes:
        ax.axhline(t, color="k", ls="--", lw=1, label="teacher (converged)")
        ax.set_ylabel(report["metric"] + (" (%)" if scale == 100 else ""))
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    t_time = (report.get("timing", {}).get("teacher", {}).get("median_ms")
              or report.get("latency_ms", {}).get("teacher"))
    t_calls = report["cost"]["teacher"]["layer_calls"] if "cost" in report else report["teacher"]["nfe"]
    for ax, x in ((axes[0], t_calls), (axes[1], t_time)):
        if x:
            ax.scatter([x], [t], color="k", marker="*", s=80, zorder=5)
    if "cost" in report:
        axes[0].set_xlabel("layer-call equivalents (FLOPs, injection and head excluded)")
    else:
        axes[0].set_xlabel("NFE (layer calls)")
    timing = report.get("timing") or {"batch_size": report.get("latency_ms", {}).get("batch_size", 0)}
    axes[1].set_xlabel(f"median wall time per batch of {int(timing.get('batch_size', 0))} (ms)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['task']}: metric against cost, every method")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``table.md`` and ``plot.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    atomic_write_text(out / "table.md", markdown_table(report))
    files = {"report": out / "report.json", "table": out / "table.md"}
    if plot(report, out / "plot.png"):
        files["plot"] = out / "plot.png"
    return files
