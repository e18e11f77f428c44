"""Behaviour of the DEQ layer: gradients of each backward strategy, solver modes, regularisers."""

from __future__ import annotations

import doctest
import gc
import importlib
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from cdeq.deq import (
    DEQ,
    ImplicitBackward,
    JacobianFreeBackward,
    PhantomBackward,
    SolverSpec,
    apply_weight_norm,
    get_backward,
    jacobian_frobenius,
    spectral_radius,
)
from cdeq.engine.config import ConfigError
from cdeq.solvers import Anderson, Broyden, Picard, get_solver

D64 = torch.float64


class TanhCell(nn.Module):
    """``f(z, x) = tanh(W z + b + U x)`` with ``|W|_2 = norm`` (a contraction for ``norm < 1``)."""

    def __init__(self, d: int = 4, d_in: int = 3, norm: float = 0.6, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(d, d, generator=gen, dtype=D64)
        self.W = nn.Parameter(norm * w / torch.linalg.matrix_norm(w, ord=2))
        self.b = nn.Parameter(0.3 * torch.randn(d, generator=gen, dtype=D64))
        self.U = nn.Parameter(torch.randn(d, d_in, generator=gen, dtype=D64) / d_in**0.5)
        self.d = d

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.b + x @ self.U.T)

    def state_shape(self, x: torch.Tensor) -> tuple[int, int]:
        return (x.shape[0], self.d)


def exact_deq(cell: nn.Module, backward=None) -> DEQ:
    return DEQ(
        cell,
        solver=get_solver("anderson", tol=1e-14, max_iter=200, stop_mode="abs"),
        backward=backward or ImplicitBackward(solver="anderson", tol=1e-13, max_iter=200),
    )


