"""What every task shares: the data-folder lookup, the input checks, presets, the Task hooks the
command line calls, and the three splits."""

from __future__ import annotations

import pytest
import torch

import cdeq.consistency.trajectory
import cdeq.engine.checks
from cdeq import cli
from cdeq.engine.config import ConfigError
from cdeq.tasks import TASKS, Task
from cdeq.tasks.datadir import data_dir, data_file


def test_data_dir_is_read_at_call_time(tmp_path, monkeypatch):
    """CDEQ_DATA set after cdeq is imported takes effect (it was read at import before)."""
    monkeypatch.setenv("CDEQ_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    (tmp_path / "x.txt").write_text("x")
    assert data_file("x.txt", "a file") == tmp_path / "x.txt"
    with pytest.raises(FileNotFoundError, match="CDEQ_DATA") as err:
        data_file("nope/y.txt", "the y data")
    assert str(tmp_path / "nope" / "y.txt") in str(err.value) and "the y data" in str(err.value)
    monkeypatch.delenv("CDEQ_DATA")
    assert data_dir() != tmp_path and data_dir().parts[-2:] == ("shared", "data")


def test_input_checks_live_in_their_own_module():
    with pytest.raises(ValueError, match="NaN/inf"):
        cdeq.engine.checks.check_finite_inputs((torch.ones(2), {"a": torch.tensor([float("nan")])}), "here")
    cdeq.engine.checks.check_finite_inputs(torch.ones(3), "here")
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\]"):
        cdeq.engine.checks.check_labels(torch.zeros(4, 3), torch.tensor([0, 1, 3, 2]), "here")
    cdeq.engine.checks.check_labels(torch.zeros(4, 3), torch.tensor([0, 1, 2, 2]), "here")
    assert cdeq.consistency.trajectory.check_labels is cdeq.engine.checks.check_labels  # one definition


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("task", sorted(set(TASKS) - {"text", "planetoid", "images", "ogbn"}))
def test_every_preset_builds_a_valid_run_config(task, quick):
    pipeline = pytest.importorskip("cdeq.run.stages")
    config = pipeline.build_config(task, {}, quick=quick)
    assert config.task == task
    assert TASKS[task].run_defaults(quick) == TASKS[task].run_defaults(quick)  # fresh copies
    TASKS[task].run_defaults(quick).setdefault("teacher", {})["epochs"] = 999
    assert pipeline.build_config(task, {}, quick=quick).teacher.epochs != 999  # presets unchanged


def test_selection_defaults_to_validation_and_never_to_test():
    class Split(Task):
        name = "split-toy"

        def validation_batches(self, batch_size):
            return [("valid", batch_size)]

        def test_batches(self, batch_size):
            raise AssertionError("selection touched the test split")

    task = Split(Task.Config())
    assert list(task.selection_batches(4)) == [("valid", 4)]
    with pytest.raises(NotImplementedError):
        Task(Task.Config()).split_sizes()


class _FakeRun:
    made: list = []

    def __init__(self, out_dir, config):
        self.dir = out_dir
        _FakeRun.made.append((out_dir, config))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def log(self, msg):
        pass

    def run_all(self):
        pass


def test_cli_asks_the_task_for_sub_runs_and_data_readers(tmp_path, monkeypatch):
    pipeline = pytest.importorskip("cdeq.run.stages")
    monkeypatch.setattr(pipeline, "Run", _FakeRun)
    _FakeRun.made = []
    assert cli.main(["run", "cora", "--quick", "--out", str(tmp_path / "c")]) == 0
    assert [(d.name, c.task_config["setting"]) for d, c in _FakeRun.made] == [
        ("transductive", "transductive"), ("inductive", "inductive")]
    _FakeRun.made = []
    assert cli.main(["run", "cora", "--quick", "--out", str(tmp_path / "c1"),
                     "--set", "task_config.setting=inductive"]) == 0
    assert [d for d, _ in _FakeRun.made] == [tmp_path / "c1"]
    _FakeRun.made = []
    (tmp_path / "idx").mkdir()
    assert cli.main(["run", "images", "--quick", "--out", str(tmp_path / "i"),
                     "--data", str(tmp_path / "idx")]) == 0
    ((out, config),) = _FakeRun.made
    assert out == tmp_path / "i" and config.task_config["dataset"] == "idx"


def test_unknown_task_is_still_a_config_error(tmp_path, capsys):
    assert cli.main(["run", "nosuch", "--out", str(tmp_path / "n")]) == 2
    assert "unknown task" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        pytest.importorskip("cdeq.run.stages").build_config("nosuch", {})
