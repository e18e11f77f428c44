"""What a user should pick at each cost, and each method's whole training work.

:func:`recommend` chooses, on validation data only, the method (and budget) with the best
validation metric among those that fit each cost of ``1 .. 4`` layer-call equivalents
(:data:`cdeq.run.report.EQUAL_COSTS`, with the report's slack), and the cheapest one at the
teacher's accuracy (:func:`cdeq.run.cost.teacher_accuracy_cost`); each pick says whether it is a
cdeq model (C-DEQ, C-DEQ+, C-DEQ tuned) and carries its test figure. :func:`with_totals` adds to
each method's training work its ``total``: training samples and layer calls (per sample, summed:
the rows the layer processed) including the teacher's training it starts from.
"""

from __future__ import annotations

from typing import Any

from .cost import OURS
from .report import COST_SLACK, EQUAL_COSTS, fits_cost, label

__all__ = ["recommend", "with_totals"]


def _sum(node: Any, key: str, skip: tuple[str, ...] = ()) -> int:
    """The sum of every ``key`` entry in a nested work dictionary, parts named in ``skip`` left out."""
    if not isinstance(node, dict):
        return 0
    total = int(node.get(key, 0)) if isinstance(node.get(key), (int, float)) else 0
    return total + sum(_sum(v, key, skip) for k, v in node.items() if k not in skip and isinstance(v, dict))


def with_totals(work: dict[str, Any]) -> dict[str, Any]:
    """``work`` (``{method: its training work}``, the ``teacher`` among them) with a ``total``
    per method: ``samples`` (optimiser samples; a recording's forward passes are not training
    samples) and ``layer_calls`` (layer calls per sample, summed over every part: the recording,
    the plan search, the training passes), the teacher's training included. The learned
    initialiser is fitted to the recorded ``z*``, so its total includes the recording."""
    teacher = work.get("teacher") or {}
    base = {"samples": int(teacher.get("samples", 0)), "layer_calls": int(teacher.get("layer_call_rows", 0))}
    record = ((work.get("cdeq") or {}).get("record") or {})
    out = {}
    for name, parts in work.items():
        if not isinstance(parts, dict):
            out[name] = parts
            continue
        own = {"samples": 0, "layer_calls": 0} if name == "teacher" else {
            "samples": _sum(parts, "samples", skip=("record",)),
            "layer_calls": _sum(parts, "layer_call_rows")}
        if name == "learned_init":
            own["layer_calls"] += int(record.get("layer_call_rows", 0))
        out[name] = {**parts, "total": {k: base[k] + own[k] for k in base}}
    return out


def recommend(report: dict[str, Any]) -> dict[str, Any]:
    """``{"costs": {c: pick}, "teacher_accuracy": pick, "rule": ...}`` (module docstring); a pick
    is ``{method, label, budget, cdeq, layer_calls, valid_metric, test_metric}`` or ``None``."""
    valid, calls = report["valid"]["methods"], report["cost"]["layer_calls"]
    sign = 1 if report["higher_is_better"] else -1

    def pick(name: str, k: str, v: float) -> dict[str, Any]:
        return {"method": name, "label": label(name), "budget": int(k), "cdeq": name in OURS,
                "layer_calls": calls[name][k], "valid_metric": v,
                "test_metric": report["methods"].get(name, {}).get(k)}

    costs: dict[str, Any] = {}
    for c in EQUAL_COSTS:
        pool = [(name, k, v) for name, per in valid.items() for k, v in per.items()
                if k in calls.get(name, {}) and fits_cost(calls[name][k], c)]
        best = max(pool, key=lambda p: (sign * p[2], -calls[p[0]][p[1]])) if pool else None
        costs[str(c)] = pick(*best) if best else None
    tac = (report.get("teacher_accuracy_cost") or {}).get("by_flops", {}).get("any_method")
    teacher = None
    if tac:
        teacher = pick(tac["method"], str(tac["budget"]), tac["valid_metric"])
    return {"costs": costs, "teacher_accuracy": teacher,
            "rule": f"on validation data: the best metric within each cost (layer-call equivalents, "
                    f"{COST_SLACK:g}x slack; equal metrics: the cheaper), and the cheapest method within "
                    "the teacher-accuracy tolerance"}