def loss_of(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (weights * z).sum() + 0.5 * (z**2).sum()


def setup(seed: int = 0, batch: int = 2):
    cell = TanhCell(seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(batch, 3, generator=gen, dtype=D64)
    weights = torch.randn(batch, 4, generator=gen, dtype=D64)
    return cell, x, weights


def flat_grads(tensors) -> torch.Tensor:
    return torch.cat([t.grad.reshape(-1) for t in tensors])


def true_gradient(cell, x, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient (parameters, x) of the loss at the fixed point, by implicit differentiation."""
    cell.zero_grad()
    x = x.clone().requires_grad_()
    z, _ = exact_deq(cell)(x)
    loss_of(z, weights).backward()
    return flat_grads(cell.parameters()), x.grad.clone()


def finite_difference(cell, x, weights, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    deq = exact_deq(cell)

    def loss() -> float:
        with torch.no_grad():
            return float(loss_of(deq.solve(x).z, weights))

    grads = []
    for tensor in [*cell.parameters(), x]:
        g = torch.zeros_like(tensor).reshape(-1)
        flat = tensor.data.reshape(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            up = loss()
            flat[i] = old - eps
            down = loss()
            flat[i] = old
            g[i] = (up - down) / (2 * eps)
        grads.append(g)
    return torch.cat(grads[:-1]), grads[-1].reshape(x.shape)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


# --- gradients --------------------------------------------------------------------------------------
def test_implicit_gradient_matches_central_finite_differences():
    cell, x, weights = setup()
    grad_params, grad_x = true_gradient(cell, x, weights)
    fd_params, fd_x = finite_difference(cell, x, weights)
    assert rel_err(grad_params, fd_params) < 1e-5
    assert rel_err(grad_x, fd_x) < 1e-5
    assert grad_params.norm() > 0.1 and grad_x.norm() > 0.1  # not trivially zero


def test_implicit_gradient_matches_unrolled_backprop():
    cell, x, weights = setup(seed=1, batch=3)
    grad_params, grad_x = true_gradient(cell, x, weights)
    cell.zero_grad()
    xg = x.clone().requires_grad_()
    z = torch.zeros(3, 4, dtype=D64)
    for _ in range(150):  # 0.6^150 ~ 1e-33: the unrolled iterate is the fixed point
        z = cell(z, xg)
    loss_of(z, weights).backward()
    assert rel_err(grad_params, flat_grads(cell.parameters())) < 1e-8
    assert rel_err(grad_x, xg.grad) < 1e-8


def test_implicit_backward_solves_the_adjoint_fixed_point():
    cell, x, weights = setup(seed=2)
    backward = ImplicitBackward(solver="broyden", tol=1e-12, max_iter=100)
    z, _ = exact_deq(cell, backward)(x)
    assert backward.last_stats is None
    loss_of(z, weights).backward()
    stats = backward.last_stats
    assert stats is not None and stats.converged.all() and stats.nfe.max() > 2
    grad_anderson, _ = true_gradient(cell, x, weights)
    cell.zero_grad()
    z, _ = exact_deq(cell, backward)(x)
    loss_of(z, weights).backward()
    assert rel_err(flat_grads(cell.parameters()), grad_anderson) < 1e-9


def test_implicit_backward_keeps_no_tensor_alive_after_the_step():
    # a hook holding its own output strongly would keep every training step's graph in memory
    cell, x, weights = setup(seed=3)
    z, _ = exact_deq(cell)(x.clone().requires_grad_())
    alive = weakref.ref(z)
    loss_of(z, weights).backward()
    del z
    gc.collect()
    assert alive() is None


def test_implicit_gradient_is_exact_when_the_output_is_dropped_or_reused():
    cell, x, weights = setup(seed=4)
    grad_params, _ = true_gradient(cell, x, weights)
    cell.zero_grad()
    loss = loss_of(exact_deq(cell)(x)[0], weights)  # the DEQ's output tensor is gone before backward
    loss.backward(retain_graph=True)
    assert rel_err(flat_grads(cell.parameters()), grad_params) < 1e-9
    cell.zero_grad()
    loss.backward()  # a second pass through the same graph is still the implicit gradient
    assert rel_err(flat_grads(cell.parameters()), grad_params) < 1e-9


@pytest.mark.parametrize(
    "backward, min_cos",
    [(PhantomBackward(steps=5, damping=0.5), 0.95), (JacobianFreeBackward(), 0.5)],
)
def test_approximate_gradients_point_the_same_way_as_the_true_gradient(backward, min_cos):
    cell, x, weights = setup(seed=3, batch=4)
    grad_params, grad_x = true_gradient(cell, x, weights)
    cell.zero_grad()
    xg = x.clone().requires_grad_()
    z, _ = exact_deq(cell, backward)(xg)
    loss_of(z, weights).backward()
    approx_params = flat_grads(cell.parameters())
    assert cosine(approx_params, grad_params) > min_cos
    assert cosine(xg.grad.reshape(-1), grad_x.reshape(-1)) > min_cos
    assert not torch.allclose(approx_params, grad_params, rtol=1e-3)  # an approximation, not exact


def test_jacobian_free_is_a_one_step_undamped_phantom_gradient():
    grads = []
    for backward in (JacobianFreeBackward(), PhantomBackward(steps=1, damping=1.0)):
        cell, x, weights = setup(seed=3)
        z, _ = exact_deq(cell, backward)(x)
        loss_of(z, weights).backward()
        grads.append(flat_grads(cell.parameters()))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_phantom_gradient_improves_with_more_steps():
    cell, x, weights = setup(seed=4, batch=4)
    grad_params, _ = true_gradient(cell, x, weights)
    errors = []
    for steps in (1, 4, 16):
        cell.zero_grad()
        z, _ = exact_deq(cell, PhantomBackward(steps=steps, damping=0.9))(x)
        loss_of(z, weights).backward()
        errors.append(rel_err(flat_grads(cell.parameters()), grad_params))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jacobian_free"])
def test_forward_value_is_the_fixed_point_whatever_the_backward(backward):
    cell, x, _ = setup(seed=5)
    deq = DEQ(cell, solver=get_solver("anderson", tol=1e-12, max_iter=100), backward=backward)
    z, info = deq(x)
    assert z.requires_grad
    assert info.converged.all()
    torch.testing.assert_close(z.detach(), info.z, rtol=0, atol=1e-10)
    torch.testing.assert_close(cell(z, x), z, rtol=0, atol=1e-10)


def test_no_graph_when_no_gradient_is_needed():
    cell, x, _ = setup(seed=6)
    deq = DEQ(cell).eval()
    cell.requires_grad_(False)
    z, info = deq(x)
    assert z is info.z and not z.requires_grad
    with torch.no_grad():
        cell.requires_grad_(True)
        z, info = deq.train()(x)
        assert not z.requires_grad


# --- solvers by mode --------------------------------------------------------------------------------
def test_train_and_eval_solvers_are_used_in_their_modes():
    cell, x, _ = setup(seed=7)
    deq = DEQ(
        cell,
        solver=get_solver("picard", tol=0.0, max_iter=3),
        eval_solver={"name": "broyden", "tol": 0.0, "max_iter": 7},
    )
    assert isinstance(deq.solver, Picard) and isinstance(deq.eval_solver, Broyden)
    _, info = deq.train()(x)
    assert (info.nfe == 3).all()
    with torch.no_grad():
        _, info = deq.eval()(x)
    assert (info.nfe == 7).all()
    _, info = deq.train()(x)
    assert (info.nfe == 3).all()
    # An explicit solver overrides the mode's.
    info = deq.solve(x, solver=get_solver("picard", tol=0.0, max_iter=2))
    assert (info.nfe == 2).all()


def test_eval_solver_defaults_to_the_training_solver_and_names_take_the_defaults():
    cell, x, _ = setup(seed=8)
    deq = DEQ(cell, solver="anderson", max_iter=9, tol=1e-3)
    assert deq.eval_solver is deq.solver
    assert isinstance(deq.solver, Anderson)
    assert deq.solver.options.max_iter == 9 and deq.solver.options.tol == 1e-3
    deq = DEQ(cell, solver={"name": "picard", "damping": 0.5}, max_iter=4, tol=0.0)
    assert deq.solver.options.damping == 0.5 and deq.solver.options.max_iter == 4
    _, info = deq(x)
    assert (info.nfe == 4).all()
    spec = SolverSpec(name="broyden", max_iter=6, tol=0.0, options={"memory": 2})
    deq = DEQ(cell, solver=spec)
    assert isinstance(deq.solver, Broyden) and deq.solver.options.memory == 2
    _, info = deq(x)
    assert (info.nfe == 6).all()


def test_initial_state_comes_from_state_shape_or_z0():
    cell, x, _ = setup(seed=9)
    deq = DEQ(cell)
    assert torch.equal(deq.initial_state(x), torch.zeros(2, 4, dtype=D64))
    z0 = torch.full((2, 4), 0.1, dtype=D64)
    info = deq.solve(x, z0=z0, record=[0])
    assert torch.equal(info.trajectory[0], z0)
    plain = DEQ(lambda z, x: torch.tanh(0.5 * z + x))
    assert torch.equal(plain.initial_state(x), torch.zeros_like(x))
    # a structured injection: zeros like each of its parts, in its structure
    z0 = plain.initial_state({"a": x, "b": (x[:, :2],)})
    assert set(z0) == {"a", "b"} and torch.equal(z0["b"][0], torch.zeros(2, 2, dtype=D64))
    # a part that cannot be a state (integer ids, a sparse adjacency) needs state_shape or z0
    with pytest.raises(ValueError, match="state_shape"):
        plain.initial_state((x, torch.zeros(2, 3, dtype=torch.long)))


# --- regularisers -----------------------------------------------------------------------------------
def test_jacobian_frobenius_matches_the_exact_norm_of_a_linear_map():
    gen = torch.Generator().manual_seed(10)
    d, batch, samples = 6, 64, 100
    a = torch.randn(d, d, generator=gen, dtype=D64)
    z = torch.randn(batch, d, generator=gen, dtype=D64, requires_grad=True)
    torch.manual_seed(11)
    estimate = jacobian_frobenius(z @ a.T, z, samples=samples, create_graph=False)
    exact = (a**2).sum() / d  # |J|_F^2 / dim for every sample
    # Hutchinson: var(|J^T v|^2) = 2 |J J^T|_F^2 per probe; batch * samples independent probes.
    std = (2 * ((a @ a.T) ** 2).sum()).sqrt() / d / (batch * samples) ** 0.5
    assert abs(float(estimate - exact)) < 5 * float(std)
    assert float(std) < 0.02 * float(exact)  # so the check is tight


def test_jacobian_frobenius_is_differentiable_and_needs_a_graph():
    w = torch.randn(5, 5, dtype=D64, requires_grad=True)
    z = torch.randn(3, 5, dtype=D64, requires_grad=True)
    penalty = jacobian_frobenius(torch.tanh(z @ w.T), z, samples=2)
    penalty.backward()
    assert w.grad is not None and w.grad.norm() > 0
    with pytest.raises(ValueError, match="require grad"):
        jacobian_frobenius(z.detach() * 2, z.detach())


@pytest.mark.parametrize("top", [0.9, -0.9])
def test_spectral_radius_of_a_known_symmetric_matrix(top):
    gen = torch.Generator().manual_seed(12)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=D64))
    eig = torch.tensor([top, 0.5, -0.4, 0.3, 0.2, -0.1, 0.05, 0.0], dtype=D64)
    m = (q * eig) @ q.T
    z = torch.randn(3, 8, generator=gen, dtype=D64)
    rho = spectral_radius(lambda z, x: z @ m.T + x, z, torch.zeros(3, 8, dtype=D64), iters=60)
    assert rho.shape == (3,)
    torch.testing.assert_close(rho, torch.full((3,), 0.9, dtype=D64), rtol=1e-6, atol=0)


def test_spectral_radius_is_per_sample():
    z = torch.zeros(2, 3, dtype=D64)
    scale = torch.tensor([[0.3], [1.2]], dtype=D64)
    rho = spectral_radius(lambda z, x: x * z, z, scale, iters=5)
    torch.testing.assert_close(rho, torch.tensor([0.3, 1.2], dtype=D64))


def small_net() -> nn.Module:
    torch.manual_seed(13)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Conv1d(1, 2, 3))


def test_weight_norm_reparametrises_without_changing_the_function():
    net = small_net()
    x = torch.randn(4, 1, 6)
    before = net(x)
    assert apply_weight_norm(net, "weight") is net
    assert parametrize.is_parametrized(net[0], "weight") and parametrize.is_parametrized(net[2], "weight")
    assert {n for n, _ in net[0].parametrizations.weight.named_parameters()} == {"original0", "original1"}
    torch.testing.assert_close(net(x), before)
    # The weight is magnitude * direction: doubling the magnitude doubles the weight.
    weight = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].parametrizations.weight.original0.mul_(2.0)
    torch.testing.assert_close(net[0].weight.detach(), 2 * weight)


def test_spectral_norm_makes_the_largest_singular_value_one():
    net = small_net()
    with torch.no_grad():
        net[0].weight.mul_(5.0)
    apply_weight_norm(net, "spectral")
    net.train()
    for _ in range(30):  # each training-mode access runs one more power-iteration step
        net(torch.randn(2, 1, 6))
    for layer in (net[0], net[2]):
        sigma = torch.linalg.matrix_norm(layer.weight.detach().reshape(layer.weight.shape[0], -1), ord=2)
        assert abs(float(sigma) - 1.0) < 1e-3


def test_weight_norm_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind='batch'.*'weight' or 'spectral'"):
        apply_weight_norm(small_net(), "batch")


# --- configuration ----------------------------------------------------------------------------------
def test_solver_spec_rejects_unknown_keys_and_values():
    with pytest.raises(ConfigError, match=r"unknown key 'max_iters' in SolverSpec.*did you mean 'max_iter'"):
        SolverSpec.from_dict({"name": "anderson", "max_iters": 5})
    with pytest.raises(ConfigError, match=r"name='newton'.*\['anderson', 'broyden', 'picard'\]"):
        SolverSpec(name="newton")
    with pytest.raises(ConfigError, match=r"unknown key 'memroy'.*did you mean 'memory'"):
        SolverSpec(name="anderson", options={"memroy": 3})
    with pytest.raises(ConfigError, match="stop_mode='l2'"):
        SolverSpec(stop_mode="l2")
    spec = SolverSpec.from_dict({"name": "broyden", "max_iter": 12, "options": {"memory": 4}})
    solver = spec.build(tol=1e-6)
    assert isinstance(solver, Broyden)
    assert (solver.options.max_iter, solver.options.memory, solver.options.tol) == (12, 4, 1e-6)


def test_a_partial_nested_section_keeps_the_fields_own_defaults():
    from cdeq.run.teacher import TeacherConfig

    default = TeacherConfig().train_solver
    cfg = TeacherConfig.from_dict({"train_solver": {"max_iter": 7}})
    assert cfg.train_solver.max_iter == 7
    assert (cfg.train_solver.name, cfg.train_solver.tol) == (default.name, default.tol)
    assert default.tol != SolverSpec().tol  # the field's default differs from the class default


def test_get_backward_rejects_unknown_names_and_keys():
    allowed = r"\['implicit', 'jacobian_free', 'phantom'\]"
    with pytest.raises(ConfigError, match=r"unknown backward 'implicitt'.*" + allowed):
        get_backward("implicitt")
    with pytest.raises(ConfigError, match=r"unknown key 'step' in backward 'phantom'.*did you mean 'steps'"):
        get_backward({"name": "phantom", "step": 3})
    with pytest.raises(ConfigError, match="unknown key 'tol'"):
        get_backward({"name": "jacobian_free", "tol": 1e-3})
    with pytest.raises(ConfigError, match="steps=0"):
        get_backward({"name": "phantom", "steps": 0})
    with pytest.raises(ConfigError, match="unknown solver 'newton'"):
        get_backward({"name": "implicit", "solver": "newton"})
    phantom = get_backward({"name": "phantom", "steps": 3, "damping": 0.7})
    assert isinstance(phantom, PhantomBackward) and phantom.extra_nfe == 3
    implicit = get_backward({"name": "implicit", "solver": "broyden", "tol": 1e-8})
    assert isinstance(implicit.solver, Broyden) and implicit.solver.options.tol == 1e-8
    assert get_backward(phantom) is phantom
    with pytest.raises(ConfigError, match="unknown backward"):
        DEQ(TanhCell(), backward="exact")


def test_register_backward_makes_a_user_strategy_available_with_its_fields_as_keys():
    import dataclasses

    from cdeq.deq import BACKWARDS, BackwardStrategy, register_backward
    from cdeq.engine.config import Config

    @dataclasses.dataclass
    class ScaledOptions(Config):
        scale: float = 1.0

    class Scaled(BackwardStrategy):
        """One step from z*, its gradient scaled (a user strategy)."""

        name = "scaled"
        Options = ScaledOptions

        def __init__(self, scale: float = 1.0) -> None:
            self.scale = scale

        def attach(self, f, z_star, x):
            out = f(z_star.detach(), x)
            return out.detach() + self.scale * (out - out.detach())

    register_backward(Scaled)
    try:
        assert sorted(BACKWARDS) == ["implicit", "jacobian_free", "phantom", "scaled"]
        strategy = get_backward({"name": "scaled", "scale": 0.5})
        assert isinstance(strategy, Scaled) and strategy.scale == 0.5
        with pytest.raises(ConfigError, match=r"unknown key 'scal' in backward 'scaled'.*\['scale'\]"):
            get_backward({"name": "scaled", "scal": 2})
        cell = TanhCell()
        x = torch.randn(3, 3, dtype=D64)
        for scale in (1.0, 0.5):
            deq = DEQ(cell, backward={"name": "scaled", "scale": scale}, tol=1e-10, max_iter=100)
            z, _ = deq(x)
            cell.zero_grad()
            z.sum().backward()
            grads = cell.W.grad.clone()
            if scale == 1.0:
                full = grads
        torch.testing.assert_close(grads, 0.5 * full)
    finally:
        BACKWARDS.pop("scaled", None)
    with pytest.raises(ValueError, match="needs a non-empty class attribute 'name'"):
        register_backward(type("Nameless", (BackwardStrategy,), {}))


# --- docstrings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["cdeq.deq.layer", "cdeq.deq.backward", "cdeq.deq.regularizers"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
