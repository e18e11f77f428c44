"""Property-based tests of the solvers on random contractive maps (hypothesis).

For ``f(z, x) = tanh(A z + x)`` or ``A z + x`` with ``|A|_2 = rho < 1`` (a contraction with
Lipschitz constant ``rho``) every solver either returns a fixed point within tolerance or flags the
sample as not converged; the distance to the true fixed point obeys ``|z - z*| <= |f(z) - z| /
(1 - rho)``; Picard, whose convergence the contraction guarantees, always converges.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cdeq.solvers import get_solver

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
