"""``cdeq summarize RUN... [--out FILE]``: the markdown tables of ``docs/results.md``, from report files.

Each ``RUN`` is a run directory (or a folder of them: every ``report.json`` below it is read, except
the per-seed runs of an aggregate). With ``--out FILE`` the tables replace what lies between the
markers :data:`BEGIN` and :data:`END` in ``FILE``, so the prose around them stays; without, they
are printed. A report without the cost fields (written before they existed) leaves those tables'
rows out; the tables say which runs they cover.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.config import ConfigError
from ..engine.io import atomic_write_text, read_json
from .cost import teacher_accuracy_cost
from .report import EQUAL_COSTS, TRUNCATED_LABEL, equal_cost, fmt, label

BEGIN = "<!-- cdeq summarize: begin (generated from the report files; edit the prose outside) -->"
END = "<!-- cdeq summarize: end -->"
SUMMARY_BUDGETS = ("1", "2", "3", "4")


def find_reports(runs: list[str | Path]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, report)`` for every report under ``runs``; the name is the path below the run's
    parent folder (``cora/inductive``)."""
    found = []
    for run in runs:
        run = Path(run)
        if run.is_file():
            found.append((run.parent.name, read_json(run)))
            continue
        if not run.is_dir():
            raise ConfigError(f"{run} is neither a run directory nor a report.json file")
        paths = sorted(p for p in run.rglob("report.json")
                       if not any(part.startswith("seed_") for part in p.relative_to(run).parts))
        if not paths:
            raise ConfigError(f"{run} holds no report.json (run `cdeq run` or `cdeq evaluate` first)")
        for p in paths:
            found.append((p.parent.relative_to(run.parent).as_posix(), read_json(p)))
    return found


def _cell(report: dict[str, Any], name: str, k: str) -> str:
    v = report["methods"].get(name, {}).get(k)
    return fmt(report, v, report.get("methods_std", {}).get(name, {}).get(k))


def _best_truncated(report: dict[str, Any], k: str) -> float | None:
    sign = 1 if report["higher_is_better"] else -1
    vals = [report["methods"][s][k] for s in ("picard", "anderson", "broyden")
            if k in report["methods"].get(s, {})]
    return max(vals, key=lambda v: sign * v) if vals else None


def _converged_ratio(rep: dict[str, Any]) -> str:
    """Converged-teacher time over C-DEQ@1 time, with the batch (new ``timing`` or old ``latency_ms``)."""
    timing = rep.get("timing")
    if timing and "teacher" in timing:
        t, c1 = timing["teacher"]["median_ms"], timing.get("cdeq", {}).get("1", {}).get("median_ms")
        batch = timing.get("batch_size")
    else:
        lat = rep.get("latency_ms", {})
        t, c1, batch = lat.get("teacher"), lat.get("cdeq@1"), lat.get("batch_size")
    if not t or not c1:
        return "-"
    return f"{t / c1:.1f}x (batch {int(batch)})" if batch else f"{t / c1:.1f}x"


def _summary_table(found: list[tuple[str, dict]]) -> list[str]:
    lines = ["| run | metric | seeds | converged teacher (NFE) | method | "
             + " | ".join(f"NFE {k}" for k in SUMMARY_BUDGETS)
             + " | converged teacher / C-DEQ@1 time |",
             "|---|---|---|---|---|" + "---|" * (len(SUMMARY_BUDGETS) + 1)]
    for name, rep in found:
        t = rep["teacher"]
        seeds = len(rep.get("seeds", [])) or 1
        head = (f"| {name} | {rep['metric']} | {seeds} | "
                f"{fmt(rep, t['metric'], t.get('metric_std'))} ({t['nfe']:.1f}) | ")
        trunc = [fmt(rep, _best_truncated(rep, k)) for k in SUMMARY_BUDGETS]
        lines.append(head + f"{TRUNCATED_LABEL} | " + " | ".join(trunc) + f" | {_converged_ratio(rep)} |")
        for method in rep["methods"]:
            if method in ("picard", "anderson", "broyden"):
                continue
            lines.append(f"| | | | | {label(method)} | "
                         + " | ".join(_cell(rep, method, k) for k in SUMMARY_BUDGETS) + " | |")
    return lines


