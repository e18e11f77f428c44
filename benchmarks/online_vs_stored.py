"""Online against stored trajectories: C-DEQ and C-DEQ+ test metrics at 1-4 calls, from the reports
of runs that share each seed's teacher.

Each seed ``S`` has two run directories: ``STORED/seed_S`` (a run with stored trajectories) and
``ONLINE/seed_S`` (``record.mode=online``, started with the stored run's ``teacher.safetensors``);
this reads their ``report.json`` files, prints the mean and standard deviation over seeds of each
method and budget in both modes, each seed's difference, and whether the online mean lies within
one standard deviation (of the stored runs) of the stored mean; it writes the table and the
numbers as JSON.

    python benchmarks/online_vs_stored.py --stored docs/results/mnist \\
        --online docs/results/mnist_online --out benchmarks/results/online_vs_stored_mnist.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

METHODS = ("cdeq", "cdeq_plus")
BUDGETS = ("1", "2", "3", "4")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stored", type=Path, required=True, help="folder of stored runs seed_S")
    parser.add_argument("--online", type=Path, required=True, help="folder of online runs seed_S")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    roots = {"stored": args.stored, "online": args.online}
    seeds = sorted(int(p.name.split("_")[1]) for p in args.stored.glob("seed_*")
                   if (args.online / p.name / "report.json").exists())
    reports = {mode: {s: json.loads((root / f"seed_{s}" / "report.json").read_text()) for s in seeds}
               for mode, root in roots.items()}
    rows, lines = [], [f"| method | calls | stored ({len(seeds)} seeds) | online | online - stored, "
                       "per seed | within one std |", "|---|---:|---|---|---|---|"]
    for method in METHODS:
        for k in BUDGETS:
            values = {mode: [reports[mode][s]["methods"][method][k] for s in seeds
                             if k in reports[mode][s]["methods"].get(method, {})]
                      for mode in ("stored", "online")}
            if not values["stored"] or len(values["stored"]) != len(values["online"]):
                continue
            mean = {m: statistics.mean(v) for m, v in values.items()}
            sd = {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in values.items()}
            diffs = [o - s for o, s in zip(values["online"], values["stored"], strict=True)]
            within = abs(mean["online"] - mean["stored"]) <= sd["stored"] if len(seeds) > 1 else None
            rows.append({"method": method, "calls": int(k), "stored": values["stored"],
                         "online": values["online"], "mean": mean, "std": sd, "differences": diffs,
                         "within_one_std": within})
            lines.append(f"| {method} | {k} | {100 * mean['stored']:.2f} ± {100 * sd['stored']:.2f} "
                         f"| {100 * mean['online']:.2f} ± {100 * sd['online']:.2f} "
                         f"| {', '.join(f'{100 * d:+.2f}' for d in diffs)} "
                         f"| {'one seed: no std' if within is None else 'yes' if within else 'no'} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": seeds, **{m: str(r) for m, r in roots.items()},
                                    "rows": rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()
