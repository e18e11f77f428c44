"""Validated dataclass configuration: strict keys, nested sections, checks at construction."""

from __future__ import annotations

import dataclasses
import doctest

import pytest

import cdeq.engine.config
from cdeq.engine.config import (
    Config,
    ConfigError,
    check_choice,
    check_int,
    check_keys,
    check_positive,
    check_range,
)
from cdeq.solvers import AndersonOptions, SolverOptions


@dataclasses.dataclass
class Optim(Config):
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    kind: str = "adam"

    def validate(self) -> None:
        check_positive("lr", self.lr)
        check_choice("kind", self.kind, ["adam", "sgd"])


@dataclasses.dataclass
class Run(Config):
    steps: int = 10
    optim: Optim = dataclasses.field(default_factory=Optim)

    def validate(self) -> None:
        check_int("steps", self.steps, minimum=1)


def test_from_dict_builds_nested_sections_and_tuples():
    run = Run.from_dict({"steps": 5, "optim": {"lr": 0.1, "betas": [0.5, 0.6]}})
    assert run.steps == 5
    assert isinstance(run.optim, Optim) and run.optim.lr == 0.1
    assert run.optim.betas == (0.5, 0.6) and isinstance(run.optim.betas, tuple)
    assert Run.from_dict(None) == Run()
    assert Run.from_dict({"steps": 2}, steps=3).steps == 3  # keyword overrides win


def test_to_dict_round_trips():
    run = Run(steps=7, optim=Optim(lr=0.5, kind="sgd"))
    data = run.to_dict()
    assert data == {"steps": 7, "optim": {"lr": 0.5, "betas": (0.9, 0.999), "kind": "sgd"}}
    assert Run.from_dict(data) == run


def test_unknown_key_names_the_key_the_allowed_keys_and_a_suggestion():
    with pytest.raises(ConfigError) as err:
        Run.from_dict({"step": 3})
    message = str(err.value)
    assert "unknown key 'step' in Run" in message
    assert "did you mean 'steps'" in message
    assert "allowed keys: ['optim', 'steps']" in message
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' in Run; allowed keys"):
        Run.from_dict({"zzz": 3})  # nothing close: no suggestion


def test_unknown_key_in_a_nested_section_names_that_section():
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr' in Optim.*did you mean 'lr'"):
        Run.from_dict({"optim": {"lrr": 0.1}})


