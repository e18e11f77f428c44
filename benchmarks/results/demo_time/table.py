"""The demo-time table of docs/performance.md, rendered from the raw outputs beside this file.

Each ``{idle1,idle2,busy1,busy3}.txt`` is what ``measure.sh`` wrote: the demo's log (its first line
the thread policy's choice, then the accuracy table) followed by ``/usr/bin/time -v``.

    python benchmarks/results/demo_time/table.py            # print the table
    python benchmarks/results/demo_time/table.py --write    # replace it in docs/performance.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parents[2] / "docs" / "performance.md"
BEGIN = "<!-- demo_time/table.py: begin (generated from benchmarks/results/demo_time/*.txt) -->"
END = "<!-- demo_time/table.py: end -->"
RUNS = {"idle1": "idle (run 1)", "idle2": "idle (run 2)", "busy1": "beside 1 busy process",
        "busy3": "beside 3 busy processes"}
TRUNCATED = ("Picard", "Anderson", "Broyden")


def _field(text: str, pattern: str) -> str:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        raise ValueError(f"no line matching {pattern!r} in a demo_time output")
    return match.group(1)


def parse(path: Path) -> dict:
    """Wall and CPU seconds, CPU share, threads, and the accuracy rows (NFE 1, 2) of one output."""
    text = path.read_text()
    minutes, seconds = _field(text, r"Elapsed \(wall clock\) time.*: (\S+)$").rsplit(":", 1)
    rows = {}  # NFE 1 and 2 of the first row of each name: the accuracy table
    for name in ("C-DEQ", *TRUNCATED):
        cells = _field(text, rf"^\| {name} \| (.*) \|$").replace("*", "").split(" | ")
        rows[name] = [float(v) for v in cells[:2]]
    return {"wall": 60 * float(minutes) + float(seconds),
            "cpu": float(_field(text, r"User time \(seconds\): (\S+)")) + float(
                _field(text, r"System time \(seconds\): (\S+)")),
            "share": _field(text, r"Percent of CPU this job got: (\S+)"),
            "threads": _field(text, r"^threads: (\d+)"),
            "teacher": float(_field(text, r"^Converged teacher: (\S+) at")), "rows": rows}


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}" if min(values) == max(values) else f"{min(values):.2f}-{max(values):.2f}"


def render(folder: Path = HERE) -> str:
    """The markdown table and the demo criteria, as docs/performance.md shows them."""
    runs = {key: parse(folder / f"{key}.txt") for key in RUNS}
    idle = [runs["idle1"]["wall"], runs["idle2"]["wall"]]
    lines = ["| machine | wall | user + sys CPU | CPU share | threads chosen |", "|---|---|---|---|---|"]
    for key, label in RUNS.items():
        r = runs[key]
        ratio = "" if key.startswith("idle") else \
            f" ({r['wall'] / max(idle):.2f}-{r['wall'] / min(idle):.2f}x idle)"
        lines.append(f"| {label} | {r['wall']:.1f} s{ratio} | {r['cpu']:.1f} s | {r['share']} | "
                     f"{r['threads']} |")
    cdeq = [[r["rows"]["C-DEQ"][k] for r in runs.values()] for k in (0, 1)]
    trunc = [[r["rows"][n][k] for r in runs.values() for n in TRUNCATED] for k in (0, 1)]
    met = min(cdeq[0]) >= 95 and min(cdeq[1]) >= 98 and all(min(cdeq[k]) > max(trunc[k]) for k in (0, 1))
    lines += ["", "In every run C-DEQ met the demo's criteria:" if met else "Not every run met the demo's "
              "criteria (at least 95% at 1 NFE, 98% at 2, above the truncated solvers):",
              f"- 1 NFE at {_span(cdeq[0])}%, against a converged teacher of "
              f"{_span([r['teacher'] for r in runs.values()])}% (at least 95% asked);",
              f"- 2 NFE at {_span(cdeq[1])}% (at least 98% asked);",
              f"- above Picard, Anderson and Broyden at k = 1 ({_span(trunc[0])}%) and k = 2 "
              f"({_span(trunc[1])}%)."]
    return "\n".join(lines)


def replaced(doc: str, table: str) -> str:
    """``doc`` with the text between the markers replaced by ``table``."""
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{table}\n\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        DOC.write_text(replaced(DOC.read_text(), render()))
    else:
        print(render())