def _equal_cost_table(found: list[tuple[str, dict]]) -> list[str]:
    with_cost = [(n, r) for n, r in found if "cost" in r]
    if not with_cost:
        return ["No report here has the cost fields yet (FLOPs, layer-call equivalents, timing): "
                "the equal-cost and teacher-accuracy tables appear once the runs are redone."]
    lines = ["| run | method | " + " | ".join(f"<= {c} layer calls" for c in EQUAL_COSTS) + " |",
             "|---|---|" + "---|" * len(EQUAL_COSTS)]
    for name, rep in with_cost:
        table = equal_cost(rep)
        for i, (method, per) in enumerate(table.items()):
            cells = ["-" if per[c] is None else f"{fmt(rep, per[c][0], per[c][1])} [{per[c][2]}]"
                     for c in EQUAL_COSTS]
            lines.append(f"| {name if i == 0 else ''} | {label(method)} | " + " | ".join(cells) + " |")
    lines += ["", "| run | tolerance | cdeq's cheapest (C-DEQ, C-DEQ+ or C-DEQ tuned) | best truncated | "
              "speed-up (FLOPs) | speed-up (time) |", "|---|---|---|---|---|---|"]
    for name, rep in with_cost:
        tac = rep.get("teacher_accuracy_cost") or (teacher_accuracy_cost(rep) if "valid" in rep else {})

        def pick(p: dict | None, rep: dict = rep) -> str:
            return "none" if p is None else (f"{label(p['method'])}@{p['budget']}: "
                                             f"{fmt(rep, p['test_metric'])}, {p['layer_calls']:.2f} calls")

        def ratio(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}x"

        lines.append(f"| {name} | {fmt(rep, tac.get('tolerance'))} | {pick(tac.get('cdeq'))} | "
                     f"{pick(tac.get('best_truncated'))} | {ratio(tac.get('speedup_flops'))} | "
                     f"{ratio(tac.get('speedup_time'))} |")
    return lines


ONE_MODEL = "cdeq_tuned"
"""cdeq's one model for every budget, whose verdict :func:`_verdict_table` gives."""


def _std(rep: dict[str, Any], name: str, k: str) -> float:
    return float(rep.get("methods_std", {}).get(name, {}).get(k) or 0.0)


def _verdict_table(found: list[tuple[str, dict]]) -> list[str]:
    """At each cost of 1-4 layer calls: C-DEQ tuned against the best other method (test figures):
    a win, a tie (the difference within one std of the seeds, the larger of the two) or a loss."""
    rows = [(n, r) for n, r in found if "cost" in r and ONE_MODEL in r["methods"]]
    if not rows:
        return []
    lines = ["", f"The verdict for cdeq's one model ({label(ONE_MODEL)}) at equal cost (test split; "
             "a tie is a difference within one standard deviation of the seeds, the larger of the "
             "two methods'; one seed has no std, so only equal figures tie):", "",
             "| run | cost | " + label(ONE_MODEL) + " | best other method | difference | verdict |",
             "|---|---|---|---|---|---|"]
    for name, rep in rows:
        table = equal_cost(rep)
        sign = 1 if rep["higher_is_better"] else -1
        scale = 100 if rep["metric"] == "accuracy" else 1
        for i, c in enumerate(EQUAL_COSTS):
            ours = table[ONE_MODEL][c]
            others = [(m, per[c]) for m, per in table.items() if m != ONE_MODEL and per[c] is not None]
            if ours is None or not others:
                continue
            best_name, best = max(others, key=lambda p: sign * p[1][0])
            diff = sign * (ours[0] - best[0])
            noise = max(_std(rep, ONE_MODEL, ours[2]), _std(rep, best_name, best[2]))
            verdict = "win" if diff > noise else "tie" if diff >= -noise else "loss"
            lines.append(f"| {name if i == 0 else ''} | <= {c} | {fmt(rep, ours[0], ours[1])} [{ours[2]}] "
                         f"| {label(best_name)}: {fmt(rep, best[0], best[1])} [{best[2]}] | "
                         f"{scale * diff:+.3f} | {verdict} |")
    return lines


def _convergence_table(found: list[tuple[str, dict]]) -> list[str]:
    """C-DEQ tuned at the larger budgets against the converged teacher, and its error to ``z*``
    at every budget (the tuned budgets' error is free to rise; from the hand-over on it falls)."""
    rows = [(n, r) for n, r in found if ONE_MODEL in r["methods"]]
    if not rows:
        return []
    budgets = [str(k) for k in rows[0][1]["budgets"]]
    lines = ["", f"{label(ONE_MODEL)} against the converged teacher, and its relative error to z* "
             "at every budget (test split):", "",
             "| run | converged teacher | " + label(ONE_MODEL) + f" @ {budgets[-1]} | "
             + " | ".join(f"error @ {k}" for k in budgets) + " |",
             "|---|---|---|" + "---|" * len(budgets)]
    for name, rep in rows:
        t = rep["teacher"]
        err = rep["relative_error"].get(ONE_MODEL, {})
        lines.append(f"| {name} | {fmt(rep, t['metric'], t.get('metric_std'))} | "
                     f"{_cell(rep, ONE_MODEL, budgets[-1])} | "
                     + " | ".join("-" if k not in err else f"{err[k]:.3f}" for k in budgets) + " |")
    return lines


