"""The plan search's tie rule, judged on validation items the search does not see.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/tie_rule.py \
        --runs RUN_DIR/seed_0 RUN_DIR/seed_1 RUN_DIR/seed_2 --out benchmarks/results/tie_rule_TASK.json

For each finished run (teacher, C-DEQ, C-DEQ+ and the learned initialiser), the items of the
selection (validation) batches are split in two by a fixed interleave (images and sequences: every
other row; graphs: every other validation node). Each rule searches the plans of C-DEQ and C-DEQ+ on
the first half; the second half scores them at every budget: the task metric, the loss (in the
JSON) and the relative error to ``z*`` (the teacher's eval solver). The learned initialiser plus
``k`` solver steps is scored the same way. The test split is never read. Rules (the fields of the
search's private ``_Rule``; the last is the search's fixed rule, ``cdeq.consistency.search``):

- exact ties, broken by the loss (``tie_within_se=0``, ``tie_break=loss``);
- exact ties, broken by the error to ``z*``;
- a gain below one standard error is a tie, broken by the error to ``z*``;
- the same, and a plan within one standard error of the converged teacher (the student's head
  on ``z*``) ties too (``tie_with_teacher``);
- the same, and each chosen plan is read out by the teacher's head where that scores higher on
  the search half by one standard error or more (``teacher_head``);
- the same, but a plan ties with the teacher only when its metric is not below the teacher's
  (``teacher_within_se=0``): the rule the search keeps.

``--rules`` picks some of them by number (1-6, in this order).

The converged teacher (its eval solver from ``z_0``) is scored on the held-out half as well, and
C-DEQ's fine-tuned head on the same ``z*``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from cdeq.consistency import search as plan_search
from cdeq.consistency.plans import plan_to_json
from cdeq.engine.precision import to_device
from cdeq.engine.tree import relative_error
from cdeq.run.stages import Run

STUDENT_HEAD = {"tie_with_teacher": False, "teacher_head": False, "teacher_within_se": 1.0}
SE_TIES = {"tie_within_se": 1.0, "tie_break": "error"}
RULES = {  # each a _Rule: the search's own is the last
    "exact ties, by the loss": {"tie_within_se": 0.0, "tie_break": "loss", **STUDENT_HEAD},
    "exact ties, by the error": {"tie_within_se": 0.0, "tie_break": "error", **STUDENT_HEAD},
    "1 SE ties, by the error": {**SE_TIES, **STUDENT_HEAD},
    "1 SE ties with the best or the teacher, by the error": {
        **SE_TIES, **STUDENT_HEAD, "tie_with_teacher": True},
    "the same, read out by the teacher's head where it scores higher": {
        **SE_TIES, **STUDENT_HEAD, "tie_with_teacher": True, "teacher_head": True},
    "the same, tying with the teacher only when not below it": {
        **SE_TIES, "tie_with_teacher": True, "teacher_head": True, "teacher_within_se": 0.0},
}
BUDGETS = (1, 2, 3, 4, 6, 8, 12, 16)


def halves(batch: Any) -> tuple[Any, Any]:
    """A selection batch split in two by a fixed interleave of its items."""
    x, y = batch
    if isinstance(y, (tuple, list)):  # a graph: (labels, mask) over its nodes
        labels, mask = y
        nodes = mask.nonzero().squeeze(1)
        first, second = torch.zeros_like(mask), torch.zeros_like(mask)
        first[nodes[0::2]], second[nodes[1::2]] = True, True
        return (x, (labels, first)), (x, (labels, second))
    return (x[0::2], y[0::2]), (x[1::2], y[1::2])


@torch.no_grad()
def held_out(run: Run, predict, data: list) -> dict[str, dict[str, float]]:
    """``{budget: {"metric", "loss", "relative_error"}}`` of ``predict(x, k) -> (logits, z)`` on
    ``data``: ``(x, y, z*)`` batches. A budget where ``predict`` returns ``None`` (a model with
    fewer steps) ends the list."""
    out = {}
    for k in BUDGETS:
        m = n = e = en = loss = 0.0
        for x, y, z_star in data:
            got = predict(x, k)
            if got is None:
                return out
            logits, z = got
            ms, c = run.task.metric_sum(logits, y)
            err = relative_error(z, z_star)
            loss += float(run.task.loss(logits, y)) * c
            m, n, e, en = m + ms, n + c, e + float(err.sum()), en + err.numel()
        out[str(k)] = {"metric": m / n, "loss": loss / n, "relative_error": e / en}
    return out


def split_selection(run: Run, teacher) -> tuple[list, list]:
    """The run's selection batches split in halves: ``(search, scored)``, the second as
    ``(x, y, z*)`` with ``z*`` from the teacher's eval solver from ``z_0``."""
    batches = [to_device(b, run.device) for b in itertools.islice(run.task.selection_batches(
        run.config.evaluate.batch_size), run.config.plans.batches)]
    search, score = zip(*(halves(b) for b in batches), strict=True)
    with torch.no_grad():
        scored = [(x, y, teacher.deq.solve(u, teacher.initial_state(u)).z)
                  for x, y in score for u in (teacher.inject(x),)]
    return list(search), scored


