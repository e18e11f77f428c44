"""C-DEQ+ training choices, judged on validation data only.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/plus_choices.py --run RUN_DIR \
        --out benchmarks/results/plus_choices_digits.json
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/plus_choices.py --held-out \
        --run RUN/seed_0 RUN/seed_1 RUN/seed_2 --out benchmarks/results/plus_choices_TASK_held_out.json

From a finished run (its teacher, C-DEQ student and recorded trajectories), builds C-DEQ+ once per
variant (:func:`cdeq.consistency.plus.train_plus` with the run's settings changed as the variant
says), selects
its plans as the pipeline does, and prints each variant's **validation** metric and loss at 1, 2,
3, 4 and 8 NFE (and the anytime unrolled network's, when the run has one). The test split is never
read. Variants: the task weight, the chain supervision (``plus.chain_k``) and its data
(``plus.chain_data``), the joint epochs
(``plus.epochs``), the pull to ``z*`` (the consistency weights, against the task loss) and
C-DEQ+'s own injection (``student.train_injection`` for C-DEQ+ alone);
``--variants`` runs some of them, by name.

With ``--held-out`` the plans are searched on one half of the selection batches and every variant
is scored on the other half (the split of ``tie_rule.py``) at more budgets: the metric, the loss
and the relative error to ``z*`` (the teacher's eval solver), beside the run's own C-DEQ and
C-DEQ+ (their plans searched on the same half; C-DEQ+ also with the plan its chain trains, no
search), the anytime network and the learned initialiser; with several runs (seeds) it prints
their mean ± std.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import tie_rule
import torch

from cdeq.consistency.plus import train_plus
from cdeq.run.stages import Run, chain_batches

VARIANTS = {
    "chain 0, task weight 0.1, a third of the epochs": ({"chain_k": 0}, 1 / 3),
    "chain 0, task weight 1, a third of the epochs": ({"chain_k": 0, "task_weight": 1.0}, 1 / 3),
    "chain 4, a third of the epochs": ({"chain_k": 4}, 1 / 3),
    "chain 0, all the epochs": ({"chain_k": 0}, 1.0),
    "chain 4, all the epochs (default)": ({"chain_k": 4}, 1.0),
    "chain 4 on the recorded samples only": ({"chain_k": 4, "chain_data": "recorded"}, 1.0),
    "a third of the pull to z*, task weight 1": (
        {"global_weight": 0.3, "local_weight": 0.033, "task_weight": 1.0}, 1.0),
    "task weight 1": ({"task_weight": 1.0}, 1.0),
    "no pull to z*, task weight 1": (
        {"global_weight": 0.0, "local_weight": 0.0, "init_weight": 0.0, "task_weight": 1.0}, 1.0),
    "three times the epochs": ({}, 3.0),
    "no pull to z*, task weight 1, three times the epochs": (
        {"global_weight": 0.0, "local_weight": 0.0, "init_weight": 0.0, "task_weight": 1.0}, 3.0),
    "own injection": ({"train_injection": True}, 1.0),
    "own injection, task weight 1": ({"task_weight": 1.0, "train_injection": True}, 1.0),
}
"""Variant name -> (changed settings of the ``plus``, ``distill`` or ``student`` section, by key;
the share of ``distill.epochs`` the joint stage runs)."""
BUDGETS = (1, 2, 3, 4, 8)
HELD_OUT_BUDGETS = tie_rule.BUDGETS


@torch.no_grad()
def validation(run: Run, predict) -> dict[str, dict[str, float]]:
    out = {}
    for k in BUDGETS:
        m = loss = n = 0.0
        for x, y in run.task.validation_batches(run.config.evaluate.batch_size):
            got = predict(x, k)
            if got is None:
                break
            ms, c = run.task.metric_sum(got[0], y)
            m, n, loss = m + ms, n + c, loss + float(run.task.loss(got[0], y)) * c
        if n:
            out[str(k)] = {"metric": m / n, "loss": loss / n}
    return out


def build(run: Run, teacher, student, trajectories, name: str):
    """C-DEQ+ trained with variant ``name``'s changes to the run's settings (plans not yet set)."""
    cfg = run.config
    changes, share = VARIANTS[name]
    torch.manual_seed(cfg.seed)

    def changed(section):
        names = {f.name for f in dataclasses.fields(section)}
        return dataclasses.replace(section, **{k: v for k, v in changes.items() if k in names})

    dcfg, scfg = changed(cfg.distill), changed(cfg.student)
    pcfg = dataclasses.replace(changed(cfg.plus), epochs=max(1, round(cfg.distill.epochs * share)))
    chain = chain_batches(pcfg, dcfg, run.task, cfg.record)
    plus, _ = train_plus(student, trajectories, pcfg, dcfg, run.task.loss,
                         seed=cfg.seed, task_batches=chain, student_config=scfg)
    return plus


def chain_plan(plus):
    """``(x, k) -> (logits, z)`` of the plan the joint stage's chain trains: a jump from ``h(u)``
    at the start time, then ``k - 1`` jumps at the re-entry time (no search)."""

    @torch.no_grad()
    def fn(x, k: int):
        return plus.predict(x, plan=[("jump", plus.start_time)] + [("jump", plus.reentry_time)] * (k - 1))

    return fn


def load(path: str) -> tuple[Run, Any, Any, Any]:
    """A finished run, its teacher, its C-DEQ student and its recorded trajectories."""
    run = Run(path)
    teacher = run.teacher()
    return run, teacher, run.student(teacher), run.trajectories()


def on_validation(path: str, variants: list[str]) -> dict[str, Any]:
    """Each variant's plans searched and scored on the whole selection (validation) split."""
    run, teacher, student, trajectories = load(path)
    result: dict = {"run": str(path), "task": run.config.task, "split": "valid", "variants": {}}
    for name in variants:
        plus = build(run, teacher, student, trajectories, name)
        run._search_plans(plus, teacher)
        result["variants"][name] = validation(run, lambda x, k, plus=plus: plus.predict(x, nfe=k))
    extra, _, _ = run._extra_methods(teacher, None)
    if "unrolled_any_k" in extra:
        result["variants"]["anytime unrolled network"] = validation(run, extra["unrolled_any_k"])
    return result


