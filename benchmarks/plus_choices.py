"""C-DEQ+ training choices, judged on validation data only.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/plus_choices.py --run RUN_DIR \
        --out benchmarks/results/plus_choices_digits.json

From a finished run (its teacher, C-DEQ student and recorded trajectories), builds C-DEQ+ once per
variant (:func:`cdeq.plus.train_plus` with the run's settings changed as the variant says), selects
its plans as the pipeline does, and prints each variant's **validation** metric and loss at 1, 2,
3, 4 and 8 NFE (and the anytime unrolled network's, when the run has one). The test split is never
read. Variants: the task weight, the chain supervision (``distill.chain_k``) and its data
(``distill.chain_data``), the joint epochs
(``plus.epochs``) and the pull to ``z*`` (the consistency weights, against the task loss);
``--variants`` runs some of them, by name.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

import torch

from cdeq.consistency.trajectory import TrajectoryStore
from cdeq.pipeline import Run
from cdeq.plus import chain_batches, train_plus

VARIANTS = {
    "chain 0, task weight 0.1, a third of the epochs": ({"chain_k": 0}, 1 / 3),
    "chain 0, task weight 1, a third of the epochs": ({"chain_k": 0, "task_weight": 1.0}, 1 / 3),
    "chain 4, a third of the epochs": ({"chain_k": 4}, 1 / 3),
    "chain 0, all the epochs": ({"chain_k": 0}, 1.0),
    "chain 4, all the epochs (default)": ({"chain_k": 4}, 1.0),
    "chain 4 on the recorded samples only": ({"chain_k": 4, "chain_data": "recorded"}, 1.0),
    "a third of the pull to z*, task weight 1": (
        {"global_weight": 0.3, "local_weight": 0.033, "task_weight": 1.0}, 1.0),
    "no pull to z*, task weight 1": (
        {"global_weight": 0.0, "local_weight": 0.0, "init_weight": 0.0, "task_weight": 1.0}, 1.0),
}
BUDGETS = (1, 2, 3, 4, 8)


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a finished run directory")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   metavar="NAME", help="variants to build (default: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run = Run(args.run)
    teacher = run.teacher()
    student = run.student(teacher)
    trajectories = list(TrajectoryStore(run.dir / "trajectories"))
    cfg = run.config
    result: dict = {"run": str(args.run), "task": cfg.task, "split": "valid", "variants": {}}
    for name in args.variants:
        changes, share = VARIANTS[name]
        torch.manual_seed(cfg.seed)
        dcfg = dataclasses.replace(cfg.distill, **changes)
        pcfg = dataclasses.replace(cfg.plus, epochs=max(1, round(cfg.distill.epochs * share)))
        chain = chain_batches(dcfg, run.task, cfg.record)
        plus, _ = train_plus(student, trajectories, pcfg, dcfg, cfg.baselines, run.task.loss,
                             seed=cfg.seed, log=lambda m: None, task_batches=chain)
        run._search_plans(plus, teacher)
        result["variants"][name] = validation(run, lambda x, k, plus=plus: plus.predict(x, nfe=k))
    extra, _, _ = run._extra_methods(teacher, None)
    if "unrolled_any_k" in extra:
        result["variants"]["anytime unrolled network"] = validation(run, extra["unrolled_any_k"])
    print(f"{cfg.task}: validation metric / loss")
    print("variant | " + " | ".join(f"NFE {k}" for k in BUDGETS))
    for name, per in result["variants"].items():
        cells = [f"{per[str(k)]['metric']:.4f} / {per[str(k)]['loss']:.4f}" if str(k) in per else "-"
                 for k in BUDGETS]
        print(f"{name} | " + " | ".join(cells))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
