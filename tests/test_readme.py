"""The README's Python code blocks run as written (one namespace, in order, in a scratch folder)."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_library_examples():
    text = "\n".join(python_blocks())
    for needed in ("save_pretrained", "from_pretrained", "nfe=3", "select_plans", "get_deq"):
        assert needed in text


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType("readme_example")  # importable by name: from_pretrained resolves Cell
    monkeypatch.setitem(sys.modules, "readme_example", module)
    blocks = python_blocks()
    assert len(blocks) >= 3
    for i, block in enumerate(blocks):
        if "torchdeq" in block and importlib.util.find_spec("torchdeq") is None:
            continue  # the TorchDEQ recipe needs the bench extra
        code = compile(block, f"README.md python block {i + 1}", "exec")
        exec(code, module.__dict__)  # noqa: S102 - the README's own examples
    ns = module.__dict__
    assert (tmp_path / "my-cdeq" / "config.json").exists()
    assert (tmp_path / "my-cdeq" / "model.safetensors").exists()
    assert ns["loaded"].student.plans == ns["pipe"].student.plans
    assert max(ns["pipe"].student.plans) == 3
    assert ns["logits"].shape == (64, 4)
    if "net" in ns:  # the TorchDEQ recipe shares the weights instead of copying them
        assert ns["teacher"].cell is ns["net"].cell
