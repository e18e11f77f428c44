"""Property-based tests (hypothesis): the solvers on random contractive maps, and the command line's
configuration building on random wrong values.

For ``f(z, x) = tanh(A z + x)`` or ``A z + x`` with ``|A|_2 = rho < 1`` (a contraction with
Lipschitz constant ``rho``) every solver either returns a fixed point within tolerance or flags the
sample as not converged; the distance to the true fixed point obeys ``|z - z*| <= |f(z) - z| /
(1 - rho)``; Picard, whose convergence the contraction guarantees, always converges.

Random ``--set KEY=VALUE`` pairs (every key of :class:`~cdeq.run.stages.RunConfig` and of the task's
config, found from the dataclass fields; values of every type but the key's own) with random
tasks, ``--data``, ``--name`` and ``--quick`` never give a traceback: the configuration building of
``cdeq run`` raises a :class:`~cdeq.engine.config.ConfigError` that names one of the keys.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdeq.cli import _resolve_task, _user_config, build_parser
from cdeq.engine.config import Config, ConfigError
from cdeq.run.stages import RunConfig, build_config
from cdeq.solvers import get_solver
from cdeq.tasks import TASKS

TOL = 1e-7


def _contraction(seed: int, dim: int, rho: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return rho * a / torch.linalg.matrix_norm(a, ord=2)


problems = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "dim": st.integers(1, 8),
    "batch": st.integers(1, 4),
    "rho": st.floats(0.05, 0.9),
    "linear": st.booleans(),
    "solver": st.sampled_from(["picard", "anderson", "broyden"]),
    "max_iter": st.sampled_from([3, 400]),
})


@settings(max_examples=30, deadline=None)
@given(problems)
def test_solution_is_a_fixed_point_or_flagged(p):
    a = _contraction(p["seed"], p["dim"], p["rho"])
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    x = torch.randn(p["batch"], p["dim"], generator=gen, dtype=torch.float64)

    def f(z, x):
        out = z @ a.T + x
        return out if p["linear"] else torch.tanh(out)

    res = get_solver(p["solver"], tol=TOL, max_iter=p["max_iter"]).solve(f, torch.zeros_like(x), x)
    assert res.z.shape == x.shape and res.nfe.shape == (p["batch"],)
    assert bool((res.nfe >= 1).all()) and bool((res.nfe <= p["max_iter"]).all())
    # converged <=> the reported residual is within tolerance (and finite)
    assert torch.equal(res.converged, torch.isfinite(res.residual) & (res.residual <= TOL))
    fz = f(res.z, x)
    gap = (fz - res.z).norm(dim=1)
    rel = gap / (fz.norm(dim=1) + 1e-12)
    # z is f(best iterate): its own residual is at most rho times the reported one
    ok = res.converged
    assert bool((rel[ok] <= 2 * TOL).all()), (rel, res.residual)
    # distance to the true fixed point (found by many Picard steps) obeys the contraction bound
    z_star = torch.zeros_like(x)
    for _ in range(2000):
        z_star = f(z_star, x)
    err = (res.z - z_star).norm(dim=1)
    assert bool((err <= gap / (1 - p["rho"]) + 1e-9).all())
    if p["solver"] == "picard" and p["max_iter"] == 400:
        assert bool(res.converged.all())  # 0.9 ** 400 ~ 5e-19: a contraction always gets there
    assert not bool(res.diverged.any())


@settings(max_examples=15, deadline=None)
@given(problems)
def test_expansive_maps_are_flagged_not_converged(p):
    a = _contraction(p["seed"], p["dim"], 3.0 + p["rho"])  # |A| > 1, linear: no attracting point
    x = torch.randn(p["batch"], p["dim"], generator=torch.Generator().manual_seed(p["seed"]),
                    dtype=torch.float64)
    res = get_solver("picard", tol=TOL, max_iter=5).solve(lambda z, x: z @ a.T + x, torch.zeros_like(x), x)
    assert not bool(res.converged.any())
    assert bool((res.residual > TOL).all())


# --- the command line's configuration building ----------------------------------------------------
def _keys(cls: type[Config], prefix: str = "") -> list[tuple[str, typing.Any]]:
    """Every ``(dotted key, type hint)`` of ``cls``, nested sections and their fields included."""
    out = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        out.append((prefix + field.name, hint))
        if isinstance(hint, type) and issubclass(hint, Config):
            out += _keys(hint, f"{prefix}{field.name}.")
    return out


_words = st.text(min_size=1, max_size=8)
_lists = st.lists(st.integers(-3, 3), max_size=3)
_maps = st.dictionaries(st.sampled_from(["a", "name", "x"]), st.integers(), min_size=1, max_size=2)
_fractions = st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v))
_WRONG = {  # hint -> values of every other type
    int: st.one_of(_words, _fractions, st.booleans(), st.none(), _lists, _maps),
    float: st.one_of(_words, st.booleans(), st.none(), _lists, _maps),
    bool: st.one_of(st.integers(), _words, _fractions, st.none(), _lists, _maps),
    str: st.one_of(st.integers(), _fractions, st.booleans(), st.none(), _lists, _maps),
    tuple: st.one_of(st.integers(), _words, st.booleans(), st.none(), _maps),
    dict: st.one_of(st.integers(), _words, st.booleans(), st.none(), _lists),
}
_SECTION = st.one_of(st.integers(), _words, st.booleans(), st.none(), _lists)  # not a mapping


_UNION_WRONG = {  # a union hint's members -> values of none of them
    frozenset({str, dict}): st.one_of(st.integers(), _fractions, st.booleans(), st.none(), _lists),
}


def _wrong(hint: typing.Any) -> st.SearchStrategy:
    if isinstance(hint, type) and issubclass(hint, Config):
        return _SECTION
    if typing.get_args(hint):
        return _UNION_WRONG[frozenset(typing.get_args(hint))]
    return _WRONG[hint]


@st.composite
def cli_calls(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    """``(argv, keys)``: a `cdeq run` command line with 1-3 wrong ``--set`` pairs and their keys."""
    task = draw(st.sampled_from(sorted(TASKS)))
    keys = [(k, h) for k, h in _keys(RunConfig) if k != "task"]
    keys += [("task_config." + k, h) for k, h in _keys(TASKS[task].Config)]
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique_by=lambda kh: kh[0]))
    pairs = [f"{key}={json.dumps(draw(_wrong(hint)))}" for key, hint in chosen]
    argv = ["run", task, "--out", "unused", "--set", *pairs]
    if draw(st.booleans()):
        argv.append("--quick")
    data = draw(st.sampled_from([None, "/nonexistent/data.npz", "/tmp", __file__]))
    if data is not None:
        argv += ["--data", data]
    if "name" in {f.name for f in dataclasses.fields(TASKS[task].Config)} and draw(st.booleans()):
        argv += ["--name", draw(st.sampled_from(["cora", "citeseer", "x"]))]
    return argv, [key for key, _ in chosen]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cli_calls())
def test_wrong_set_values_are_config_errors_naming_the_key(call):
    argv, keys = call
    args = build_parser().parse_args(argv)
    with pytest.raises(ConfigError) as err:
        user = _user_config(args)
        build_config(_resolve_task(args.task, args, user), user, quick=args.quick)
    message = str(err.value)
    assert any(key in message for key in keys), (argv, message)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(TASKS)), st.booleans(),
       st.sampled_from([None, "/nonexistent/data.npz", "/tmp", __file__]))
def test_valid_set_values_with_any_task_and_data_build_a_configuration(task, quick, data):
    """Right values: a configuration carrying them, or (a task that needs other data) a
    ConfigError naming task_config."""
    argv = ["run", task, "--set", "seed=3", "teacher.epochs=2", "evaluate.budgets=[1,2]",
            "teacher.train_solver.name=picard"] + (["--quick"] if quick else [])
    args = build_parser().parse_args(argv + (["--data", data] if data else []))
    user = _user_config(args)
    try:
        config = build_config(_resolve_task(args.task, args, user), user, quick=args.quick)
    except ConfigError as err:
        assert str(err).startswith("task_config"), str(err)
        return
    assert (config.task, config.seed, config.teacher.epochs) == (task, 3, 2)
    assert config.evaluate.budgets == (1, 2) and config.teacher.train_solver.name == "picard"
    assert config.task_config.get("data", "") == (data or config.task_config.get("data", ""))
