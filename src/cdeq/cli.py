"""The ``cdeq`` command line.

::

    cdeq demo                                  # = cdeq run digits: the whole job, a few minutes
    cdeq run TASK [--config FILE] [--out DIR] [--quick] [--data PATH] [--name NAME] [--set K=V ...]
             [--seeds N] [--device cpu|cuda|auto]
    cdeq train|record|distill|plus|tune|plans|baselines|evaluate --out DIR [--device D]   # one stage on the
                                               # artifacts of the earlier ones
    cdeq generate --model DIR --prompt TEXT --tokens N [--nfe K] [--device D]
    cdeq tasks                                 # the built-in tasks
    cdeq summarize RUN... [--out FILE]         # the tables of docs/results.md from report files
    cdeq export --model DIR --out FILE [--pretrained DIR2]   # one-step student for deployment
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .engine.config import ConfigError, merged
from .engine.io import BusyError


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict:
    """``["teacher.epochs=3", "task_config.channels=16"]`` -> nested dict (a later pair wins)."""
    out: dict = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise ConfigError(f"--set {pair!r} is not valid; write KEY=VALUE with a dotted KEY, "
                              "e.g. teacher.epochs=3")
        node = out
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {pair!r} is not valid: an earlier --set gave {where} the "
                                  f"value {node!r}, so it has no key {parts[i + 1]!r}")
        node[parts[-1]] = _parse_value(value)
    return out


def _load_config_file(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--config {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--config {p} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {p} must hold a JSON object of configuration sections")
    return data


def _user_config(args: argparse.Namespace) -> dict:
    """The user's configuration: ``--config`` file, then ``--data``/``--name``, then ``--set``."""
    user = _load_config_file(getattr(args, "config", None))
    task_cfg: dict = {}
    if getattr(args, "data", None):
        task_cfg["data"] = args.data
    if getattr(args, "name", None):
        task_cfg["name"] = args.name
    if task_cfg:
        user = merged(user, {"task_config": task_cfg})
    user = merged(user, _overrides(getattr(args, "set", None) or []))
    if getattr(args, "device", None):
        user["device"] = args.device
    if not isinstance(user.get("task_config", {}), dict):
        raise ConfigError(f"task_config={user['task_config']!r} is not valid; expected a mapping "
                          "(a JSON object) of the task's settings")
    return user


def _resolve_task(task: str, args: argparse.Namespace, user: dict) -> str:
    """Complete ``user`` with what the task infers from ``--data`` (``Task.resolve_user_config``)."""
    from .tasks import TASKS

    if task in TASKS:
        resolved = TASKS[task].resolve_user_config(user, getattr(args, "data", None))
        user.clear()
        user.update(resolved)
    return task


def cmd_run(args: argparse.Namespace) -> int:
    from .run.stages import Run, build_config
    from .tasks import TASKS

    user = _user_config(args)
    task = _resolve_task(args.task, args, user)
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    out = Path(args.out or f"runs/{task}{'-quick' if args.quick else ''}")
    for sub, cfg_user in TASKS[task].variants(user):  # e.g. a graph's two settings
        if getattr(args, "seeds", 0):  # whole pipelines per seed into DIR/seed_<i>/, then DIR/report.json
            from .run.seeds import run_seeds

            run_seeds(task, cfg_user, args.seeds, out if sub is None else out / sub, args.quick)
            continue
        config = build_config(task, cfg_user, quick=args.quick)
        with Run(out if sub is None else out / sub, config) as run:
            run.log(f"run {task}{'' if sub is None else ' (' + sub + ')'} in {run.dir}")
            run.run_all()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.task = "digits"
    args.config = None
    args.data = None
    args.name = None
    args.out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    rc = cmd_run(args)
    print("\nHow to read the table: each column is a budget of layer calls (NFE). The Picard, "
          "Anderson and Broyden rows are the teacher DEQ cut to that many calls; the C-DEQ row is "
          "the distilled student with at most that many calls. The converged teacher line is the "
          "accuracy the student is distilled from. Files: report.json, table.md, plot.png in "
          f"{args.out}.")
    return rc