def on_held_out_half(path: str, variants: list[str]) -> dict[str, Any]:
    """Each variant's plans searched on one half of the selection batches, scored on the other."""
    run, teacher, student, trajectories = load(path)
    search, scored = tie_rule.split_selection(run, teacher)
    last = run.config.record.solver.max_iter
    plans_cfg = dataclasses.replace(run.config.plans, batches=len(search))

    def search_half(model) -> None:
        with run.autocast():
            tie_rule.select_half(run, model, list(search), last, plans_cfg)

    result: dict = {"run": "/".join(Path(path).resolve().parts[-2:]), "task": run.config.task,
                    "split": "valid, held-out half", "variants": {},
                    "search_items": sum(tie_rule.labelled_items(y) for _, y in search),
                    "held_out_items": sum(tie_rule.labelled_items(y) for _, y, _ in scored)}
    for name in variants:
        plus = build(run, teacher, student, trajectories, name)
        search_half(plus)
        result["variants"][name] = tie_rule.held_out(
            run, lambda x, k, m=plus: m.predict(x, nfe=k), scored)
    search_half(student)  # the run's C-DEQ, after the variants (it is their starting point)
    result["variants"]["C-DEQ (the run's)"] = tie_rule.held_out(
        run, lambda x, k: student.predict(x, nfe=k), scored)
    if (run.dir / "student_plus.safetensors").exists():  # the run's own C-DEQ+, as trained
        plus = run.student_plus(teacher, student)
        search_half(plus)
        result["variants"]["C-DEQ+ (the run's)"] = tie_rule.held_out(
            run, lambda x, k: plus.predict(x, nfe=k), scored)
        if plus.reentry_time is not None:  # trained with a chain (plus.chain_k > 1)
            result["variants"]["C-DEQ+ (the run's), its chain's plan"] = tie_rule.held_out(
                run, chain_plan(plus), scored)
    extra, _, _ = run._extra_methods(teacher, None)
    for key, label in (("unrolled_any_k", "anytime unrolled network"), ("learned_init", "learned init")):
        if key in extra:
            result["variants"][label] = tie_rule.held_out(run, extra[key], scored)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="+", required=True, help="finished run directories (seeds)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   metavar="NAME", help="variants to build (default: all)")
    p.add_argument("--held-out", action="store_true",
                   help="search plans on half of the selection batches, score on the other half")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not args.held_out:
        if len(args.run) != 1:
            p.error("give one --run without --held-out (the seeds' spread needs --held-out)")
        result = on_validation(args.run[0], args.variants)
        print(f"{result['task']}: validation metric / loss")
        print("variant | " + " | ".join(f"NFE {k}" for k in BUDGETS))
        for name, per in result["variants"].items():
            cells = [f"{per[str(k)]['metric']:.4f} / {per[str(k)]['loss']:.4f}" if str(k) in per
                     else "-" for k in BUDGETS]
            print(f"{name} | " + " | ".join(cells))
    else:
        runs = [on_held_out_half(path, args.variants) for path in args.run]
        result = {"split": runs[0]["split"], "task": runs[0]["task"], "runs": runs}
        lines = [f"{result['task']}: held-out validation half ({runs[0]['held_out_items']} items; "
                 f"plans searched on the other {runs[0]['search_items']}), mean ± std over "
                 f"{len(runs)} runs",
                 "", "metric:", *spread(runs, "metric"), "", "loss:", *spread(runs, "loss"), "",
                 "relative error to z*:", *spread(runs, "relative_error")]
        result["table"] = lines
        print("\n".join(lines))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def spread(runs: list[dict[str, Any]], key: str) -> list[str]:
    """Markdown rows: each variant's mean ± std of ``key`` over the runs, per budget."""
    rows = ["| variant | " + " | ".join(f"NFE {k}" for k in HELD_OUT_BUDGETS) + " |",
            "|---|" + "---|" * len(HELD_OUT_BUDGETS)]
    for name in runs[0]["variants"]:
        cells = [tie_rule.mean_sd([r["variants"][name][str(k)][key] for r in runs
                                   if str(k) in r["variants"][name]]) for k in HELD_OUT_BUDGETS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
