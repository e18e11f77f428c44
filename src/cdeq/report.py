"""Report files: ``report.json``, ``table.md`` and ``plot.png`` (metric against NFE and wall time)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .io import atomic_write_bytes, atomic_write_text, write_json

LABELS = {"picard": "Picard", "anderson": "Anderson", "broyden": "Broyden", "cdeq": "C-DEQ",
          "learned_init": "learned init", "unrolled": "unrolled k-step",
          "unrolled_any_k": "anytime unrolled"}


def _fmt(report: dict[str, Any], value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if report["metric"] == "accuracy":
        return f"{100 * value:.2f}"
    if report["metric"] == "nats_per_char":
        return f"{value:.3f} ({value / math.log(2):.3f})"
    return f"{value:.4f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The budget table: one row per method, one column per NFE budget."""
    budgets = [str(k) for k in report["budgets"]]
    metric = report["metric"]
    unit = {"accuracy": "accuracy, %", "nats_per_char": "nats/char (bits/char)"}.get(metric, metric)
    better = "higher" if report["higher_is_better"] else "lower"
    lines = [
        f"### {report['task']}: {unit} on held-out data ({better} is better)",
        "",
        f"Converged teacher: {_fmt(report, report['teacher']['metric'])} at "
        f"{report['teacher']['nfe']:.1f} NFE on average.",
        "",
        "| method | " + " | ".join(f"NFE {k}" for k in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    best_per_k = {}
    for k in budgets:
        vals = [v[k] for name, v in report["methods"].items() if k in v]
        if vals:
            best_per_k[k] = max(vals) if report["higher_is_better"] else min(vals)
    for name, values in report["methods"].items():
        cells = []
        for k in budgets:
            v = values.get(k)
            cell = _fmt(report, v)
            if v is not None and v == best_per_k.get(k):
                cell = f"**{cell}**"
            cells.append(cell)
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    lines += ["", "Relative error to the teacher's equilibrium z*:", "",
              "| method | " + " | ".join(f"NFE {k}" for k in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for name, values in report.get("relative_error", {}).items():
        lines.append(f"| {LABELS.get(name, name)} | "
                     + " | ".join(f"{values[k]:.3f}" if k in values else "-" for k in budgets) + " |")
    lat = report.get("latency_ms", {})
    if lat:
        bs = int(lat.get("batch_size", 0))
        lines += ["", f"Latency per batch of {bs} (median, ms): converged teacher {lat['teacher']:.1f}"]
        for key in ("cdeq@1", "cdeq@2", "anderson@1"):
            if key in lat:
                lines[-1] += f"; {key} {lat[key]:.1f}"
        if "cdeq@1" in lat and lat["cdeq@1"] > 0:
            lines[-1] += f" (teacher / C-DEQ@1 = {lat['teacher'] / lat['cdeq@1']:.1f}x)"
    ex = report.get("exact_mode")
    if ex:
        cold = next(v for k, v in ex.items() if k.endswith("_nfe") and not k.startswith("cdeq"))
        by_plan = ", ".join(f"{v:.1f} after a {k}-NFE plan" for k, v in ex["warm_nfe_by_plan"].items())
        lines += ["", f"Exact mode (to relative residual {ex['tol']:g}): {cold:.1f} NFE from z_0; "
                  f"from the C-DEQ warm start, in total {by_plan} "
                  f"(best {ex['speedup']:.2f}x fewer)."]
    costs = report.get("train_time_s")
    if costs:
        lines += ["", "Training cost (wall time, s): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in costs.items())]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | Path) -> bool:
    """Metric against NFE and against latency; returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import io

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lat = report.get("latency_ms", {})
    scale = 100 if report["metric"] == "accuracy" else 1
    for name, values in report["methods"].items():
        ks = [k for k in map(str, report["budgets"]) if k in values]
        ys = [scale * values[k] for k in ks]
        label = LABELS.get(name, name)
        axes[0].plot([int(k) for k in ks], ys, marker="o", label=label)
        pts = [(lat[f"{name}@{k}"], scale * values[k]) for k in ks if f"{name}@{k}" in lat]
        if pts:
            axes[1].plot(*zip(*pts, strict=True), marker="o", label=label)
    t = scale * report["teacher"]["metric"]
    for ax in axes:
        ax.axhline(t, color="k", ls="--", lw=1, label="teacher (converged)")
        ax.set_ylabel(report["metric"] + (" (%)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
    if "teacher" in lat:
        axes[1].scatter([lat["teacher"]], [t], color="k", marker="*", s=80, zorder=5)
    axes[0].set_xlabel("NFE (layer calls)")
    axes[0].set_xscale("log", base=2)
    axes[1].set_xlabel(f"latency per batch of {int(lat.get('batch_size', 0))} (ms)")
    axes[1].set_xscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{report['task']}: teacher truncated vs C-DEQ")
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