def cmd_stage(args: argparse.Namespace) -> int:
    from .run.stages import Run, build_config

    out = Path(args.out)
    config = None
    if args.stage == "train" and not (out / "config.json").exists():
        if not args.task:
            raise ConfigError("`cdeq train` on a new --out directory needs a TASK")
        user = _user_config(args)
        config = build_config(_resolve_task(args.task, args, user), user, quick=args.quick)
    with Run(out, config, device=args.device) as run:
        getattr(run, args.stage)()
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .run.stages import Run

    run = Run(args.model, device=args.device)
    _ = run.threads  # generation computes: the run's thread policy, as in a stage
    gen = getattr(run.task, "generate_text", None)
    if gen is None:
        raise ConfigError(f"the run in {args.model} is a {run.config.task!r} task; `cdeq generate` "
                          "needs a text task (shakespeare, text)")
    teacher = run.teacher()
    student = run.student(teacher)
    for label, model in (("C-DEQ", student), ("teacher", teacher)):
        text, tps = gen(model, args.prompt, args.tokens, nfe=args.nfe, seed=args.seed,
                        temperature=args.temperature)
        print(f"--- {label} ({tps:.1f} tokens/s) ---\n{text}\n")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .run.export import export_run, save_run_pretrained

    path, method = export_run(args.model, args.out)
    print(f"wrote {path} ({method}; x -> logits with 1 NFE)")
    if args.pretrained:
        print(f"wrote {save_run_pretrained(args.model, args.pretrained)} (cdeq.Pipeline.from_pretrained)")
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    from .run.summary import write_summary

    text = write_summary(args.runs, args.out)
    print(f"wrote {args.out}" if args.out else text, end="\n" if args.out else "")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from .tasks import TASKS

    for name, cls in sorted(TASKS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{name:12s} {cls.metric:14s} {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdeq", description="Consistency deep equilibrium models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="JSON file of configuration sections")
        p.add_argument("--out", help="run directory")
        p.add_argument("--quick", action="store_true", help="smoke-size run")
        p.add_argument("--data", help="a user's data (file or folder)")
        p.add_argument("--name", help="dataset name inside --data (Planetoid layout)")
        p.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE",
                       help="override configuration values, e.g. teacher.epochs=3")
        device(p)

    def device(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto (CUDA when available)")

    p = sub.add_parser("run", help="train, record, distil and evaluate")
    p.add_argument("task")
    common(p)
    p.add_argument("--seeds", type=int, default=0, help="run N whole pipelines (seeds 0..N-1) "
                   "into DIR/seed_<i>/ and write their aggregate (mean, std) to DIR")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("demo", help="the digits run (a few minutes on 2 cores)")
    p.add_argument("--out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--set", nargs="*", action="extend", metavar="KEY=VALUE")
    device(p)
    p.set_defaults(fn=cmd_demo)

    for stage in ("train", "record", "distill", "plus", "tune", "plans", "baselines", "evaluate"):
        p = sub.add_parser(stage, help=f"run the {stage} stage in an existing run directory")
        if stage == "train":
            p.add_argument("task", nargs="?")
            common(p)
        else:
            p.add_argument("--out", required=True, help="run directory")
            device(p)
        p.set_defaults(fn=cmd_stage, stage=stage)

    p = sub.add_parser("generate", help="sample text with the C-DEQ and the teacher")
    p.add_argument("--model", required=True, help="run directory of a text task")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--nfe", type=int, default=1)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    device(p)
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("export", help="export the one-step student of a run (torch.export)")
    p.add_argument("--model", required=True, help="run directory with student.safetensors")
    p.add_argument("--out", required=True, help="output file (.pt2)")
    p.add_argument("--pretrained", help="also write a save_pretrained directory here")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("summarize", help="markdown tables of docs/results.md from report files")
    p.add_argument("runs", nargs="+", help="run directories (or folders of them)")
    p.add_argument("--out", help="markdown file whose generated section is replaced")
    p.set_defaults(fn=cmd_summarize)

    p = sub.add_parser("tasks", help="list the built-in tasks")
    p.set_defaults(fn=cmd_tasks)
    return parser


class _Console(logging.Handler):
    """cdeq's log lines as plain text: INFO on the current ``sys.stdout``, warnings and errors on
    ``sys.stderr`` (looked up at each line, so a redirected stream is followed)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must not break the command
            self.handleError(record)


@contextlib.contextmanager
def console_logging(level: int = logging.INFO) -> Iterator[None]:
    """Show the library's log lines (each stage's progress, warnings) on the terminal while the
    command runs; the run directory's ``log.txt`` is written by the run itself. The handler is
    removed afterwards, so a program that calls :func:`main` keeps its own logging. Under
    torchrun the ranks other than 0 show warnings only (rank 0 speaks for the run)."""
    if os.environ.get("RANK", "0") != "0":
        level = max(level, logging.WARNING)
    root = logging.getLogger("cdeq")
    handler, before = _Console(), root.level
    root.addHandler(handler)
    if before == logging.NOTSET or before > level:
        root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(before)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with console_logging():
            if args.command in ("run", "demo", "train", "record", "distill", "plus", "tune",
                                "baselines", "evaluate"):
                from .engine import distributed

                distributed.init()  # under torchrun: join the process group (a no-op otherwise)
            return args.fn(args)
    except (ConfigError, BusyError, OSError, ValueError) as err:  # the user's to fix: no traceback
        print(f"cdeq: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
