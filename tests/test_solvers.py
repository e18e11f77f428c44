"""Behaviour of the fixed-point solvers: solutions, per-sample stopping, recording, failure modes."""

from __future__ import annotations

import dataclasses
import doctest
import importlib

import pytest
import torch

from cdeq.engine.config import ConfigError
from cdeq.solvers import (
    SOLVERS,
    Anderson,
    AndersonOptions,
    Broyden,
    Picard,
    Solver,
    SolverOptions,
    get_solver,
    register_solver,
)

NAMES = ["picard", "anderson", "broyden"]
D64 = torch.float64


def contraction(d: int, norm: float, seed: int, dtype=D64) -> torch.Tensor:
    """A random ``d x d`` matrix with spectral norm ``norm``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=gen, dtype=dtype)
    return norm * w / torch.linalg.matrix_norm(w, ord=2)


def linear_map(w: torch.Tensor):
    return lambda z, x: z @ w.T + x


def tanh_map(w: torch.Tensor):
    return lambda z, x: torch.tanh(z @ w.T + x)


def picard_reference(f, z0, x, steps: int) -> torch.Tensor:
    z = z0
    for _ in range(steps):
        z = f(z, x)
    return z


# --- solutions -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_linear_fixed_point_is_exact_solution(name):
    w = contraction(12, 0.8, seed=0)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1), dtype=D64)
    res = get_solver(name, tol=1e-12, max_iter=300).solve(linear_map(w), torch.zeros_like(x), x)
    exact = torch.linalg.solve(torch.eye(12, dtype=D64) - w, x.T).T  # (I - W) z = x
    assert res.converged.all() and not res.diverged.any()
    torch.testing.assert_close(res.z, exact, rtol=0, atol=1e-9)
    assert res.z.dtype == D64 and res.nfe.dtype == torch.long
    assert (res.residual <= 1e-12).all()


@pytest.mark.parametrize("name", NAMES)
def test_tanh_fixed_point_matches_long_picard_reference(name):
    w = contraction(16, 0.9, seed=2)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=D64)
    f = tanh_map(w)
    res = get_solver(name, tol=1e-11, max_iter=400).solve(f, torch.zeros_like(x), x)
    assert res.converged.all()
    assert (f(res.z, x) - res.z).norm(dim=1).max() < 1e-9
    reference = picard_reference(f, torch.zeros_like(x), x, steps=800)  # 0.9^800 ~ 1e-37
    torch.testing.assert_close(res.z, reference, rtol=0, atol=1e-9)


def test_accelerated_solvers_use_fewer_evaluations_than_picard_on_a_slow_contraction():
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=torch.Generator().manual_seed(4), dtype=D64))
    w = (q * torch.linspace(-0.95, 0.95, 24, dtype=D64)) @ q.T  # spectral radius 0.95
    x = 0.1 * torch.randn(4, 24, generator=torch.Generator().manual_seed(5), dtype=D64)
    nfe = {}
    for name in NAMES:
        res = get_solver(name, tol=1e-8, max_iter=500).solve(tanh_map(w), torch.zeros_like(x), x)
        assert res.converged.all()
        nfe[name] = res.nfe.float().mean().item()
    assert nfe["anderson"] < 0.5 * nfe["picard"]
    assert nfe["broyden"] < 0.5 * nfe["picard"]


def test_picard_damping_converges_on_an_oscillating_map():
    f = lambda z, x: -1.2 * z + x  # noqa: E731  plain iteration diverges (|-1.2| > 1)
    x = torch.ones(2, 3, dtype=D64)
    plain = get_solver("picard", tol=1e-10, max_iter=60).solve(f, torch.zeros_like(x), x)
    damped = get_solver("picard", tol=1e-10, max_iter=200, damping=0.4).solve(f, torch.zeros_like(x), x)
    assert not plain.converged.any()
    assert damped.converged.all()
    torch.testing.assert_close(damped.z, x / 2.2, rtol=0, atol=1e-9)


def test_solution_keeps_the_state_shape():
    w = contraction(6, 0.5, seed=6)
    x = torch.randn(3, 2, 3, dtype=D64)
    f = lambda z, x: torch.tanh((z.reshape(-1, 6) @ w.T).reshape(-1, 2, 3) + x)  # noqa: E731
    for name in NAMES:
        res = get_solver(name, tol=1e-10).solve(f, torch.zeros_like(x), x)
        assert res.z.shape == (3, 2, 3)
        assert res.converged.all()
        assert (f(res.z, x) - res.z).abs().max() < 1e-9


# --- per-sample stopping ---------------------------------------------------------------------------
def mixed_batch():
    """Samples 0, 2 contract by 0.1 (easy), samples 1, 3 by 0.97 (hard)."""
    w = contraction(8, 1.0, seed=7)
    scale = torch.tensor([0.1, 0.97, 0.1, 0.97], dtype=D64)[:, None]
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(8), dtype=D64)
    calls: list[int] = []

    def f(z, inputs):
        xx, a = inputs
        calls.append(z.shape[0])
        return torch.tanh(a * (z @ w.T) + xx)

    return f, (x, scale), calls


@pytest.mark.parametrize("name", NAMES)
def test_easy_samples_stop_early_and_are_not_evaluated_again(name):
    f, inputs, calls = mixed_batch()
    z0 = torch.zeros(4, 8, dtype=D64)
    max_iter = 300
    res = get_solver(name, tol=1e-10, max_iter=max_iter).solve(f, z0, inputs, record="all")
    assert res.converged.all()
    easy, hard = res.nfe[[0, 2]], res.nfe[[1, 3]]
    assert easy.max() < hard.min()
    assert easy.max() <= 15
    # f saw exactly the running samples: rows evaluated == NFE summed over the batch.
    assert sum(calls) == int(res.nfe.sum())
    assert calls[0] == 4 and calls[-1] < 4
    # An easy sample's iterate stops changing once it has converged.
    traj = res.trajectory
    assert traj.shape == (max_iter + 1, 4, 8)
    for i in (0, 2):
        last = int(res.nfe[i]) - 1  # index of its last evaluated iterate
        frozen = traj[last:max_iter, i]
        assert torch.equal(frozen, frozen[:1].expand_as(frozen))
        assert not torch.equal(traj[last - 1, i], traj[last, i])
    # ... and its trace repeats its final residual.
    i = 0
    assert torch.equal(res.trace[int(res.nfe[i]) - 1 :, i],
                       res.trace[int(res.nfe[i]) - 1, i].expand(res.trace.shape[0] - int(res.nfe[i]) + 1))


@pytest.mark.parametrize("name", NAMES)
def test_batched_solve_equals_solving_each_sample_alone(name):
    f, (x, scale), _ = mixed_batch()
    z0 = torch.zeros(4, 8, dtype=D64)
    solver = get_solver(name, tol=1e-10, max_iter=300)
    batch = solver.solve(f, z0, (x, scale))
    for i in range(4):
        alone = solver.solve(f, z0[i : i + 1], (x[i : i + 1], scale[i : i + 1]))
        assert int(alone.nfe[0]) == int(batch.nfe[i])
        torch.testing.assert_close(alone.z[0], batch.z[i], rtol=0, atol=1e-12)


def test_compact_false_gives_the_same_result_and_nfe():
    f, inputs, calls = mixed_batch()
    z0 = torch.zeros(4, 8, dtype=D64)
    compact = get_solver("anderson", tol=1e-10, max_iter=300).solve(f, z0, inputs)
    calls.clear()
    full = get_solver("anderson", tol=1e-10, max_iter=300, compact=False).solve(f, z0, inputs)
    assert set(calls) == {4}  # the whole batch every time
    assert torch.equal(compact.nfe, full.nfe)
    torch.testing.assert_close(compact.z, full.z, rtol=0, atol=1e-12)


def test_stop_mode_abs_versus_rel():
    # Picard on z -> z/2 + 1000 from 0: g_k = 1000 / 2^k and f(z_k) = 2000 - 1000 / 2^k.
    f = lambda z, x: 0.5 * z + 1000.0  # noqa: E731
    z0 = torch.zeros(1, 1, dtype=D64)
    absolute = get_solver("picard", tol=1e-3, stop_mode="abs", max_iter=100).solve(f, z0)
    relative = get_solver("picard", tol=1e-3, stop_mode="rel", max_iter=100).solve(f, z0)
    assert int(absolute.nfe) == 21  # first k with 1000 / 2^k <= 1e-3 is 20
    assert int(relative.nfe) == 10  # first k with (1000 / 2^k) / (2000 - 1000 / 2^k) <= 1e-3 is 9
    assert absolute.abs_residual.item() <= 1e-3 and absolute.residual.item() == absolute.abs_residual.item()
    assert relative.abs_residual.item() > 1.0  # stopped on the relative residual only
    fz = relative.z.abs().item()
    assert relative.residual.item() == pytest.approx(relative.abs_residual.item() / fz, rel=1e-9)
    assert relative.residual.item() <= 1e-3


# --- trajectory ------------------------------------------------------------------------------------
def test_record_all_holds_every_picard_iterate():
    w = contraction(6, 0.7, seed=9)
    x = torch.randn(3, 6, dtype=D64)
    f = tanh_map(w)
    z0 = torch.randn(3, 6, dtype=D64)
    res = get_solver("picard", tol=0.0, max_iter=7).solve(f, z0, x, record="all")
    assert res.trajectory.shape == (8, 3, 6)
    assert res.trajectory_index == list(range(8))
    z = z0
    for k in range(7):
        torch.testing.assert_close(res.trajectory[k], z, rtol=0, atol=1e-14)
        z = f(z, x)
    torch.testing.assert_close(res.trajectory[7], res.z)  # the last entry is the solution
    assert res.trace.shape == (7, 3) and (res.nfe == 7).all()


@pytest.mark.parametrize("record", [[0, 2, 5], [5, 2, 0, 2]])
def test_record_indices_pick_the_right_iterates(record):
    w = contraction(4, 0.7, seed=10)
    x = torch.randn(2, 2, 2, dtype=D64)
    f = lambda z, x: torch.tanh((z.reshape(-1, 4) @ w.T).reshape(-1, 2, 2) + x)  # noqa: E731
    z0 = torch.zeros(2, 2, 2, dtype=D64)
    res = get_solver("picard", tol=0.0, max_iter=8).solve(f, z0, x, record=record)
    assert res.trajectory_index == [0, 2, 5]
    assert res.trajectory.shape == (3, 2, 2, 2)
    for entry, k in zip(res.trajectory, [0, 2, 5], strict=True):
        torch.testing.assert_close(entry, picard_reference(f, z0, x, k), rtol=0, atol=1e-14)


def test_record_of_anderson_starts_with_a_picard_step():
    w = contraction(5, 0.8, seed=11)
    x = torch.randn(2, 5, dtype=D64)
    f = tanh_map(w)
    res = get_solver("anderson", tol=0.0, max_iter=6).solve(f, torch.zeros_like(x), x, record=[0, 1, 6])
    assert torch.equal(res.trajectory[0], torch.zeros_like(x))
    torch.testing.assert_close(res.trajectory[1], f(torch.zeros_like(x), x))
    torch.testing.assert_close(res.trajectory[2], res.z)


@pytest.mark.parametrize("record", ["some", [0, 9], [-1], []])
def test_bad_record_is_a_config_error(record):
    with pytest.raises(ConfigError, match="record"):
        get_solver("picard", max_iter=8).solve(lambda z, x: z, torch.zeros(1, 2), record=record)


# --- failures -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_nan_input_flags_only_that_sample(name):
    w = contraction(6, 0.6, seed=12)
    x = torch.randn(4, 6, dtype=D64)
    x[1, 3] = float("nan")
    z0 = torch.zeros_like(x)
    with pytest.warns(RuntimeWarning, match=r"1 of 4 samples became non-finite.*indices \[1\]") as got:
        res = get_solver(name, tol=1e-10, max_iter=100).solve(tanh_map(w), z0, x)
    assert len(got) == 1  # once per solve
    assert got[0].filename == __file__  # points at the caller
    assert res.diverged.tolist() == [False, True, False, False]
    assert res.converged.tolist() == [True, False, True, True]
    assert int(res.nfe[1]) == 1  # stopped at its first (non-finite) evaluation
    assert torch.isfinite(res.z).all()
    assert torch.equal(res.z[1], z0[1])  # never a finite value: the start is returned
    assert res.residual[1] == torch.inf
    clean = get_solver(name, tol=1e-10, max_iter=100).solve(tanh_map(w), z0[[0, 2, 3]], x[[0, 2, 3]])
    torch.testing.assert_close(res.z[[0, 2, 3]], clean.z, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_nan_start_flags_only_that_sample(name):
    w = contraction(6, 0.6, seed=13)
    x = torch.randn(3, 6, dtype=D64)
    z0 = torch.zeros_like(x)
    z0[2, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"1 of 3 samples.*indices \[2\]"):
        res = get_solver(name, tol=1e-10, max_iter=100).solve(linear_map(w), z0, x)
    assert res.diverged.tolist() == [False, False, True]
    assert res.converged.tolist() == [True, True, False]


def test_on_nonfinite_raise_names_the_samples_and_ignore_is_silent(recwarn):
    from cdeq.solvers import NonFiniteError

    x = torch.ones(5, 3, dtype=D64)
    x[[0, 3], 1] = float("inf")
    f = lambda z, x: 0.5 * z + x  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"2 of 5 samples.*indices \[0, 3\].*on_nonfinite"):
        get_solver("anderson", on_nonfinite="raise").solve(f, torch.zeros_like(x), x)
    res = get_solver("anderson", on_nonfinite="ignore").solve(f, torch.zeros_like(x), x)
    assert res.diverged.tolist() == [True, False, False, True, False]
    clean = get_solver("anderson", on_nonfinite="raise").solve(f, torch.zeros_like(x), torch.ones_like(x))
    assert clean.converged.all()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    with pytest.raises(ConfigError, match=r"on_nonfinite='loud'.*\['warn', 'raise', 'ignore'\]"):
        get_solver("picard", on_nonfinite="loud")


def test_a_sample_that_blows_up_midway_warns_once():
    f = lambda z, x: x * z + 1  # noqa: E731  row 1 doubles each step and overflows
    x = torch.tensor([[0.5], [1e30]], dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match=r"1 of 2 samples.*\[1\]") as got:
        res = get_solver("picard", tol=1e-6, max_iter=40).solve(f, torch.zeros(2, 1), x)
    assert len(got) == 1
    assert res.diverged.tolist() == [False, True] and res.converged.tolist() == [True, False]
    assert torch.isfinite(res.z).all() and int(res.nfe[1]) == 3  # 1, 1e30+1, inf


@pytest.mark.parametrize("mode", ["abs", "rel"])
def test_picard_on_a_diverging_map_returns_the_best_iterate(mode):
    f = lambda z, x: 2 * z + 1  # noqa: E731  repelling fixed point -1; Picard runs away from it
    z0 = torch.zeros(2, 3, dtype=D64)
    res = get_solver("picard", tol=1e-6, max_iter=30, stop_mode=mode).solve(f, z0, record="all")
    assert not res.converged.any() and not res.diverged.any()
    assert (res.nfe == 30).all()
    assert torch.isfinite(res.z).all()
    torch.testing.assert_close(res.residual, res.trace.min(dim=0).values)
    j = res.trace[:, 0].argmin().item()
    if mode == "abs":  # |g_k| = 2^k grows: the start is best, and z = f(z_0) = 1
        assert j == 0
        torch.testing.assert_close(res.z, torch.ones(2, 3, dtype=D64))
    else:  # |g_k| / |f(z_k)| = 2^k / (2^(k+1) - 1) falls: the last iterate is best
        assert j == 29
    torch.testing.assert_close(res.z, f(res.trajectory[j], None))


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_secant_solvers_find_the_repelling_fixed_point_picard_misses(name):
    res = get_solver(name, tol=1e-10, max_iter=30).solve(lambda z, x: 2 * z + 1, torch.zeros(2, 3, dtype=D64))
    assert res.converged.all()
    torch.testing.assert_close(res.z, torch.full((2, 3), -1.0, dtype=D64))


def rotate_normalised(z, x):
    """``z -> R z / |z|`` with ``R`` a quarter turn: no fixed point, ``|f(z) - z| >= 1``, bounded."""
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=z.dtype)
    return (z / z.norm(dim=1, keepdim=True)) @ rot.T


@pytest.mark.parametrize("mode", ["abs", "rel"])
@pytest.mark.parametrize("name", NAMES)
def test_map_without_fixed_point_is_not_converged_and_returns_the_best_iterate(name, mode):
    z0 = torch.tensor([[1.0, 0.5], [-0.3, 2.0], [0.1, 0.1]], dtype=D64)
    res = get_solver(name, tol=1e-6, max_iter=25, stop_mode=mode).solve(rotate_normalised, z0, record="all")
    assert not res.converged.any() and not res.diverged.any()
    assert (res.nfe == 25).all()
    assert torch.isfinite(res.z).all()
    assert (res.residual >= 1 - 1e-9).all()
    torch.testing.assert_close(res.residual, res.trace.min(dim=0).values)
    for i in range(3):
        j = res.trace[:, i].argmin().item()
        zj = res.trajectory[j, i : i + 1]
        torch.testing.assert_close(res.z[i : i + 1], rotate_normalised(zj, None))
        torch.testing.assert_close(res.abs_residual[i], (rotate_normalised(zj, None) - zj).norm())


def test_wrong_output_shape_is_a_clear_error():
    solver = get_solver("anderson")
    with pytest.raises(ValueError, match=r"shaped like its input z \(2, 3\), got \(2, 4\)"):
        solver.solve(lambda z, x: torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="got list"):
        solver.solve(lambda z, x: [z], torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"got \(2,\)"):
        solver.solve(lambda z, x: z.sum(dim=1), torch.zeros(2, 3))


@pytest.mark.parametrize(
    "z0, match",
    [
        (torch.tensor(1.0), r"shape \(B, \.\.\.\).*got \(\)"),
        (torch.zeros(0, 3), r"B >= 1, got \(0, 3\)"),
        ("zeros", "got str"),
        (torch.zeros(2, 3, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_start_is_a_clear_error(z0, match):
    with pytest.raises(ValueError, match=match):
        get_solver("picard").solve(lambda z, x: z, z0)


def test_a_structured_start_with_a_non_tensor_part_names_the_part():
    with pytest.raises(TypeError, match=r"z0\[0\]\[1\] is a float, not a tensor"):
        get_solver("picard").solve(lambda z, x: z, [[torch.zeros(2, 3), 1.0]])


# --- configuration ---------------------------------------------------------------------------------
def test_unknown_solver_name_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown solver 'newton'.*\['anderson', 'broyden', 'picard'"):
        get_solver("newton")
    with pytest.raises(ConfigError, match="'name' key"):
        get_solver({"memory": 3})


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("anderson", {"memroy": 3}, r"unknown key 'memroy'.*did you mean 'memory'"),
        ("picard", {"memory": 3},
         r"unknown key 'memory'.*allowed keys: \['check_every', 'compact', 'damping'"),
        ("picard", {"stop_mode": "max"}, r"stop_mode='max'.*allowed values: \['rel', 'abs'\]"),
        ("picard", {"max_iter": 0}, r"max_iter=0"),
        ("picard", {"max_iter": 2.5}, r"max_iter=2.5"),
        ("picard", {"tol": -1.0}, r"tol=-1.0"),
        ("picard", {"damping": 0.0}, r"damping=0.0.*\[1e-06, 1.0\]"),
        ("anderson", {"mixing": 1.5}, r"mixing=1.5"),
        ("anderson", {"memory": 0}, r"memory=0"),
        ("broyden", {"memory": 0}, r"memory=0"),
        ("picard", {"compact": "yes"}, r"compact='yes'"),
    ],
)
def test_bad_options_are_config_errors_naming_the_key(name, options, match):
    with pytest.raises(ConfigError, match=match):
        get_solver(name, **options)


def test_get_solver_accepts_dicts_instances_and_overrides():
    solver = get_solver({"name": "anderson", "memory": 3}, tol=1e-7)
    assert isinstance(solver, Anderson)
    assert solver.options.memory == 3 and solver.options.tol == 1e-7
    assert get_solver(solver) is solver
    other = get_solver(solver, max_iter=9)
    assert other is not solver and other.options.max_iter == 9 and other.options.memory == 3
    assert isinstance(Anderson(AndersonOptions(memory=2)).options, AndersonOptions)
    with pytest.raises(ConfigError, match="takes PicardOptions, not AndersonOptions"):
        Picard(AndersonOptions())


def test_per_call_max_iter_override():
    solver = get_solver("picard", tol=0.0, max_iter=50)
    res = solver.solve(lambda z, x: 0.5 * z + 1, torch.zeros(2, 2), max_iter=3)
    assert (res.nfe == 3).all() and res.trace.shape == (3, 2)
    with pytest.raises(ConfigError, match="max_iter=0"):
        solver.solve(lambda z, x: z, torch.zeros(2, 2), max_iter=0)


def test_stats_summarise_the_batch():
    f, inputs, _ = mixed_batch()
    res = get_solver("anderson", tol=1e-10, max_iter=300).solve(f, torch.zeros(4, 8, dtype=D64), inputs)
    stats = res.stats()
    assert stats["nfe"] == pytest.approx(res.nfe.double().mean().item())
    assert stats["converged"] == 1.0
    assert stats["residual_max"] == pytest.approx(res.residual.max().item())


# --- Broyden memory ---------------------------------------------------------------------------------
def captured_state(solver: Solver) -> dict:
    """The state dict the solve loop will use (and mutate), captured for inspection."""
    holder: dict = {}
    original = solver.init_state

    def init_state(z0):
        holder.update(original(z0))
        return holder

    solver.init_state = init_state  # type: ignore[method-assign]
    return holder


def tensor_sizes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_broyden_memory_does_not_grow_with_max_iter():
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(14), dtype=D64))
    w = (q * torch.linspace(-0.95, 0.95, 32, dtype=D64)) @ q.T
    x = 0.1 * torch.randn(3, 32, generator=torch.Generator().manual_seed(15), dtype=D64)
    sizes = []
    for max_iter in (10, 200):
        solver = get_solver("broyden", memory=4, tol=1e-10, max_iter=max_iter)
        state = captured_state(solver)
        res = solver.solve(tanh_map(w), torch.zeros_like(x), x)
        sizes.append(tensor_sizes(state))
        assert state["U"].shape == state["V"].shape == (3, 4, 32)
        assert all(v.numel() <= 3 * 4 * 32 for v in state.values() if isinstance(v, torch.Tensor))
    assert sizes[0] == sizes[1]
    # Many more steps than memory slots (restarts) still reach the fixed point.
    assert res.converged.all() and res.nfe.min() > 8
    reference = picard_reference(tanh_map(w), torch.zeros_like(x), x, steps=1500)
    torch.testing.assert_close(res.z, reference, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_state_size_is_set_by_memory(name):
    solver = get_solver(name, memory=3, tol=0.0, max_iter=40)
    state = captured_state(solver)
    solver.solve(lambda z, x: 0.5 * torch.tanh(z) + 1, torch.zeros(2, 5))
    big = {k: s for k, s in tensor_sizes(state).items() if len(s) == 3}
    assert big and all(s[:2] == (2, 3) for s in big.values())


# --- registry --------------------------------------------------------------------------------------
@dataclasses.dataclass
class HalfStepOptions(SolverOptions):
    step_size: float = 0.5


class HalfStep(Solver):
    """``z <- z + step_size (f(z) - z)``, a user solver."""

    name = "halfstep"
    Options = HalfStepOptions

    def step(self, state, it, z, fz, active):
        return z + self.options.step_size * (fz - z)


@pytest.fixture
def halfstep():
    register_solver(HalfStep)
    yield HalfStep
    SOLVERS.pop("halfstep", None)


def test_register_solver_makes_a_user_solver_available(halfstep):
    from cdeq.deq import SolverSpec

    assert "halfstep" in SOLVERS
    solver = get_solver("halfstep", step_size=0.5, tol=1e-10, max_iter=200)
    assert isinstance(solver, HalfStep)
    res = solver.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 3, dtype=D64), torch.ones(2, 3, dtype=D64))
    assert res.converged.all()
    torch.testing.assert_close(res.z, torch.full((2, 3), 2.0, dtype=D64))
    # contraction of the half step: 1 - 0.5 * (1 - 0.5) = 0.75 per step
    assert 60 <= int(res.nfe[0]) <= 100
    assert isinstance(SolverSpec(name="halfstep", options={"step_size": 0.25}).build(), HalfStep)
    with pytest.raises(ConfigError, match="step_sise"):
        get_solver("halfstep", step_sise=0.1)


def test_register_solver_needs_a_name():
    class Nameless(Solver):
        pass

    with pytest.raises(ValueError, match="Nameless needs a non-empty class attribute 'name'"):
        register_solver(Nameless)


def test_builtin_solvers_are_registered():
    assert SOLVERS["picard"] is Picard and SOLVERS["anderson"] is Anderson and SOLVERS["broyden"] is Broyden


# --- docstrings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "module",
    ["cdeq.solvers", "cdeq.solvers.base", "cdeq.solvers.picard", "cdeq.solvers.anderson",
     "cdeq.solvers.broyden"],
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_one_relative_residual_formula():
    """The solvers' relative residual and the relative error of a state to its image are the same
    numbers, bit for bit (one formula: cdeq.engine.tree.relative), and so is the evaluation's
    recomputation of a solver's trace."""
    from cdeq.engine.tree import relative_error
    from cdeq.solvers.loop import residuals

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 3, 4, generator=gen)
    fz = torch.tanh(z + 0.1 * torch.randn(5, 3, 4, generator=gen))
    res, _, _ = residuals(fz.reshape(5, -1), z.reshape(5, -1), True)
    assert torch.equal(res, relative_error(z, fz))


def test_a_solver_is_named_by_its_name_or_a_spec_and_the_old_forms_warn():
    """One way to name a solver in the API: a registered name with keyword options, or a
    ``SolverSpec`` (a mapping from a file is read by ``SolverSpec.from_dict``); a dict or a built
    solver still work for one release, with a warning."""
    from cdeq.deq import DEQ
    from cdeq.solvers import SolverSpec

    spec = SolverSpec(name="picard", max_iter=7, tol=0.0, options={"damping": 0.5})
    by_name = get_solver("picard", max_iter=7, tol=0.0, damping=0.5)
    assert get_solver(spec).options == by_name.options == spec.build().options
    assert SolverSpec.from_json({"name": "picard", "max_iter": 7, "tol": 0.0, "damping": 0.5}) == spec
    assert DEQ(torch.tanh, solver=spec).solver.options == by_name.options
    with pytest.warns(DeprecationWarning, match="naming a solver by a dict is deprecated"):
        assert get_solver({"name": "picard", "damping": 0.5}, max_iter=7, tol=0.0).options == by_name.options
    with pytest.warns(DeprecationWarning, match="by a built Solver"):
        assert DEQ(torch.tanh, solver=by_name).solver is by_name
