"""MkDocs hooks: pages generated from the code, so the reference cannot drift from it.

- ``<!-- cdeq:cli -->`` becomes the help of the ``cdeq`` command and of each subcommand
  (``cdeq.cli.build_parser``).
- ``<!-- cdeq:config -->`` becomes a table of every key of a run configuration
  (``cdeq.run.config.RunConfig``), with its type, default and the description from its class's
  ``Attributes:`` docstring section; ``<!-- cdeq:task-config -->`` the same for each built-in task's
  ``task_config``.
- Sphinx roles left in docstrings (``:class:`X```) are shown as plain code in the API reference.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re

CLI_MARK = "<!-- cdeq:cli -->"
CONFIG_MARK = "<!-- cdeq:config -->"
TASK_CONFIG_MARK = "<!-- cdeq:task-config -->"
TOP_LEVEL_MARK = "<!-- cdeq:top-level -->"
ROLE = re.compile(r":(?:class|func|meth|attr|mod|exc|data|obj|const):(<code>)~?")


# ----------------------------------------------------------------------------- command line
def cli_markdown() -> str:
    os.environ["COLUMNS"] = "88"  # argparse wraps its help to the terminal width
    from cdeq.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and hasattr(a, "_name_parser_map"))
    parts = ["## `cdeq`", "", "```text", parser.format_help().rstrip(), "```", ""]
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        parts += [f"## `cdeq {name}`", "", helps.get(name) or "", "", "```text",
                  p.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- top-level API
def top_level_markdown() -> str:
    """A table of ``cdeq.__all__``: each name, linked to where its package documents it."""
    import importlib
    import importlib.util

    import cdeq

    rows = ["| name | what it is |", "|---|---|"]
    for name in cdeq.__all__:
        obj = getattr(cdeq, name)
        module = getattr(obj, "__module__", "cdeq") or "cdeq"
        parts = module.split(".")
        target = f"{module}.{name}"
        for depth in range(2, len(parts) + 1):  # the package first: it documents its __all__
            candidate = importlib.import_module(".".join(parts[:depth]))
            shadowed = importlib.util.find_spec(f"{candidate.__name__}.{name}") is not None \
                if hasattr(candidate, "__path__") else False  # a function named like its module
            if name in getattr(candidate, "__all__", ()) and not shadowed:
                target = f"{candidate.__name__}.{name}"
                break
        doc = (inspect.getdoc(obj) or "").strip().split("\n\n")[0].replace("\n", " ")
        doc = re.sub(r":(?:class|func|meth|attr|mod|exc|data|obj):`~?([^`]+)`", r"`\1`", doc)
        rows.append(f"| [`cdeq.{name}`][{target}] | {_cell(doc)} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- configuration
def _attribute_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` sections of ``cls`` and its bases.

    An entry may name several fields (``lr, weight_decay: ...`` or ``a / b: ...``)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = inspect.getdoc(klass) if "__doc__" in vars(klass) else None
        if not doc or "Attributes:" not in doc:
            continue
        lines = doc.split("Attributes:", 1)[1].splitlines()
        entries: list[list[str]] = []
        base = None
        for line in lines[1:]:
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            if base is None:
                base = indent
            if indent < base:
                break
            if indent == base and re.match(r"^\s*[\w ,/]+:", line):
                entries.append([line.strip()])
            elif entries:
                entries[-1].append(line.strip())
        for entry in entries:
            names, _, text = " ".join(entry).partition(":")
            for name in re.split(r"[,/]", names):
                if name.strip():
                    out[name.strip()] = text.strip()
    return out


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _json(value) -> str:
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def config_rows(cls: type, value, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """``(key, type, default, description)`` for every leaf key of the dataclass ``cls``."""
    docs = _attribute_docs(cls)
    rows = []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        current = getattr(value, field.name) if value is not None else _default(field)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            rows.append((key, type(current).__name__, "(section)", docs.get(field.name, "")))
            rows += config_rows(type(current), current, key + ".")
            continue
        rows.append((key, str(field.type), _json(current), docs.get(field.name, "")))
    return rows


def table(rows) -> str:
    out = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, text in rows:
        out.append(f"| `{key}` | `{_cell(typ)}` | `{_cell(default)}` | {_cell(text)} |")
    return "\n".join(out)


def config_markdown() -> str:
    from cdeq.run.config import RunConfig

    return table(config_rows(RunConfig, RunConfig()))


def task_config_markdown() -> str:
    from cdeq.tasks import TASKS

    by_class: dict[type, list[str]] = {}
    for name, task in sorted(TASKS.items()):
        by_class.setdefault(task.Config, []).append(name)
    parts = []
    for cfg, names in by_class.items():
        tasks = ", ".join(f"`{n}`" for n in names)
        parts += [f"### {tasks}: `{cfg.__name__}`", "", table(config_rows(cfg, None)), ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- mkdocs events
def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARK in markdown:
        markdown = markdown.replace(CLI_MARK, cli_markdown())
    if TOP_LEVEL_MARK in markdown:
        markdown = markdown.replace(TOP_LEVEL_MARK, top_level_markdown())
    if CONFIG_MARK in markdown:
        markdown = markdown.replace(CONFIG_MARK, config_markdown())
    if TASK_CONFIG_MARK in markdown:
        markdown = markdown.replace(TASK_CONFIG_MARK, task_config_markdown())
    return markdown


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(r"\1", html)
