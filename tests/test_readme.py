"""The Python code blocks of the README and of the tutorials run as written (one namespace per page,
in order, in a scratch folder)."""

from __future__ import annotations

import importlib.util
import logging
import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_library_examples():
    text = "\n".join(python_blocks())
    for needed in ("save_pretrained", "from_pretrained", "nfe=3", "select_plans"):
        assert needed in text


def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_example")  # importable by name: from_pretrained resolves Cell
    monkeypatch.setitem(sys.modules, "readme_example", module)
    blocks = python_blocks()
    assert blocks
    for i, block in enumerate(blocks):
        if "torchdeq" in block and importlib.util.find_spec("torchdeq") is None:
            continue  # the TorchDEQ recipe needs the bench extra
        code = compile(block, f"README.md python block {i + 1}", "exec")
        exec(code, module.__dict__)  # noqa: S102 - the README's own examples
    ns = module.__dict__
    printed = capsys.readouterr()  # the library prints nothing unasked (it logs)
    assert (printed.out, printed.err) == ("", "") or "print(" in "".join(blocks)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert (tmp_path / "my-cdeq" / "config.json").exists()
    assert (tmp_path / "my-cdeq" / "model.safetensors").exists()
    assert ns["loaded"].student.plans == ns["pipe"].student.plans
    assert max(ns["pipe"].student.plans) == 3
    assert ns["logits"].shape == (64, 4)


TUTORIALS = README.parent / "docs" / "tutorials"


def _run_blocks(path: Path, tmp_path, monkeypatch) -> dict:
    """Run the python blocks of ``path`` in order, in one namespace, in a scratch folder."""
    monkeypatch.chdir(tmp_path)
    name = f"docs_{path.stem.replace('-', '_')}"
    module = types.ModuleType(name)  # importable by name: from_pretrained resolves the classes
    monkeypatch.setitem(sys.modules, name, module)
    for i, block in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)):
        exec(compile(block, f"{path.name} python block {i + 1}", "exec"), module.__dict__)  # noqa: S102
    return module.__dict__


def test_tutorial_distil_your_deq_runs(tmp_path, monkeypatch, capsys, caplog):
    ns = _run_blocks(TUTORIALS / "distil-your-deq.md", tmp_path, monkeypatch)
    printed = capsys.readouterr()
    assert (printed.out, printed.err) == ("", "")  # the library prints nothing unasked (it logs)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert (tmp_path / "my-cdeq" / "config.json").exists()
    assert sorted(ns["student_accuracy"]) == sorted(ns["truncated"]) == [1, 2, 3]
    assert ns["teacher_nfe"] > 3  # the converged teacher needs more calls than the budgets shown
    assert ns["loaded"].student.plans == ns["pipe"].student.plans


def test_tutorial_torchdeq_runs(tmp_path, monkeypatch):
    pytest.importorskip("torchdeq")  # the bench extra
    ns = _run_blocks(TUTORIALS / "torchdeq.md", tmp_path, monkeypatch)
    assert ns["teacher"].cell is ns["net"].cell  # the weights are shared, not copied
    assert max(ns["pipe"].student.plans) == 2


def test_tutorial_structured_state_runs(tmp_path, monkeypatch):
    ns = _run_blocks(TUTORIALS / "structured-state.md", tmp_path, monkeypatch)
    z_star = ns["trajectories"][0].z_star
    assert isinstance(z_star, tuple) and [p.shape[1:] for p in z_star] == [(32,), (8,)]
    assert ns["logits"].shape == (80, 4)
    assert ns["loaded"].student.plans == ns["pipe"].student.plans
