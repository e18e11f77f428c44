"""The command line end to end at smoke size: report files, stage reuse, user errors."""

import json
import os
import stat

import pytest

from cdeq.cli import main
from cdeq.run import stages as pipeline
from cdeq.run.stages import Run, RunConfig, build_config

TINY = ["teacher.epochs=1", "task_config.train_subset=128", "task_config.test_subset=64",
        "distill.epochs=1", "evaluate.budgets=[1,2]", "plans.max_nfe=2"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    before = os.umask(0o022)
    try:
        assert main(["run", "digits", "--quick", "--out", str(out), "--set", *TINY]) == 0
    finally:
        os.umask(before)
    return out


def test_run_files_have_the_mode_the_umask_gives(quick_run):
    files = [p for p in quick_run.rglob("*") if p.is_file()]
    names = {str(p.relative_to(quick_run)) for p in files}
    assert {"config.json", "report.json", "table.md", "plot.png", "teacher.safetensors", "student.ckpt",
            "log.txt", "trajectories/manifest.json", "trajectories/shard_00000/iterates.npy"} <= names
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.name: "0o644" for p in files}  # the run ran under umask 022


def test_report_has_the_promised_fields(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    assert report["task"] == "digits" and report["metric"] == "accuracy"
    assert report["higher_is_better"] is True
    assert set(report["teacher"]) >= {"metric", "nfe"}
    for method in ("picard", "anderson", "broyden", "cdeq"):
        assert set(report["methods"][method]) == {"1", "2"}
        assert all(0.0 <= v <= 1.0 for v in report["methods"][method].values())
    assert {"teacher", "cdeq@1"} <= set(report["latency_ms"])
    assert set(report["exact_mode"]) >= {"anderson_nfe", "cdeq_warm_nfe"}
    # the warm start costs the student's one call plus the solver's own
    assert report["exact_mode"]["cdeq_warm_nfe"] >= 1.0
    # the warm-start plan is the cheapest on training data, whatever it costs on the test split
    exact = report["exact_mode"]
    on_train = exact["warm_nfe_by_plan_on_training_data"]
    assert exact["warm_plan_nfe"] == int(min(on_train, key=on_train.get))
    assert exact["cdeq_warm_nfe"] == exact["warm_nfe_by_plan"][str(exact["warm_plan_nfe"])]
    assert (quick_run / "table.md").read_text().count("| C-DEQ |") == 2  # metric and error tables
    assert (quick_run / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_rerun_skips_finished_stages(quick_run, capsys):
    before = (quick_run / "student.safetensors").stat().st_mtime_ns
    assert main(["run", "digits", "--quick", "--out", str(quick_run), "--set", *TINY]) == 0
    out = capsys.readouterr().out
    assert "skipping training" in out and "skipping distillation" in out
    assert (quick_run / "student.safetensors").stat().st_mtime_ns == before


def test_single_stage_on_existing_run(quick_run):
    assert main(["evaluate", "--out", str(quick_run)]) == 0


def test_plans_stage_chooses_again_and_keeps_the_weights(quick_run):
    run = Run(quick_run)
    before = {name: (run.read_meta(name), run._read(name)[0]) for name in ("student", "student_plus")}
    run.close()
    assert main(["plans", "--out", str(quick_run)]) == 0
    run = Run(quick_run)
    for name, (meta, tensors) in before.items():
        tensors_after, meta_after = run._read(name)
        assert tensors_after.keys() == tensors.keys()
        assert all(tensors_after[k].equal(v) for k, v in tensors.items())
        assert meta_after["plans"] == meta["plans"]  # the same search on the same data
        errors = [meta_after["search"][k]["relative_error"] for k in sorted(meta_after["search"], key=int)]
        assert errors == sorted(errors, reverse=True)  # the error to z* never rises (validation)
    run.close()


def test_other_config_in_same_dir_is_refused(quick_run, capsys):
    assert main(["run", "digits", "--quick", "--out", str(quick_run), "--set", *TINY,
                 "seed=3"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_unknown_keys_are_errors(tmp_path, capsys):
    assert main(["run", "digits", "--out", str(tmp_path), "--set", "teacher.epoks=3"]) == 2
    err = capsys.readouterr().err
    assert "epoks" in err and "epochs" in err
    assert main(["run", "digits", "--out", str(tmp_path), "--set", "task_config.chanels=3"]) == 2
    assert "chanels" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text('{"distill": {"weights": 1}}')
    assert main(["run", "digits", "--out", str(tmp_path), "--config", str(cfg)]) == 2
    assert "weights" in capsys.readouterr().err


def test_bad_data_path_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "images", "--data", str(tmp_path / "nope.npz"), "--out",
                 str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r" / "teacher.safetensors").exists()


def test_build_config_merges_defaults():
    cfg = build_config("digits", {"teacher": {"epochs": 2}}, quick=True)
    assert isinstance(cfg, RunConfig) and cfg.teacher.epochs == 2
    assert cfg.task_config["channels"] == 8  # from the quick preset


def test_report_has_the_baselines(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    assert set(report["methods"]["learned_init"]) == {"1", "2"}
    assert set(report["methods"]["unrolled"]) == {"1", "2"}  # k = 4 is above the TINY budgets
    assert set(report["relative_error"]["unrolled"]) == {"1", "2"}
    assert {"learned_init", "unrolled_k1", "unrolled_k2", "unrolled_k4"} <= set(report["train_time_s"])
    assert {"learned_init@1", "unrolled@2"} <= set(report["latency_ms"])
    assert (quick_run / "learned_init.safetensors").exists()
    assert all((quick_run / f"unrolled_k{k}.safetensors").exists() for k in (1, 2, 4))


def test_repeated_set_flags_accumulate():
    from cdeq.cli import _overrides, build_parser

    args = build_parser().parse_args(["run", "digits", "--set", "seed=1", "--set", "teacher.epochs=2"])
    assert _overrides(args.set) == {"seed": 1, "teacher": {"epochs": 2}}


def test_every_stage_loads_the_solvers_the_configuration_gives(tmp_path, monkeypatch):
    """teacher.train_solver, teacher.eval_solver and record.solver reach the model of every stage."""
    loaded, trained = [], []
    real_teacher, real_train = Run.teacher, pipeline.train_teacher

    def teacher(self):
        loaded.append(real_teacher(self))
        return loaded[-1]

    def train(task, model, config, **kwargs):
        history = real_train(task, model, config, **kwargs)
        trained.append(model)
        return history

    monkeypatch.setattr(Run, "teacher", teacher)
    monkeypatch.setattr(pipeline, "train_teacher", train)
    solvers = ['teacher.train_solver={"name": "picard", "max_iter": 7, "tol": 0.001}',
               "teacher.eval_solver.name=broyden", "teacher.eval_solver.max_iter=77",
               "teacher.eval_solver.tol=1e-5", "record.solver.max_iter=13", "baselines.enabled=true",
               "baselines.unrolled_ks=[1]", "baselines.samples=64"]
    assert main(["run", "digits", "--quick", "--out", str(tmp_path), "--set", *TINY, *solvers]) == 0
    assert len(trained) == 1 and len(loaded) >= 4  # record, distill, baselines, evaluate
    for model in trained + loaded:
        train_solver, eval_solver = model.deq.solver, model.deq.eval_solver
        assert (train_solver.name, train_solver.options.max_iter, train_solver.options.tol) == \
            ("picard", 7, 0.001)
        assert (eval_solver.name, eval_solver.options.max_iter, eval_solver.options.tol) == \
            ("broyden", 77, 1e-5)
    manifest = json.loads((tmp_path / "trajectories" / "manifest.json").read_text())
    assert manifest["last"] == 13 and max(manifest["indices"]) < 13


def test_a_run_may_restart_or_load_on_another_device(quick_run):
    """The device is where a run starts now, not part of what it computes: another device's start
    is not "another configuration", and a run recorded on CUDA loads on the CPU when asked."""
    import torch

    from cdeq.engine.config import ConfigError

    path = quick_run / "config.json"
    written = path.read_text()
    try:
        data = json.loads(written)
        with Run(quick_run, build_config("digits", {**data, "device": "auto"}, quick=True)) as run:
            assert json.loads(path.read_text())["device"] == "auto"  # recorded, nothing refused
            assert run.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
        path.write_text(json.dumps({**data, "device": "cuda"}))
        teacher = Run(quick_run, device="cpu").teacher()
        assert next(teacher.parameters()).device.type == "cpu"
        if not torch.cuda.is_available():
            with pytest.raises(ConfigError, match="no CUDA device"):
                Run(quick_run).teacher()
    finally:
        path.write_text(written)


def test_the_plus_choices_benchmark_runs_on_a_finished_run(quick_run, tmp_path, monkeypatch):
    """``benchmarks/plus_choices.py`` builds C-DEQ+ through the pipeline's own stages; running it
    here keeps it in step with them (it once broke when a stage's signature changed)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "plus_choices.py"
    monkeypatch.syspath_prepend(str(path.parent))  # its sibling tie_rule.py
    spec = importlib.util.spec_from_file_location("plus_choices", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "choices.json"
    monkeypatch.setattr(sys, "argv", ["plus_choices.py", "--run", str(quick_run), "--out", str(out),
                                      "--variants", "no pull to z*, task weight 1"])
    bench.main()
    got = json.loads(out.read_text())
    assert got["split"] == "valid" and list(got["variants"])[0] == "no pull to z*, task weight 1"
    per = got["variants"]["no pull to z*, task weight 1"]
    assert set(per) == {str(k) for k in bench.BUDGETS}
    assert all(0.0 <= v["metric"] <= 1.0 and v["loss"] > 0 for v in per.values())
    variant = "own injection, task weight 1"  # a plus setting (C-DEQ+'s own injection) changed too
    monkeypatch.setattr(sys, "argv", ["plus_choices.py", "--held-out", "--run", str(quick_run),
                                      str(quick_run), "--out", str(out), "--variants", variant])
    bench.main()
    got = json.loads(out.read_text())
    runs = got["runs"]
    assert len(runs) == 2 and runs[0]["variants"] == runs[1]["variants"]  # same run, same scores
    assert {variant, "C-DEQ (the run's)", "C-DEQ+ (the run's)", "C-DEQ+ (the run's), its chain's plan",
            "learned init"} <= set(runs[0]["variants"])
    per = runs[0]["variants"][variant]
    assert set(per) == {str(k) for k in bench.HELD_OUT_BUDGETS}
    assert all(0.0 <= v["metric"] <= 1.0 and v["relative_error"] >= 0.0 for v in per.values())
    assert any("± 0.0000" in line for line in got["table"])  # two equal runs: no spread


def test_the_tie_rule_benchmark_compares_rules_the_search_no_longer_exposes(quick_run, tmp_path,
                                                                          monkeypatch):
    """``benchmarks/tie_rule.py`` still runs the alternatives it compared (through the search's
    private rule), and its last rule is the one the search keeps: the same plans as a run's."""
    import importlib.util
    import sys
    from pathlib import Path

    from cdeq.consistency import search

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "tie_rule.py"
    spec = importlib.util.spec_from_file_location("tie_rule", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert search._Rule(**list(bench.RULES.values())[-1]) == search._RULE
    out = tmp_path / "tie.json"
    monkeypatch.setattr(sys, "argv", ["tie_rule.py", "--runs", str(quick_run), "--out", str(out),
                                      "--rules", "1", "6"])
    bench.main()
    got = json.loads(out.read_text())
    rules = got["runs"][0]["models"]["C-DEQ"]
    assert list(rules) == [list(bench.RULES)[0], list(bench.RULES)[5]]
    for per in rules.values():
        assert all(0.0 <= per[str(k)]["metric"] <= 1.0 for k in bench.BUDGETS)


def test_one_key_sets_the_converged_teachers_solver(tmp_path, capsys):
    """``teacher.eval_solver`` is the report's converged teacher (its NFE, and the z* of every
    error); the key that used to set the report's alone is refused with the one to use."""
    out = tmp_path / "seven"
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", *TINY, "baselines.enabled=false",
                 "plus.enabled=false", "teacher.eval_solver.max_iter=7"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"]["solver"]["max_iter"] == 7
    assert 1 <= report["teacher"]["nfe"] <= 7
    capsys.readouterr()
    assert main(["run", "digits", "--quick", "--out", str(tmp_path / "old"), "--set", *TINY,
                 "evaluate.reference.max_iter=7"]) == 2
    err = capsys.readouterr().err
    assert "evaluate.reference" in err and "teacher.eval_solver" in err
