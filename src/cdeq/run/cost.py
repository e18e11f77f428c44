"""What a prediction costs: FLOPs counted op by op, wall time from one interleaved harness, and the
"teacher-accuracy cost" (the cheapest method and budget within a tolerance of the converged teacher).

FLOPs (:class:`FlopCounter`, :func:`count_flops`) are counted while the prediction runs, op by op:

- **dense products** (``mm``, ``addmm``, ``bmm``, convolutions, attention...): the formulas of
  ``torch.utils.flop_counter`` (2 FLOPs per multiply-add), the ones ``FlopCounterMode`` uses,
  plus 1 per output element for a bias (which ``FlopCounterMode`` leaves out);
- **sparse products** (a sparse matrix times a dense one, as on graphs): ``2 * nnz * d`` for
  ``d`` dense columns. ``FlopCounterMode`` counts them as dense products (``2 * n * m * d``),
  so they are taken out of its registry here;
- **elementwise and the rest**, which ``FlopCounterMode`` ignores: 1 FLOP per output element of
  every pointwise op (add, mul, relu, silu, where, ...), 1 per input element of a reduction (sum,
  norm, mean), 5 per element of a normalisation (group, layer, batch norm) or a softmax, and
  ``2/3 n^3 + 2 n^2 r`` per linear system solved (Anderson's least squares). Copies, views,
  indexing and allocation count 0.

So a solver's own arithmetic (Anderson's Gram matrix, mixing and solve; residual norms) is part
of a method's count. Per-sample figures divide by the batch's leading dimension (a graph counts
as one sample).

Timing (:func:`time_methods`): methods are called round-robin (interleaved: a burst of load on a
shared machine hits every method alike), after a warm-up, with ``torch.set_num_threads``
fixed for the measurement; the median and interquartile range of the repeats are reported.
``torch.utils.benchmark.Timer`` times one statement at a time and cannot interleave, hence this
harness; it uses ``time.perf_counter`` as the benchmark module does on CPU, after a CUDA
synchronisation when CUDA is in use (:func:`cdeq.engine.precision.clock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..engine.precision import clock

_aten = torch.ops.aten
_FREE = {"clone", "copy_", "_to_copy", "fill_", "zero_", "zeros_like", "ones_like", "empty_like",
         "lift_fresh", "detach", "alias", "masked_fill", "masked_fill_", "coalesce", "_coalesce",
         "_to_sparse_csr", "to_sparse_csr", "_to_sparse", "_to_dense", "indices", "values",
         "_indices", "_values", "crow_indices", "col_indices", "_nnz"}
_REDUCTIONS = {"sum", "mean", "linalg_vector_norm", "norm", "amax", "amin", "max", "min", "argmax",
               "argmin", "prod", "var", "std", "logsumexp", "all", "any"}
_FIVE_PER_ELEMENT = {"native_group_norm", "native_layer_norm", "native_batch_norm",
                     "_native_batch_norm_legit_no_training", "_softmax", "_log_softmax"}
_SPARSE_MM = {"mm", "addmm", "_sparse_mm", "_sparse_addmm", "matmul", "sparse_mm"}


def _numel(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return int(x.numel()) if x.layout == torch.strided else int(x._nnz())
    if isinstance(x, (tuple, list)):
        return sum(_numel(v) for v in x)
    return 0


def _nnz(t: torch.Tensor) -> int:
    return int(t._nnz()) if t.layout != torch.strided else int(t.numel())


@dataclasses.dataclass
class FlopCount:
    """FLOPs by kind; ``total`` is their sum. ``unknown`` names ops counted as 0 that might cost."""

    dense: float = 0.0
    sparse: float = 0.0
    elementwise: float = 0.0
    unknown: set = dataclasses.field(default_factory=set)

    @property
    def total(self) -> float:
        return self.dense + self.sparse + self.elementwise

    def scaled(self, factor: float) -> FlopCount:
        return FlopCount(self.dense * factor, self.sparse * factor, self.elementwise * factor,
                         set(self.unknown))

    def to_dict(self) -> dict[str, float]:
        return {"total": self.total, "dense": self.dense, "sparse": self.sparse,
                "elementwise": self.elementwise}


class FlopCounter(TorchDispatchMode):
    """A dispatch mode adding up the FLOPs of every op it sees into ``self.count`` (module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = FlopCount()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._add(func, args, kwargs, out)
        return out

    def _add(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        name = func.overloadpacket.__name__
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        sparse = [t for t in tensors if t.layout != torch.strided]
        c = self.count
        if sparse and name in _SPARSE_MM:
            dense = [t for t in tensors if t.layout == torch.strided and t.dim() == 2]
            a, b = args[-2], args[-1]  # (bias,) sparse @ dense or dense @ sparse
            d = int(b.shape[1]) if a.layout != torch.strided else int(a.shape[0])
            c.sparse += 2.0 * _nnz(a if a.layout != torch.strided else b) * d
            if name.endswith("addmm") and dense:
                c.elementwise += _numel(out)
        elif func.overloadpacket in flop_registry and not sparse:
            c.dense += float(flop_registry[func.overloadpacket](*args, **kwargs, out_val=out))
            bias = name in ("addmm", "baddbmm") or (name == "convolution" and args[2] is not None)
            if bias:  # the registry counts the products only; the bias adds 1 per output element
                c.elementwise += _numel(out)
        elif name in _FREE or not tensors:
            return
        elif torch.Tag.pointwise in func.tags:
            c.elementwise += _numel(out)
        elif name in _REDUCTIONS:
            c.elementwise += _numel(tensors[0])
        elif name in _FIVE_PER_ELEMENT:
            c.elementwise += 5.0 * _numel(tensors[0])
        elif name in ("_linalg_solve_ex", "linalg_solve_ex", "linalg_solve"):
            a, b = tensors[0], tensors[1]
            n = int(a.shape[-1])
            systems = a.numel() // (n * n)
            rhs = int(b.shape[-1]) if b.dim() == a.dim() else 1
            c.elementwise += systems * (2.0 / 3.0 * n ** 3 + 2.0 * n * n * rhs)
        elif sparse:
            c.unknown.add(name)


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """Run ``fn()`` once under :class:`FlopCounter` (no gradients) and return its FLOPs."""
    counter = FlopCounter()
    with torch.no_grad(), counter:
        fn()
    return counter.count


def batch_size(x: Any) -> int:
    """The leading dimension of a batch's first dense tensor (1 for a sparse graph input)."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.layout == torch.strided else 1
    if isinstance(x, (tuple, list)) and x:
        return batch_size(x[0])
    return 1


# --- wall time -----------------------------------------------------------------------------------
@contextlib.contextmanager
def num_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block (``n`` 0: leave as is)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _quartiles(times: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else \
        (times[0],) * 3
    return q1, q2, q3


def time_methods(fns: dict[Any, Callable[[], Any]], repeats: int = 20, warmup: int = 2,
                 threads: int = 1) -> dict[str, dict[str, float]]:
    """Median and interquartile range (ms) of each ``fn()``, called round-robin ``repeats`` times
    after ``warmup`` rounds, with ``threads`` intra-op threads (0: the current setting).

    The order of the methods rotates every round, so no method always follows the same one.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} and warmup={warmup} must be >= 1 and >= 0")
    names = list(fns)
    times: dict[Any, list[float]] = {n: [] for n in names}
    with torch.no_grad(), num_threads(threads):
        for r in range(warmup + repeats):
            shift = r % max(1, len(names))
            for name in names[shift:] + names[:shift]:
                t0 = clock()
                fns[name]()
                if r >= warmup:
                    times[name].append(1000.0 * (clock() - t0))
    out = {}
    for name, ts in times.items():
        q1, med, q3 = _quartiles(ts)
        out[name] = {"median_ms": med, "iqr_ms": q3 - q1, "repeats": len(ts)}
    return out


# --- the speed reference -------------------------------------------------------------------------
TRUNCATED = ("picard", "anderson", "broyden")
OURS = ("cdeq", "cdeq_plus", "cdeq_tuned")
"""cdeq's own few-step models."""


def default_tolerance(metric: str, teacher_metric: float) -> float:
    """0.25 accuracy points, or 0.5% of a loss."""
    return 0.0025 if metric == "accuracy" else 0.005 * abs(teacher_metric)


def _within(value: float, teacher: float, tol: float, higher_is_better: bool) -> bool:
    return value >= teacher - tol if higher_is_better else value <= teacher + tol


def teacher_accuracy_cost(report: dict[str, Any], tolerance: float | None = None,
                          ) -> dict[str, Any]:
    """The cheapest (method, budget) within ``tolerance`` of the converged teacher, chosen on the
    validation figures (``report["valid"]``), with its test figure; for cdeq's own models (C-DEQ,
    C-DEQ+ and C-DEQ tuned: key ``cdeq``, the method named in the entry), the truncated solvers
    and all methods. Speed-ups: best truncated / cdeq's, in FLOPs and in median time.
    """
    valid, cost = report["valid"], report["cost"]
    timing = report.get("timing", {})
    teacher = valid["teacher"]["metric"]
    tol = default_tolerance(report["metric"], teacher) if tolerance is None else float(tolerance)
    hib = report["higher_is_better"]
    cands = []
    for name, per in valid["methods"].items():
        for k, v in per.items():
            flops = cost["flops"].get(name, {}).get(k)
            if flops is None or not _within(v, teacher, tol, hib):
                continue
            ms = timing.get(name, {}).get(k, {}).get("median_ms")
            cands.append({"method": name, "budget": int(k), "flops": flops,
                          "layer_calls": cost["layer_calls"][name][k], "median_ms": ms,
                          "valid_metric": v, "test_metric": report["methods"][name].get(k)})

    def cheapest(pick: Callable[[dict], bool], key: str) -> dict | None:
        pool = [c for c in cands if pick(c) and c[key] is not None]
        return min(pool, key=lambda c: (c[key], c["budget"])) if pool else None

    out: dict[str, Any] = {"tolerance": tol, "valid_teacher_metric": teacher, "selected_on": "valid"}
    for axis, key in (("flops", "flops"), ("time", "median_ms")):
        ours = cheapest(lambda c: c["method"] in OURS, key)
        trunc = cheapest(lambda c: c["method"] in TRUNCATED, key)
        out[f"by_{axis}"] = {"cdeq": ours, "best_truncated": trunc,
                             "any_method": cheapest(lambda c: True, key)}
        out[f"speedup_{axis}"] = trunc[key] / ours[key] if ours and trunc and ours[key] else None
    out["cdeq"], out["best_truncated"] = out["by_flops"]["cdeq"], out["by_flops"]["best_truncated"]
    return out


TIMING_FIELDS = ("timing", "latency_ms", "train_time_s")


def without_timing(report: dict[str, Any]) -> dict[str, Any]:
    """``report`` less every wall-clock figure (:data:`TIMING_FIELDS`, the time-based choices
    and ``median_ms`` entries of the teacher-accuracy cost): what two same-seed runs must share."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if k not in ("median_ms", "by_time", "speedup_time")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip({k: v for k, v in report.items() if k not in TIMING_FIELDS})
