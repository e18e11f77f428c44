"""A compiled student: the fixed inference plan for a budget of ``k`` layer calls under
``torch.compile``.

:class:`PlanModule` is ``x -> logits`` for one fixed plan (``student.plan_for(k)``), with the
student's own :meth:`~cdeq.consistency.student.ConsistencyStudent.predict`, so eager and compiled
compute the same thing.
:func:`compile_plan` compiles it with ``mode="reduce-overhead"`` (CUDA graphs) on CUDA and the
default mode elsewhere, and, given an example input, checks the compiled output against eager.

Examples:
    >>> fast = compile_plan(student, nfe=2, example=x)   # doctest: +SKIP
    >>> logits = fast(x)                                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..consistency.plans import Plan, plan_nfe
from ..consistency.student import ConsistencyStudent


class PlanModule(nn.Module):
    """``x -> logits`` through ``plan`` (:func:`~cdeq.consistency.plans.plan_nfe` layer calls); no gradient.

    Args:
        student: a distilled (or, for timing, untrained) student.
        plan: the plan to run, e.g. ``student.plan_for(k)``.
    """

    def __init__(self, student: ConsistencyStudent, plan: Plan) -> None:
        super().__init__()
        self.student = student
        self.plan = list(plan)

    @property
    def nfe(self) -> int:
        return plan_nfe(self.plan)

    @torch.no_grad()
    def forward(self, x: Any) -> Tensor:
        return self.student.predict(x, plan=self.plan)[0]


def default_mode(device: torch.device | str) -> str | None:
    """``"reduce-overhead"`` on CUDA, ``None`` (torch.compile's default) elsewhere."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else None


def compile_plan(student: ConsistencyStudent, nfe: int, *, example: Any = None,
                 mode: str | None = "auto", backend: str = "inductor", atol: float = 1e-4,
                 rtol: float = 1e-4) -> nn.Module:
    """The student's plan for ``nfe`` layer calls, compiled.

    Args:
        nfe: the budget; the plan is ``student.plan_for(nfe)``.
        example: an input batch; when given, the compiled output is checked against eager
            (``RuntimeError`` if they differ by more than ``atol + rtol |eager|``), which also
            does the compilation (warm-up) before the function returns.
        mode: ``torch.compile`` mode; ``"auto"`` picks :func:`default_mode` of the student's device.
        backend: ``torch.compile`` backend (``"eager"`` traces without generating code; tests).

    Returns the compiled :class:`PlanModule` (call it as ``fast(x) -> logits``).
    """
    eager = PlanModule(student, student.plan_for(nfe)).eval()
    if mode == "auto":
        mode = default_mode(next(student.parameters()).device)
    compiled = torch.compile(eager, mode=mode, backend=backend)
    if example is not None:
        check_against_eager(compiled, eager, example, atol=atol, rtol=rtol)
    return compiled


def check_against_eager(compiled: nn.Module, eager: nn.Module, x: Any, atol: float = 1e-4,
                        rtol: float = 1e-4) -> float:
    """Largest ``|compiled(x) - eager(x)|``; raises ``RuntimeError`` beyond the tolerance."""
    want = eager(x)
    got = compiled(x).clone()  # CUDA graphs reuse their output buffer on the next call
    err = float((got.float() - want.float()).abs().max())
    bound = atol + rtol * float(want.float().abs().max())
    if not err <= bound:
        raise RuntimeError(f"the compiled plan differs from eager by {err:.3g} (> {bound:.3g}); "
                           "compile with backend='eager' to find the operation")
    return err