def one_run(path: str, rules: dict[str, dict]) -> dict[str, Any]:
    run = Run(path)
    teacher = run.teacher()
    student = run.student(teacher)
    models = {"C-DEQ": student, "C-DEQ+": run.student_plus(teacher, student)}
    search, scored = split_selection(run, teacher)  # z* of the held-out half, solved once
    result: dict[str, Any] = {"run": "/".join(Path(path).resolve().parts[-2:]),
                              "task": run.config.task, "seed": run.config.seed,
                              "search_items": sum(labelled_items(y) for _, y in search),
                              "held_out_items": sum(labelled_items(y) for _, y, _ in scored), "models": {}}
    last = run.config.record.solver.max_iter
    cfg = dataclasses.replace(run.config.plans, batches=len(search))
    for name, model in models.items():
        result["models"][name] = {}
        for rule, changes in rules.items():
            with run.autocast():
                select_half(run, model, search, last, cfg, changes)
            per = held_out(run, lambda x, k, m=model: m.predict(x, nfe=k), scored)
            per["plans"] = {str(k): plan_to_json(model.plan_for(k)) for k in BUDGETS}
            result["models"][name][rule] = per
    extra, _, _ = run._extra_methods(teacher, None)
    result["models"]["learned init"] = {"-": held_out(run, extra["learned_init"], scored)}

    z_of = {id(x): z for x, _, z in scored}  # the held-out z*, solved once above

    def converged(x: Any, k: int) -> tuple[Any, Any]:
        return teacher.head(z_of[id(x)]), z_of[id(x)]

    result["models"]["converged teacher"] = {"-": held_out(run, converged, scored)}
    result["models"]["C-DEQ's head on z*"] = {"-": held_out(
        run, lambda x, k: (student.head(z_of[id(x)]), z_of[id(x)]), scored)}
    return result


def select_half(run: Run, model: Any, search: list, last: int, config: Any,
                changes: dict | None = None) -> None:
    """Search ``model``'s plans on the ``search`` half with the rule changed by ``changes``
    (fields of the search's private ``_Rule``; none: the search's own rule)."""
    rule = dataclasses.replace(plan_search._RULE, **(changes or {}))
    plan_search._select_plans(model, search, run._score, run.task.higher_is_better, last, config,
                              None, rule)


def labelled_items(y: Any) -> int:
    """Labelled items of a batch's targets: the masked nodes of a graph, else every target."""
    return int(y[1].sum()) if isinstance(y, (tuple, list)) else int(y.numel())


def mean_sd(vals: list[float]) -> str:
    """``mean ± std`` of the runs' values (std 0 for one run; ``-`` for none)."""
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.mean(vals):.4f} ± {sd:.4f}"


def table(results: list[dict[str, Any]], key: str) -> list[str]:
    """Markdown rows: mean and spread over the runs of ``key`` at each budget."""
    rows = ["| model | rule | " + " | ".join(f"NFE {k}" for k in BUDGETS) + " |",
            "|---|---|" + "---|" * len(BUDGETS)]
    for name, rules in results[0]["models"].items():
        for rule in rules:
            cells = [mean_sd([r["models"][name][rule][str(k)][key] for r in results]) for k in BUDGETS]
            rows.append(f"| {name} | {rule} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="finished run directories (seeds)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--rules", nargs="+", type=int, choices=range(1, len(RULES) + 1),
                   help="the rules to compare, by number (default: all)")
    args = p.parse_args()
    names = list(RULES)
    rules = {names[i - 1]: RULES[names[i - 1]] for i in sorted(set(args.rules or range(1, len(RULES) + 1)))}
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    results = [one_run(path, rules) for path in args.runs]
    lines = [f"{results[0]['task']}: held-out validation half ({results[0]['held_out_items']} items; "
             f"plans searched on the other {results[0]['search_items']}), mean ± std over "
             f"{len(results)} runs", "", "metric:", *table(results, "metric"), "",
             "relative error to z*:", *table(results, "relative_error")]
    print("\n".join(lines))
    with open(args.out, "w") as f:
        json.dump({"rules": rules, "budgets": BUDGETS, "runs": results, "table": lines}, f, indent=1)


if __name__ == "__main__":
    main()
