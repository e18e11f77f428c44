"""The documentation site builds with ``mkdocs build --strict``: every page in the navigation, every
link and anchor resolving, every docstring of the API reference parsing, the generated pages (the
command line, the run configuration, the top-level API) rendered from this tree's code."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or
                    importlib.util.find_spec("mkdocstrings_handlers") is None,
                    reason="the docs extra is not installed (pip install -e '.[docs]')")
def test_the_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    warnings = [line for line in done.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert done.returncode == 0, "\n".join(warnings) or done.stderr[-3000:]
    site = tmp_path / "site"
    cli = (site / "reference" / "cli.html").read_text()
    assert "cdeq run" in cli and "--seeds" in cli  # generated from the parser
    config = (site / "reference" / "configuration.html").read_text()
    assert "teacher.eval_solver" in config  # generated from RunConfig
    assert "cdeq.DEQModel" in (site / "reference" / "api" / "cdeq.html").read_text()


def test_every_page_is_in_the_navigation_or_a_report():
    """A page left out of mkdocs.yml's nav would build but be hard to find."""
    nav = (ROOT / "mkdocs.yml").read_text()
    docs = ROOT / "docs"
    pages = [p.relative_to(docs).as_posix() for p in docs.rglob("*.md")]
    missing = [p for p in pages if not p.startswith("results/") and p not in nav]
    assert missing == []


def _documented_modules() -> list[str]:
    """The modules the API reference renders (``::: name`` lines of docs/reference/api/*.md)."""
    names = []
    for page in sorted((ROOT / "docs" / "reference" / "api").glob("*.md")):
        names += re.findall(r"^::: ([\w.]+)$", page.read_text(), flags=re.M)
    return names


def test_every_public_class_and_function_of_the_reference_has_a_docstring():
    """The reference shows documented names only: a public name without a docstring would vanish."""
    missing = []
    for name in _documented_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:  # a function rendered on its own (cdeq.consistency.distill.distill)
            module_name, _, attr = name.rpartition(".")
            objects = {attr: getattr(importlib.import_module(module_name), attr)}
        else:
            public = getattr(module, "__all__", None) or [
                n for n, o in vars(module).items() if not n.startswith("_")
                and getattr(o, "__module__", None) == module.__name__]
            objects = {n: getattr(module, n) for n in public}
        for attr, obj in objects.items():
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            doc = obj.__doc__ or ""
            generated = inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")  # a dataclass's
            first = doc.strip().splitlines()[0] if doc.strip() else ""
            section = first.rstrip(":") in ("Args", "Attributes", "Returns", "Raises", "Examples")
            if not first or generated or section:  # the summary line is what the tables show
                missing.append(f"{name}.{attr}")
    assert missing == [], f"public names without a docstring (or its summary line): {missing}"
