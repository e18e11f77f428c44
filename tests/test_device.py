"""The GPU path, tested on CPU: device-agnostic tensor creation, the meta device, bf16 autocast,
``check_every`` and a reference implementation of the solve loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cdeq.deq import DEQ, jacobian_frobenius, spectral_radius
from cdeq.engine.config import ConfigError
from cdeq.engine.precision import autocast, resolve_device
from cdeq.solvers import get_solver, loop

NAMES = ["picard", "anderson", "broyden"]
D64 = torch.float64
SRC = str(Path(__file__).resolve().parents[1] / "src" / "cdeq")
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.eye, torch.tensor,
             torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint, torch.randperm}


class FactoryDeviceCheck(TorchFunctionMode):
    """Records every tensor factory called directly from cdeq's code without ``device=``: on a GPU
    such a tensor lands on the CPU and meets the GPU tensors it is combined with."""

    def __init__(self, root: str = SRC) -> None:
        super().__init__()
        self.root = root
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = sys._getframe(1)
            path = frame.f_code.co_filename
            if path.startswith(self.root):
                self.found.append(f"{path[len(self.root) + 1:]}:{frame.f_lineno}")
        return func(*args, **kwargs)


def mixed_problem(dtype=D64):
    """Samples contract by 0.1, 0.97, 0.1, 0.97, 0.5; sample 5 does not contract (Picard does not
    converge on it in 60 steps, the secant solvers do) and sample 6 has a NaN input."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=gen, dtype=dtype)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    scale = torch.tensor([0.1, 0.97, 0.1, 0.97, 0.5, 3.0, 0.5], dtype=dtype)[:, None]
    x = torch.randn(7, 8, generator=gen, dtype=dtype)
    x[6, 2] = float("nan")
    calls: list[int] = []

    def f(z, inputs):
        calls.append(z.shape[0])
        return torch.tanh(inputs[1] * (z @ w.T) + inputs[0])

    return f, (x, scale), calls


def reference_solve(solver, f, z0, x, limit):
    """The documented semantics, one sample at a time, without any bookkeeping tricks."""
    opts = solver.options
    out = {"z": [], "nfe": [], "residual": [], "converged": [], "diverged": [], "trace": []}
    for i in range(z0.shape[0]):
        xi = tuple(t[i : i + 1] for t in x)
        z = z0[i : i + 1].clone()
        state = solver.init_state(z)
        best, best_z, trace, conv, div = torch.inf, z.clone(), [], False, False
        for k in range(limit):
            fz = f(z, xi)
            g = fz - z
            res = float(g.norm()) / (float(fz.norm()) + 1e-12 if opts.stop_mode == "rel" else 1.0)
            finite = bool(torch.isfinite(g).all()) and res == res
            res = res if finite else torch.inf
            trace.append(res)
            if res < best:
                best, best_z = res, fz
            if not finite or res <= opts.tol:
                conv, div = finite, not finite
                break
            if k == limit - 1:
                break
            state["g"] = g
            z = solver.step(state, k, z, fz, torch.ones(1, dtype=torch.bool))
        for key, value in zip(out, [best_z[0], len(trace), best, conv, div, trace], strict=True):
            out[key].append(value)
    return out