def _recommend_table(found: list[tuple[str, dict]]) -> list[str]:
    """Each report's recommendation (``report["recommend"]``, chosen on validation data)."""
    rows = [(n, r) for n, r in found if r.get("recommend")]
    if not rows:
        return []
    lines = ["", "What to pick (`recommend` in each report: chosen on validation data, the best "
             "metric within each cost and the cheapest method at the teacher's accuracy; test "
             "figures; *not cdeq* marks a method that is not a cdeq model):", "",
             "| run | " + " | ".join(f"<= {c} layer calls" for c in EQUAL_COSTS) + " | teacher accuracy |",
             "|---|" + "---|" * (len(EQUAL_COSTS) + 1)]
    for name, rep in rows:
        rec = rep["recommend"]

        def cell(p: dict | None, rep: dict = rep) -> str:
            if p is None:
                return "-"
            mark = "" if p["cdeq"] else " (*not cdeq*)"
            return f"{p['label']}@{p['budget']}{mark}: {fmt(rep, p['test_metric'])}"

        lines.append(f"| {name} | " + " | ".join(cell(rec["costs"].get(str(c))) for c in EQUAL_COSTS)
                     + f" | {cell(rec.get('teacher_accuracy'))} |")
    return lines


def _teacher_table(found: list[tuple[str, dict]]) -> list[str]:
    """How each run's teacher training ended (``teacher.stopped``, epochs run, best epoch)."""
    rows = [(n, r) for n, r in found if "stopped" in r["teacher"] or "stopped_per_seed" in r["teacher"]]
    if not rows:
        return []
    lines = ["", "How the teachers' training ended (`teacher.stopped`: `plateau` when the validation "
             "loss stopped improving, `max_epochs` at the cap; per seed):", "",
             "| run | stopped | epochs run | best epoch |", "|---|---|---|---|"]
    for name, rep in rows:
        t = rep["teacher"]

        def per_seed(key: str, t: dict = t) -> str:
            values = t.get(f"{key}_per_seed", [t[key]] if key in t else [])
            return ", ".join(str(v + 1 if key == "best_epoch" else v) for v in values)

        lines.append(f"| {name} | {per_seed('stopped')} | {per_seed('epochs')} | {per_seed('best_epoch')} |")
    return lines


def summarize(runs: list[str | Path]) -> str:
    """The generated block (markers included) for the reports under ``runs``."""
    found = find_reports(runs)
    lines = [BEGIN, "", f"Generated by `cdeq summarize` from {len(found)} report files. Test "
             "split; accuracy in %, losses in nats/char (bits/char in brackets for one seed). "
             f"\"{TRUNCATED_LABEL}\" is the best of Picard, Anderson and Broyden at that budget. The last "
             "column compares against the teacher solved to tolerance, not against the cheapest "
             "truncated solver at the teacher's accuracy (the teacher-accuracy cost below).", ""]
    lines += _summary_table(found)
    lines += ["", "At equal cost (layer-call equivalents: FLOPs less the shared injection and head, "
              "over one teacher layer call; each method's best metric within the cost, its budget in "
              "brackets), and the teacher-accuracy cost (the cheapest budget within the tolerance of "
              "the converged teacher on validation data; test figures):", ""]
    lines += _equal_cost_table(found)
    lines += _verdict_table(found) + _convergence_table(found) + _recommend_table(found)
    lines += _teacher_table(found)
    return "\n".join(lines + ["", END]) + "\n"


def replace_block(text: str, block: str, where: str = "the file") -> str:
    """``text`` with the part from :data:`BEGIN` to :data:`END` replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ConfigError(f"{where} has no generated section: put the lines\n{BEGIN}\n{END}\n"
                          "where the tables belong")
    return text[:start] + block.rstrip("\n") + text[end + len(END):]


def write_summary(runs: list[str | Path], out: str | Path | None) -> str:
    """Render, and write into ``out`` between the markers (a new file holds the block alone)."""
    block = summarize(runs)
    if out is None:
        return block
    path = Path(out)
    text = replace_block(path.read_text(), block, str(path)) if path.exists() else block
    atomic_write_text(path, text)
    return text
