"""Report rendering (old and new formats), seed aggregates, and the generated docs."""

import json
from pathlib import Path

import pytest

from cdeq.cli import main
from cdeq.engine.config import ConfigError
from cdeq.run.report import equal_cost, markdown_table
from cdeq.run.seeds import aggregate
from cdeq.run.summary import BEGIN, END, replace_block, summarize, write_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def test_docs_results_tables_match_the_report_files():
    runs = sorted(p for p in RESULTS.iterdir() if p.is_dir())
    text = (ROOT / "docs" / "results.md").read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    assert text[start:end] + "\n" == summarize(runs), \
        "docs/results.md is stale: run `cdeq summarize docs/results/*/ --out docs/results.md`"


def _report(seed=0, shift=0.0):
    budgets = ["1", "2", "4"]
    calls = {"picard": {"1": 1.01, "2": 2.02, "4": 4.04}, "cdeq": {"1": 1.6, "2": 3.2, "4": 6.4}}
    methods = {"picard": {"1": 0.5 + shift, "2": 0.8, "4": 0.9},
               "cdeq": {"1": 0.85 + shift, "2": 0.88, "4": 0.9}}
    timing = {"threads": 1, "batch_size": 8, "repeats": 20, "warmup": 2, "interleaved": True,
              "teacher": {"median_ms": 50.0, "iqr_ms": 1.0}}
    for name, per in calls.items():
        timing[name] = {k: {"median_ms": 2 * v, "iqr_ms": 0.1} for k, v in per.items()}
    return {
        "task": "toy", "metric": "accuracy", "higher_is_better": True, "seed": seed,
        "splits": {"train": 10, "valid": 5, "test": 5}, "budgets": [1, 2, 4],
        "teacher": {"metric": 0.9 + shift, "nfe": 20.0},
        "methods": methods, "relative_error": {n: dict.fromkeys(budgets, 0.1) for n in methods},
        "valid": {"teacher": {"metric": 0.9 + shift}, "methods": methods},
        "cost": {"layer_call_flops": 100.0, "injection_flops": 5.0, "head_flops": 1.0,
                 "teacher": {"flops": 2006.0, "layer_calls": 20.0},
                 "flops": {n: {k: 100 * v + 6 for k, v in per.items()} for n, per in calls.items()},
                 "layer_calls": calls},
        "timing": timing,
    }


def test_equal_cost_takes_the_best_budget_within_the_cost():
    table = equal_cost(_report())
    assert table["picard"][1] == (0.5, None, "1")  # 1.01 layer calls fit "1" within the slack
    assert table["cdeq"][1] is None  # a 1.6-call student does not fit one layer call
    assert table["cdeq"][2][0] == 0.85 and table["picard"][4][0] == 0.9


def test_new_report_renders_cost_tables_and_old_reports_still_render():
    from cdeq.run.cost import teacher_accuracy_cost

    rep = _report()
    rep["teacher_accuracy_cost"] = teacher_accuracy_cost(rep)
    text = markdown_table(rep)
    assert "| NFE 1 | 1.01 / 2.0 | 1.60 / 3.2 | 20.00 / 50.0 |" in text
    assert "| <= 1 | 50.00 [1] | - | 90.00 [20.0 calls] |" in text
    assert text.count("| C-DEQ |") == 2  # the budget tables' rows; the cost tables have columns
    # picard@4 (410 FLOPs) reaches the teacher more cheaply than cdeq@4 (646): C-DEQ loses here
    assert "Teacher-accuracy cost" in text and "0.63x in FLOPs, 0.63x in time" in text
    # the CIFAR-10 report as written before the cost protocol (no cost, timing or valid fields)
    old = json.loads((Path(__file__).parent / "data" / "report_before_cost_protocol.json").read_text())
    assert "cost" not in old
    old_text = markdown_table(old)
    assert "Latency per batch" in old_text and "layer-call equivalents" not in old_text


def test_aggregate_gives_mean_std_and_per_seed_values():
    agg = aggregate([_report(0, 0.0), _report(1, 0.02)], runs=["seed_0", "seed_1"])
    assert agg["seeds"] == [0, 1]
    assert agg["methods"]["cdeq"]["1"] == pytest.approx(0.86)
    assert agg["methods_std"]["cdeq"]["1"] == pytest.approx(0.02 / 2 ** 0.5)
    assert agg["methods_per_seed"]["cdeq"]["1"] == [0.85, 0.87]
    assert agg["methods_std"]["picard"]["2"] == 0.0
    assert agg["teacher"]["metric_std"] == pytest.approx(0.02 / 2 ** 0.5)
    tac = agg["teacher_accuracy_cost"]
    assert tac["tolerance"] == pytest.approx(agg["valid"]["teacher"]["metric_std"])
    assert tac["tolerance_rule"] == "seeds' std"
    assert "± " in markdown_table(agg)


def test_summary_block_replaces_only_the_generated_part(tmp_path):
    run = tmp_path / "toy"
    run.mkdir()
    (run / "report.json").write_text(json.dumps(_report()))
    doc = tmp_path / "results.md"
    doc.write_text(f"prose before\n{BEGIN}\nold table\n{END}\nprose after\n")
    assert main(["summarize", str(run), "--out", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("prose before\n") and text.endswith("prose after\n")
    assert "old table" not in text and "| toy | accuracy | 1 |" in text
    assert "| toy | 0.25 | C-DEQ@4: 90.00, 6.40 calls | Picard@4: 90.00, 4.04 calls | 0.63x |" in text
    with pytest.raises(ConfigError, match="no generated section"):
        replace_block("no markers here", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no report.json"):
        write_summary([tmp_path / "empty"], None)


TINY = ["teacher.epochs=1", "task_config.train_subset=64", "task_config.test_subset=32",
        "distill.epochs=1", "evaluate.budgets=[1]", "plans.max_nfe=1", "baselines.enabled=false",
        "evaluate.latency_repeats=2", "evaluate.max_batches=1"]


def test_seeds_flag_runs_each_seed_and_writes_the_aggregate(tmp_path):
    out = tmp_path / "digits"
    assert main(["run", "digits", "--quick", "--seeds", "2", "--out", str(out), "--set", *TINY]) == 0
    seeds = [json.loads((out / f"seed_{i}" / "report.json").read_text()) for i in (0, 1)]
    assert [r["seed"] for r in seeds] == [0, 1]
    agg = json.loads((out / "report.json").read_text())
    assert agg["runs"] == ["seed_0", "seed_1"]
    per_seed = agg["methods_per_seed"]["cdeq"]["1"]
    assert per_seed == [r["methods"]["cdeq"]["1"] for r in seeds]
    assert set(agg["cost"]["layer_calls"]) >= {"picard", "cdeq"}
    assert "over 2 seeds" in (out / "table.md").read_text()