@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("compact", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_solve_matches_a_per_sample_reference_loop(name, compact, check_every):
    f, x, _ = mixed_problem()
    z0 = torch.zeros(7, 8, dtype=D64)
    solver = get_solver(name, tol=1e-9, max_iter=60, compact=compact, check_every=check_every,
                        on_nonfinite="ignore")
    res = solver.solve(f, z0, x)
    ref = reference_solve(solver, f, z0, x, 60)
    assert res.nfe.tolist() == ref["nfe"]
    assert res.converged.tolist() == ref["converged"]
    assert res.converged.tolist() == [True] * 5 + [name != "picard", False]
    assert res.diverged.tolist() == ref["diverged"] == [False] * 6 + [True]
    torch.testing.assert_close(res.z, torch.stack(ref["z"]), rtol=0, atol=1e-11)
    torch.testing.assert_close(res.residual, torch.tensor(ref["residual"], dtype=D64), rtol=1e-6, atol=0)
    k = max(ref["nfe"])
    assert res.trace.shape == (k, 7)
    for i, trace in enumerate(ref["trace"]):  # a stopped sample repeats its last residual
        padded = torch.tensor(trace + [trace[-1]] * (k - len(trace)), dtype=D64)
        torch.testing.assert_close(res.trace[:, i], padded, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_check_every_changes_only_the_work_not_the_result(name, monkeypatch):
    f, x, calls = mixed_problem()
    checks = []
    original = loop.check
    monkeypatch.setattr(loop, "check", lambda *a: checks.append(1) or original(*a))

    def run(n, compact):
        calls.clear()
        checks.clear()
        solver = get_solver(name, tol=1e-9, max_iter=60, on_nonfinite="ignore", check_every=n,
                            compact=compact)
        return solver.solve(f, torch.zeros(7, 8, dtype=D64), x, record="all"), sum(calls), len(checks)

    keys = ("z", "residual", "abs_residual", "trace", "trajectory")
    for compact in (True, False):
        every, rows_every, checks_every = run(1, compact)
        k = int(every.nfe.max())
        assert checks_every == min(k, 59)  # one per iteration but the last
        for n in (3, 1000):
            res, rows, n_checks = run(n, compact)
            assert torch.equal(res.nfe, every.nfe) and torch.equal(res.converged, every.converged)
            assert n_checks == min(-(-k // n), 59 // n)  # fewer host synchronisations ...
            assert rows >= rows_every  # ... and stopped rows evaluated until the next check
            for key in keys:
                if compact:  # f sees other row sets, so a batched kernel may round differently
                    torch.testing.assert_close(getattr(res, key), getattr(every, key), rtol=0,
                                               atol=1e-12, equal_nan=True)
                else:  # the same rows reach the same kernels: bit for bit
                    assert torch.equal(getattr(res, key).nan_to_num(7.0),
                                       getattr(every, key).nan_to_num(7.0))
        if compact:
            assert rows > rows_every


# --- devices -------------------------------------------------------------------------------------
class Cell(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.channels, self.channel_dim = d, -1
        with torch.no_grad():
            self.lin.weight.mul_(0.5 / torch.linalg.matrix_norm(self.lin.weight, ord=2))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)

    def state_shape(self, x):
        return x.shape


@pytest.mark.parametrize("name", NAMES)
def test_solvers_create_every_tensor_on_the_input_device(name):
    f, x, _ = mixed_problem(torch.float32)
    with FactoryDeviceCheck() as check:
        for n in (1, 3):
            get_solver(name, max_iter=30, check_every=n, on_nonfinite="ignore").solve(
                f, torch.zeros(7, 8), x, record="all")
    assert check.found == []


@pytest.mark.parametrize("backward", ["implicit", "phantom", "jacobian_free"])
def test_deq_forward_backward_and_regularisers_create_tensors_on_the_input_device(backward):
    deq = DEQ(Cell(), backward=backward, tol=1e-6)
    x = torch.randn(5, 6)
    with FactoryDeviceCheck() as check:
        z, info = deq(x)
        z_in = z.detach().requires_grad_()
        penalty = jacobian_frobenius(deq.f(z_in, x), z_in)
        (z.pow(2).sum() + penalty).backward()
        spectral_radius(deq.f, z.detach(), x, iters=3)
    assert check.found == []
    assert deq.cell.lin.weight.grad is not None


def test_the_factory_check_finds_a_tensor_made_without_a_device(tmp_path):
    source = tmp_path / "lib.py"
    source.write_text("import torch\n\ndef rows(x):\n    return x[torch.arange(x.shape[0])]\n\n"
                      "def rows_ok(x):\n    return x[torch.arange(x.shape[0], device=x.device)]\n")
    namespace: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    with FactoryDeviceCheck(root=str(tmp_path)) as check:
        namespace["rows_ok"](torch.zeros(3, 2))
        assert check.found == []
        namespace["rows"](torch.zeros(3, 2))
    assert check.found == ["lib.py:4"]


@pytest.mark.parametrize("pairs", ["uniform", "early", "curriculum"])
def test_a_distillation_step_creates_tensors_on_the_input_device(pairs):
    from cdeq.consistency import ConsistencyStudent
    from cdeq.consistency.distill import DistillConfig, distill
    from cdeq.consistency.trajectory import RecordConfig, record_batch
    from cdeq.deq import DEQModel

    torch.manual_seed(0)
    model = DEQModel(nn.Linear(4, 6), Cell(), nn.Linear(6, 3), tol=1e-6).eval()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    student = ConsistencyStudent(model)
    with FactoryDeviceCheck() as check:
        batch = record_batch(model, x, y, RecordConfig())
        before = [p.detach().clone() for p in student.cell.parameters()]
        distill(student, [batch], DistillConfig(epochs=1, batch_size=4, pairs=pairs, kl_weight=0.1),
                nn.functional.cross_entropy)
        student._run_plan(student.inject(x), [("jump", 0.1), ("step",), ("jump", 1.0)])
    assert any(not torch.equal(a, b) for a, b in zip(before, student.cell.parameters(), strict=True))
    # Tensors made on the CPU whatever the input's device; remove an entry once its file is fixed
    # (listed in docs/how-to/gpu.md).
    pending = ("consistency/schedule.py",)
    assert [where for where in check.found if not where.startswith(pending)] == []


def test_the_loop_body_runs_on_the_meta_device_without_a_host_sync():
    """Between two checks the loop makes no host synchronisation: on ``meta`` (no data) any
    ``bool(tensor)``, ``.item()`` or ``nonzero`` would raise."""
    from cdeq.engine.tree import Layout

    w = torch.randn(8, 8, device="meta")
    f = lambda z, x: torch.tanh(z @ w.T + x)  # noqa: E731
    x = torch.randn(4, 8, device="meta")
    for name in NAMES:
        solver = get_solver(name, max_iter=10)
        state_loop = loop.LoopState.start(torch.zeros(4, 8, device="meta"))
        state = solver.init_state(state_loop.z)
        for it in range(6):
            fz = loop.evaluate(state_loop, f, x, Layout.of(state_loop.z), True,
                               loop.caller_autocast(x.device))
            g = fz - state_loop.z
            loop.update(state_loop, fz, *loop.residuals(fz, state_loop.z, True), 1e-4)
            state["g"] = g
            state_loop.z = torch.where(state_loop.active[:, None],
                                       solver.step(state, it, state_loop.z, fz, state_loop.active),
                                       state_loop.z)
        assert state_loop.z.device.type == "meta" and state_loop.best_z.shape == (4, 8)
    with pytest.raises((NotImplementedError, RuntimeError)):  # a whole solve checks, so it cannot
        get_solver("picard").solve(f, torch.zeros(4, 8, device="meta"), x)


def test_a_masked_solve_reads_the_device_once_and_a_training_jump_never():
    """Per-sample stopping by masking (``compact=False``) with one check per ``max_iter``: a whole
    solve reads one value on the host (its end); the student's jump at per-sample times runs on
    the ``meta`` device (no data: any host read raises), forward and backward."""
    from cdeq.consistency import ConsistencyStudent
    from cdeq.deq import DEQModel

    reads = []

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__bool__", "__int__", "__float__", "item",
                                                  "tolist", "nonzero"):
                reads.append(func.__name__)
            return func(*args, **(kwargs or {}))

    f = Cell(8)
    x = torch.randn(5, 8)
    with Reads():
        res = get_solver("anderson", max_iter=20, tol=1e-3, compact=False, check_every=20).solve(
            f, torch.zeros(5, 8), x)
    assert reads == ["tolist"] and bool(res.converged.all())
    torch.manual_seed(0)
    student = ConsistencyStudent(DEQModel(nn.Linear(4, 8), Cell(8), nn.Linear(8, 3))).to("meta")
    u = torch.randn(5, 8, device="meta")
    t = torch.rand(5, device="meta")
    out = student.F(torch.zeros(5, 8, device="meta"), t, u)
    out.sum().backward()
    grads = [p.grad for p in student.time_embed.parameters() if p.grad is not None]
    assert out.shape == (5, 8) and grads and all(g.device.type == "meta" for g in grads)


@pytest.mark.parametrize("backward", ["phantom", "jacobian_free"])
def test_unrolled_backwards_run_on_the_meta_device(backward):
    cell = Cell().to("meta")
    from cdeq.deq import get_backward

    z_star = torch.zeros(3, 6, device="meta")
    z = get_backward(backward).attach(cell, z_star, torch.randn(3, 6, device="meta"))
    z.sum().backward()
    assert cell.lin.weight.grad.device.type == "meta"


# --- precision ----------------------------------------------------------------------------------
class SolverOpDtypes(TorchFunctionMode):
    """Output dtypes of the operations the solver files run themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: dict[str, set] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        path = sys._getframe(1).f_code.co_filename
        if path.startswith(str(Path(SRC) / "solvers")) and isinstance(out, (torch.Tensor, tuple)):
            first = out if isinstance(out, torch.Tensor) else out[0]
            if isinstance(first, torch.Tensor) and first.is_floating_point():
                self.dtypes.setdefault(getattr(func, "__name__", str(func)), set()).add(first.dtype)
        return out


@pytest.mark.parametrize("name", NAMES)
def test_solvers_under_bf16_autocast_keep_their_arithmetic_in_float32(name):
    torch.manual_seed(1)
    lin = nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.mul_(0.9 / torch.linalg.matrix_norm(lin.weight, ord=2))
    seen = []

    def f(z, x):
        h = lin(z)
        seen.append((torch.is_autocast_enabled("cpu"), h.dtype))
        return torch.tanh(h + x)

    x = torch.randn(16, 32)
    exact = get_solver(name, tol=1e-7, max_iter=200).solve(f, torch.zeros(16, 32), x)
    seen.clear()
    with autocast("bf16", "cpu"), SolverOpDtypes() as ops:
        res = get_solver(name, tol=1e-2, max_iter=200).solve(f, torch.zeros(16, 32), x)
    assert set(seen) == {(True, torch.bfloat16)}  # f itself ran under autocast
    assert res.z.dtype == res.residual.dtype == torch.float32
    assert res.converged.all()
    assert float(((res.z - exact.z).norm(dim=1) / exact.z.norm(dim=1)).max()) < 3e-2
    assert all(d == {torch.float32} for d in ops.dtypes.values()), ops.dtypes
    if name == "anderson":
        assert "bmm" in ops.dtypes and any("solve" in op for op in ops.dtypes)


def test_a_half_precision_start_is_solved_in_float32_and_returned_in_its_dtype():
    z0 = torch.zeros(2, 3, dtype=torch.bfloat16)
    res = get_solver("anderson", tol=1e-6).solve(lambda z, x: 0.5 * z + x, z0, torch.ones(2, 3))
    assert res.z.dtype == torch.bfloat16 and res.residual.dtype == torch.float32
    assert res.converged.all() and torch.equal(res.z, torch.full((2, 3), 2.0, dtype=torch.bfloat16))


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_deq_forward_and_backward_under_bf16(backward):
    torch.manual_seed(2)
    cell = Cell(16)
    x = torch.randn(8, 16)
    grads = {}
    for precision in ("fp32", "bf16"):
        deq = DEQ(cell, backward=backward, tol=1e-2 if precision == "bf16" else 1e-6, max_iter=60)
        cell.zero_grad()
        with autocast(precision, "cpu"):
            z, info = deq(x)
            loss = z.float().pow(2).mean()
        loss.backward()
        assert info.residual.dtype == torch.float32
        grads[precision] = cell.lin.weight.grad.clone()
    assert torch.isfinite(grads["bf16"]).all()
    rel = (grads["bf16"] - grads["fp32"]).norm() / grads["fp32"].norm()
    assert rel < 5e-2


def test_resolve_device_and_precision_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match=r"device='tpu' is not valid.*\['cpu', 'cuda', 'auto'\]"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device.*use device='cpu'"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"precision='fp16' is not valid.*\['fp32', 'bf16'\]"):
        autocast("fp16", "cpu")
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")


# --- the compiled student -----------------------------------------------------------------------
def tiny_student():
    from cdeq.consistency import ConsistencyStudent
    from cdeq.deq import DEQModel

    torch.manual_seed(3)
    model = DEQModel(nn.Linear(4, 6), Cell(), nn.Linear(6, 3), tol=1e-6).eval()
    student = ConsistencyStudent(model).eval()
    t_min = student.schedule.t_min
    student.plans = {1: [("jump", t_min)], 2: [("jump", t_min), ("step",)],
                     4: [("jump", t_min), ("step",), ("jump", 1.0), ("step",)]}
    return student, torch.randn(5, 4)


def test_compiled_plan_traces_and_matches_eager():
    from cdeq.hub.compile import PlanModule, compile_plan, default_mode

    student, x = tiny_student()
    assert default_mode("cpu") is None and default_mode("cuda") == "reduce-overhead"
    torch._dynamo.reset()
    for nfe in (1, 2, 4):
        fast = compile_plan(student, nfe, example=x, backend="eager")  # dynamo only: seconds
        eager = PlanModule(student, student.plan_for(nfe))
        assert eager.nfe == nfe
        torch.testing.assert_close(fast(x), eager(x), rtol=0, atol=0)
    assert PlanModule(student, student.plan_for(5)).nfe == 4
    reference = student.predict(x, 2)[0]
    torch.testing.assert_close(PlanModule(student, student.plan_for(2))(x), reference)


@pytest.mark.skipif(__import__("os").environ.get("CDEQ_TEST_COMPILE") != "1",
                    reason="inductor compiles C++ for each plan: minutes on a loaded 2-core CPU; "
                           "set CDEQ_TEST_COMPILE=1 to run it")
def test_compiled_plan_with_inductor_matches_eager():
    from cdeq.hub.compile import PlanModule, compile_plan

    student, x = tiny_student()
    torch._dynamo.reset()
    fast = compile_plan(student, 2, example=x)
    torch.testing.assert_close(fast(x), PlanModule(student, student.plan_for(2))(x), rtol=1e-5, atol=1e-5)


# --- the benchmark script ------------------------------------------------------------------------
def test_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch._dynamo.reset()
    out = tmp_path / "gpu.json"
    result = module.main(["--device", "cpu", "--tiny", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and saved["timer"] == "time.perf_counter"
    assert "untrained student" in saved["weights"]["image"]
    labels = {(r["task"], r["batch"], r["row"]) for r in saved["rows"]}
    for task in ("image", "text"):
        for batch in (1, 4):
            for k in (1, 2, 4):
                for row in (f"cdeq@{k} eager", f"cdeq@{k} compiled", f"picard@{k}", f"anderson@{k}"):
                    assert (task, batch, row) in labels
    for r in saved["rows"]:
        assert r["median_s"] > 0 and r["p10_s"] <= r["median_s"] <= r["p90_s"]
        if r["row"].startswith(("cdeq@", "picard@", "anderson@")) and "check_every" not in r:
            assert r["nfe"] == int(r["row"].split("@")[1].split()[0])
        if r["row"].startswith("teacher"):
            assert 1 <= r["nfe"] <= 30
    text = [r for r in saved["rows"] if r["task"] == "text" and r["row"] == "cdeq@1 eager"]
    assert text[0]["unit"] == "tokens" and text[0]["throughput_per_s"] == pytest.approx(
        text[0]["batch"] * 8 / text[0]["median_s"])


@pytest.mark.parametrize("module", ["cdeq.engine.precision", "cdeq.hub.compile", "cdeq.solvers.loop"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# --- the run's device and precision ---------------------------------------------------------------
def test_to_device_moves_nested_batches_and_dataclasses():
    from cdeq.consistency.trajectory import TrajectoryBatch
    from cdeq.engine.precision import to_device

    x = (torch.randn(3, 2), [torch.ones(3)], {"mask": torch.zeros(3, dtype=torch.bool)}, "name")
    moved = to_device(x, "meta")
    assert moved[0].device.type == moved[1][0].device.type == moved[2]["mask"].device.type == "meta"
    assert moved[3] == "name" and isinstance(moved[1], list) and moved[2]["mask"].dtype == torch.bool
    assert to_device(x[0], "cpu") is x[0]  # already there: no copy
    batch = TrajectoryBatch(x=x[:2], y=torch.zeros(3), iterates=torch.zeros(3, 2, 4),
                            z_star=torch.zeros(3, 4), residual=torch.zeros(3, 2),
                            star_residual=torch.zeros(3), index=[0, 1], last=5)
    out = to_device(batch, "meta")
    assert out.x[0].device.type == out.iterates.device.type == out.star_residual.device.type == "meta"
    assert out.index == [0, 1] and out.last == 5 and batch.z_star.device.type == "cpu"


def test_a_task_on_a_device_yields_its_batches_there():
    from cdeq.tasks import TASKS
    from cdeq.tasks.base import OnDevice, Task, on_device

    cls = TASKS["digits"]
    task = cls(cls.Config.from_dict({"train_subset": 64, "test_subset": 16}))
    assert on_device(task, "cpu") is task
    moved = OnDevice(task, torch.device("meta"))
    for batches in (moved.train_batches(16, shuffle=True, generator=torch.Generator()),
                    moved.record_batches(16), moved.validation_batches(16), moved.test_batches(8),
                    moved.selection_batches(8)):
        x, y = next(iter(batches))
        assert x.device.type == y.device.type == "meta"
    assert moved.metric == task.metric and moved.split_sizes() == task.split_sizes()
    with pytest.raises(NotImplementedError):  # raised by the call, as the task's own method does
        OnDevice(Task(task.config), torch.device("meta")).validation_batches(8)


def test_clock_synchronises_cuda_only_when_cuda_is_in_use(monkeypatch):
    from cdeq.engine import precision
    from cdeq.run import cost

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    precision.clock("cpu")
    precision.clock()
    if not torch.cuda.is_initialized():
        assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    precision.clock("cpu")
    assert calls == []
    precision.clock("cuda")
    precision.clock()
    assert calls == ["cuda", None]
    calls.clear()  # the reports' timing harness stops the clock after the device's work
    cost.time_methods({"a": lambda: None, "b": lambda: None}, repeats=2, warmup=1, threads=0)
    assert len(calls) == 2 * 3 + 2 * 2  # a start per call, a stop per timed call


def test_device_and_precision_keys_are_checked(tmp_path, capsys):
    from cdeq.cli import main
    from cdeq.run.stages import RunConfig, build_config

    cfg = build_config("digits", {"precision": "bf16"}, quick=True)
    assert cfg.device == "cpu"  # the default: the GPU path is opt-in
    assert "precision" not in cfg.to_dict()["teacher"]["optim"]  # the run's precision alone
    with pytest.raises(ConfigError, match=r"teacher.optim.precision='bf16' is no longer a setting: "
                                          r"the run-level precision sets every stage.*--set precision=bf16"):
        build_config("digits", {"teacher": {"optim": {"precision": "bf16"}}})
    again = build_config("digits", cfg.to_dict(), quick=True)  # a run's config.json as --config
    assert again.to_dict() == cfg.to_dict()
    # a run's config.json written when every loop repeated the run's precision still reads
    old = {"precision": "bf16", "distill": {"optim": {"precision": "bf16"}},
           "baselines": {"init_optim": {"precision": "fp32"}}}
    assert build_config("digits", old, quick=True).to_dict() == cfg.to_dict()
    with pytest.raises(ConfigError, match=r"precision='fp16' is not valid"):
        RunConfig.from_dict({"precision": "fp16"})
    with pytest.raises(ConfigError, match=r"device='tpu' is not valid"):
        RunConfig.from_dict({"device": "tpu"})
    assert RunConfig.from_dict({"device": "cuda:1"}).device == "cuda:1"  # checked when it runs
    out = tmp_path / "run"
    assert main(["run", "digits", "--quick", "--out", str(out), "--device", "tpu"]) == 2
    assert "device='tpu' is not valid" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["run", "digits", "--quick", "--out", str(out), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()  # nothing written for a device that failed


def test_the_quick_pipeline_runs_in_bf16_on_cpu(tmp_path, monkeypatch, capsys):
    """``--set precision=bf16`` reaches every optimiser loop (teacher, distillation, baselines)
    and the autocast of recording, plan search and evaluation; the report is finite."""
    import importlib
    import json
    import logging
    import math

    from cdeq.cli import main
    from cdeq.run import baselines
    from cdeq.run import stages as pipeline
    from cdeq.run import teacher as training

    distill = importlib.import_module("cdeq.consistency.distill")  # the module, not the function
    initialiser = importlib.import_module("cdeq.consistency.initialiser")
    loops, casts = [], []
    for module in (training, distill, initialiser, baselines):
        real_fit = module.fit
        monkeypatch.setattr(module, "fit", lambda *a, real_fit=real_fit, **k: (
            loops.append((k["name"], "bf16" if torch.is_autocast_enabled("cpu") and
                          torch.get_autocast_dtype("cpu") == torch.bfloat16 else "fp32")),
            real_fit(*a, **k))[1])
    real_autocast = pipeline.autocast
    monkeypatch.setattr(pipeline, "autocast", lambda p, d: casts.append(p) or real_autocast(p, d))
    out = tmp_path / "bf16"
    tiny = ["teacher.epochs=1", "task_config.train_subset=128", "task_config.test_subset=64",
            "distill.epochs=1", "evaluate.budgets=[1,2]", "plans.max_nfe=2", "baselines.unrolled_ks=[1]",
            "baselines.anytime_k=2"]
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", "threads=1",
                 "precision=bf16", *tiny]) == 0
    assert {name for name, _ in loops} >= {"teacher", "distillation", "learned initialiser",
                                           "unrolled k=1", "unrolled anytime k<=2"}
    assert {p for _, p in loops} == {"bf16"} and set(casts) == {"bf16"} and len(casts) >= 5
    report = json.loads((out / "report.json").read_text())
    assert report["precision"] == "bf16" and report["timing"]["device"] == "cpu"
    values = [report["teacher"]["metric"]] + [v for key in ("methods", "relative_error")
                                              for per in report[key].values() for v in per.values()]
    assert len(values) > 10 and all(math.isfinite(v) for v in values)
    assert {"cdeq", "learned_init", "unrolled", "unrolled_any_k"} <= set(report["methods"])
    shown, logged = capsys.readouterr().out, (out / "log.txt").read_text()  # through logging
    for line in ("teacher epoch 1:", "distillation epoch 1:", "training samples in 1 shards"):
        assert line in shown and line in logged
    assert logging.getLogger("cdeq").handlers == []  # the command's console handler is gone
