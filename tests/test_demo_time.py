"""docs/performance.md's demo-time table is the one rendered from the raw outputs it cites."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "results" / "demo_time" / "table.py"


def _table_module():
    spec = importlib.util.spec_from_file_location("demo_time_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_performance_doc_shows_the_table_rendered_from_the_raw_outputs():
    table = _table_module()
    doc = (ROOT / "docs" / "performance.md").read_text()
    assert table.BEGIN in doc and table.END in doc
    assert table.replaced(doc, table.render()) == doc, \
        "docs/performance.md is stale: run `python benchmarks/results/demo_time/table.py --write`"


def test_the_table_reads_wall_cpu_and_threads_from_an_output(tmp_path):
    table = _table_module()
    raw = (table.HERE / "idle1.txt").read_text()
    wall = "Elapsed (wall clock) time (h:mm:ss or m:ss): "
    raw = re.sub(re.escape(wall) + r"[0-9:.]+", wall + "0:50.00", raw)
    raw = re.sub(r"User time \(seconds\): [0-9.]+", "User time (seconds): 80.00", raw)
    raw = re.sub(r"System time \(seconds\): [0-9.]+", "System time (seconds): 2.00", raw)
    raw = re.sub(r"Percent of CPU this job got: [0-9]+%", "Percent of CPU this job got: 164%", raw)
    for key in table.RUNS:
        (tmp_path / f"{key}.txt").write_text(raw.replace(wall + "0:50.00", wall + "1:02.50")
                                             if key == "busy1" else raw)
    rendered = table.render(tmp_path)
    assert "| beside 1 busy process | 62.5 s (1.25-1.25x idle) | 82.0 s | 164% | 2 |" in rendered