@pytest.mark.parametrize(
    "data, match",
    [
        ({"steps": 0}, r"steps=0 is not valid; it must be an integer >= 1"),
        ({"steps": True}, r"steps=True"),
        ({"steps": 2.0}, r"steps=2.0"),
        ({"optim": {"lr": 0}}, r"lr=0 is not valid; it must be a number > 0"),
        ({"optim": {"kind": "adamw"}}, r"kind='adamw' is not valid; allowed values: \['adam', 'sgd'\]"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        Run.from_dict(data)


def test_validation_runs_on_direct_construction_and_replace():
    with pytest.raises(ConfigError, match="steps=-1"):
        Run(steps=-1)
    run = Run()
    assert run.replace(steps=4).steps == 4 and run.steps == 10
    with pytest.raises(ConfigError, match="steps=0"):
        run.replace(steps=0)
    with pytest.raises(ConfigError, match=r"unknown key 'stesp' in Run.*did you mean 'steps'"):
        run.replace(stesp=4)


def test_a_value_of_the_wrong_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="tol='small'"):
        SolverOptions.from_dict({"tol": "small"})


def test_a_value_of_the_wrong_kind_is_a_config_error_on_direct_construction():
    with pytest.raises(ConfigError, match="tol='small'"):
        SolverOptions(tol="small")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_checks():
    check_choice("mode", "a", ["a", "b"])
    check_positive("x", 0.0, allow_zero=True)
    check_range("p", 1.0, 0.0, 1.0)
    check_int("n", 0)
    check_keys("here", {"a": 1}, ["a", "b"])
    with pytest.raises(ConfigError, match=r"x=0.0 is not valid; it must be a number > 0"):
        check_positive("x", 0.0)
    with pytest.raises(ConfigError, match=r"x=-1 is not valid; it must be a number >= 0"):
        check_positive("x", -1, allow_zero=True)
    with pytest.raises(ConfigError, match="x=True"):
        check_positive("x", True)
    with pytest.raises(ConfigError, match=r"p=1.5 is not valid; it must lie in \[0.0, 1.0\]"):
        check_range("p", 1.5, 0.0, 1.0)
    with pytest.raises(ConfigError, match="p='a'"):
        check_range("p", "a", 0.0, 1.0)
    with pytest.raises(ConfigError, match=r"n=-1 is not valid; it must be an integer >= 0"):
        check_int("n", -1)
    with pytest.raises(ConfigError, match=r"unknown key 'c' in here; allowed keys: \['a', 'b'\]"):
        check_keys("here", {"c": 1}, ["b", "a"])


def test_solver_options_inherit_the_common_checks():
    opts = AndersonOptions.from_dict({"memory": 3, "tol": 1e-6})
    assert (opts.memory, opts.tol, opts.max_iter, opts.stop_mode) == (3, 1e-6, 50, "rel")
    with pytest.raises(ConfigError, match=r"stop_mode='l1'.*\['rel', 'abs'\]"):
        AndersonOptions(stop_mode="l1")
    with pytest.raises(ConfigError, match=r"unknown key 'damping' in AndersonOptions"):
        AndersonOptions.from_dict({"damping": 0.5})


def test_docstring_examples():
    result = doctest.testmod(cdeq.engine.config)
    assert result.attempted > 0 and result.failed == 0


# --- types: every field is checked against its type hint, errors name the full key path -------------
@dataclasses.dataclass
class Typed(Config):
    n: int = 1
    x: float = 0.5
    flag: bool = False
    name: str = "a"
    items: tuple = ()
    extra: dict = dataclasses.field(default_factory=dict)
    maybe: int | None = None
    run: Run = dataclasses.field(default_factory=Run)


WRONG = {  # field -> values of another kind, as a JSON file or `--set` would give them
    "n": ["3", 1.5, True, None, [1], {"a": 1}],
    "x": ["fast", True, None, [1.0], {"a": 1}],
    "flag": [1, 0, "yes", None, [True], {"a": 1}],
    "name": [3, 1.5, True, None, ["a"], {"a": 1}],
    "items": [3, "abc", True, None, {"a": 1}],
    "extra": [3, "abc", True, None, [1]],
    "maybe": ["3", 1.5, True, [1]],
}


@pytest.mark.parametrize("key, value", [(k, v) for k, vs in WRONG.items() for v in vs])
def test_a_value_of_the_wrong_type_names_the_key_and_the_expected_form(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not valid; expected "):
        Typed.from_dict({key: value})


@pytest.mark.parametrize("value", [3, "foo", [1], True, None])
def test_a_section_given_a_non_mapping_names_the_section(value):
    with pytest.raises(ConfigError, match=r"^run=.* is not valid; expected a mapping of Run settings"):
        Typed.from_dict({"run": value})
    with pytest.raises(ConfigError, match=r"^run\.optim=.* expected a mapping of Optim settings "
                                          r"\(keys: \['betas', 'kind', 'lr'\]\)"):
        Typed.from_dict({"run": {"optim": value}})


def test_nested_errors_name_the_full_key_path():
    with pytest.raises(ConfigError, match=r"^run\.optim\.lr='x' is not valid; expected a number"):
        Typed.from_dict({"run": {"optim": {"lr": "x"}}})
    with pytest.raises(ConfigError, match=r"^run\.optim: lr=0 is not valid; it must be a number > 0"):
        Typed.from_dict({"run": {"optim": {"lr": 0}}})  # a range check: prefixed once, not twice
    with pytest.raises(ConfigError, match=r"^unknown key 'run\.optim\.lrr' in Optim"):
        Typed.from_dict({"run": {"optim": {"lrr": 0.1}}})


def test_values_of_the_right_type_are_kept():
    t = Typed.from_dict({"n": 2, "x": 3, "flag": True, "name": "b", "items": [1, 2],
                         "extra": {"k": [1]}, "maybe": 4, "run": Run(steps=3)})
    assert (t.n, t.x, t.flag, t.name, t.items, t.extra, t.maybe) == (2, 3, True, "b", (1, 2),
                                                                     {"k": [1]}, 4)
    assert t.run == Run(steps=3)  # a section given as a Config instance
    assert Typed.from_dict({"maybe": None}).maybe is None


def test_the_run_configuration_rejects_the_issue_probes():
    from cdeq.run.stages import build_config

    with pytest.raises(ConfigError, match=r"teacher\.train_solver='foo' is not valid; expected a "
                                          r"mapping of SolverSpec settings.*teacher\.train_solver\.name=foo"):
        build_config("digits", {"teacher": {"train_solver": "foo"}}, quick=True)
    with pytest.raises(ConfigError, match=r"^teacher=3 is not valid; expected a mapping of TeacherConfig"):
        build_config("digits", {"teacher": 3}, quick=True)
    with pytest.raises(ConfigError, match=r"^task_config\.channels='8' is not valid; expected an integer"):
        build_config("digits", {"task_config": {"channels": "8"}}, quick=True)
    with pytest.raises(ConfigError, match=r"^teacher\.eval_solver: solver name='fast' is not valid"):
        build_config("digits", {"teacher": {"eval_solver": {"name": "fast"}}}, quick=True)


def test_merged_merges_sections_and_replaces_solver_options():
    from cdeq.engine.config import merged

    base = {"a": {"b": 1, "c": 2}, "solver": {"name": "anderson", "options": {"memory": 5}}}
    out = merged(base, {"a": {"c": 3}, "solver": {"name": "picard", "options": {"damping": 0.5}}})
    assert out == {"a": {"b": 1, "c": 3}, "solver": {"name": "picard", "options": {"damping": 0.5}}}
    assert base["a"] == {"b": 1, "c": 2}  # the inputs are not changed
    out["solver"]["options"]["damping"] = 1.0
    assert merged(base, {})["solver"]["options"] == {"memory": 5}


def test_a_run_configuration_of_an_earlier_version_is_read_with_its_moved_keys():
    """Saved runs keep loading: C-DEQ+'s settings moved from ``distill`` to ``plus``; a removed
    key holding the value that meant today's behaviour is dropped, any other value is an error
    that says what replaced it."""
    import json
    from pathlib import Path

    from cdeq.consistency.plus import PlusConfig
    from cdeq.run.config import MOVED, RunConfig, build_config

    old = {"distill": {"chain_k": 2, "chain_data": "train", "epochs": 3},
           "plus": {"train_injection": False}}
    cfg = RunConfig.from_dict(old)
    assert (cfg.plus.chain_k, cfg.plus.chain_data, cfg.distill.epochs) == (2, "train", 3)
    assert build_config("digits", {"distill": {"start_weight": 0.5}}).plus.start_weight == 0.5
    with pytest.raises(ConfigError, match="distill.chain_k=2 and plus.chain_k=3 disagree"):
        RunConfig.from_dict({"distill": {"chain_k": 2}, "plus": {"chain_k": 3}})
    with pytest.raises(ConfigError, match="plus.train_injection=True is no longer a setting: "
                                          "C-DEQ\\+ has its own injection when"):
        build_config("digits", {"plus": {"train_injection": True}})
    assert RunConfig.from_dict({"plus": {"train_injection": True}}).plus == PlusConfig()  # logged
    # every stored run's configuration still reads, with the values it was run with
    stored = sorted((Path(__file__).parents[1] / "docs" / "results").rglob("config.json"))
    assert stored
    for path in stored:
        data = json.loads(path.read_text())
        if "distill" not in data:  # not a run configuration
            continue
        # the task's own settings name data folders of the machine that ran it: left out here
        cfg = RunConfig.from_dict({k: v for k, v in data.items() if k not in ("task", "task_config")}
                                  ).to_dict()
        for old_key, new_key in MOVED.items():
            (sec, name), (new_sec, new_name) = old_key.split("."), new_key.split(".")
            if name in data[sec]:
                assert cfg[new_sec][new_name] == data[sec][name], (path, old_key)
