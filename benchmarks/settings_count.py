"""How many settings a person must hold: configuration classes, their fields, and a run's keys.

Counts, for the working tree's ``src`` and for the ``src`` of an earlier commit (``--before``):

- **configuration classes**: every subclass of :class:`cdeq.engine.config.Config` defined in a
  module of the package, and their fields (all of them, nested sections included);
- **run keys**: the leaf keys of a ``cdeq run`` configuration (:class:`cdeq.run.config.RunConfig`
  with its defaults; a nested section counts its own leaves, a free mapping such as
  ``task_config`` or a solver's ``options`` counts as one key), and the digits task's own keys
  (``task_config``) beside them;
- **plan-search keys**: the fields of ``PlanSearchConfig``.

Each tree is counted by a fresh interpreter whose ``PYTHONPATH`` is that tree's ``src``.

Usage::

    python benchmarks/settings_count.py --before 3cee64f    # writes benchmarks/results/settings_count.json
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import tarfile
import tempfile
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _leaves(cls: type, prefix: str = "") -> list[str]:
    """The dotted leaf keys of a configuration class's defaults (nested sections recursed)."""
    from cdeq.engine.config import Config

    hints = typing.get_type_hints(cls)
    out = []
    for field in dataclasses.fields(cls):
        hint = hints.get(field.name)
        if isinstance(hint, type) and issubclass(hint, Config):
            out += _leaves(hint, f"{prefix}{field.name}.")
        else:
            out.append(prefix + field.name)
    return out


def _count() -> dict:
    """The counts for the ``cdeq`` this interpreter imports."""
    import cdeq
    from cdeq.engine.config import Config

    classes = {}
    for info in pkgutil.walk_packages(cdeq.__path__, "cdeq."):
        try:
            module = importlib.import_module(info.name)
        except Exception as err:  # noqa: BLE001 - an optional dependency: say so, count the rest
            print(f"skipped {info.name}: {err}", file=sys.stderr)
            continue
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Config) and obj is not Config
                    and obj.__module__ == module.__name__):
                classes[f"{obj.__module__}.{obj.__qualname__}"] = len(dataclasses.fields(obj))
    from cdeq.consistency.search import PlanSearchConfig
    from cdeq.run.config import RunConfig
    from cdeq.tasks import TASKS

    run_keys = _leaves(RunConfig)
    digits = _leaves(TASKS["digits"].Config)
    return {"config_classes": len(classes), "config_fields": sum(classes.values()),
            "run_leaf_keys": len(run_keys), "digits_task_keys": len(digits),
            "plan_search_keys": len(dataclasses.fields(PlanSearchConfig)),
            "classes": dict(sorted(classes.items())), "run_keys": run_keys}


def _count_tree(src: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--worker"], env=env, check=True,
                         capture_output=True, text=True, cwd=src.parent)
    return json.loads(out.stdout)


def _src_at(rev: str, into: Path) -> Path:
    """The ``src`` folder of commit ``rev``, unpacked under ``into``."""
    archive = into / "src.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), rev, "src"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="an earlier commit to count too")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "settings_count.json"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(_count()))
        return
    result = {"command": "python benchmarks/settings_count.py"
                         + (f" --before {args.before}" if args.before else "")}
    if args.before:
        with tempfile.TemporaryDirectory() as tmp:
            result["before"] = {"commit": args.before, **_count_tree(_src_at(args.before, Path(tmp)))}
    result["after"] = {"commit": "working tree", **_count_tree(ROOT / "src")}
    keys = ("config_classes", "config_fields", "run_leaf_keys", "digits_task_keys", "plan_search_keys")
    print("count | " + " | ".join(k for k in ("before", "after") if k in result))
    for key in keys:
        print(f"{key} | " + " | ".join(str(result[k][key]) for k in ("before", "after") if k in result))
    if "before" in result:
        gone = sorted(set(result["before"]["run_keys"]) - set(result["after"]["run_keys"]))
        new = sorted(set(result["after"]["run_keys"]) - set(result["before"]["run_keys"]))
        result["run_keys_removed"], result["run_keys_added"] = gone, new
        print(f"run keys removed: {gone}\nrun keys added: {new}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
