"""Inference plans: what a student runs for a budget of layer calls, and how a plan is stored.

A plan is a list of operations run from a start state ``z_0`` (zeros, or C-DEQ+'s ``h(u)``):

- ``("jump", t)``: ``z <- F(z, t, x)``, the student's jump to the equilibrium from time ``t``
  (1 NFE);
- ``("step",)``: ``z <- f_theta(z, u)``, one teacher step (re-entry onto the trajectory; 1 NFE);
- ``("jump_auto",)``: a jump whose time is read off the residual measured by the previous
  teacher step (only after a ``step``; needs the residual-based schedule; 1 NFE);
- ``("solve", n)``: ``n`` steps of the teacher's own solver (its eval solver, Anderson by
  default, tolerance 0) from ``z`` (``n`` NFE);
- ``("teacher_head",)``, only last: the state is read out by the teacher's head instead of the
  student's fine-tuned copy (0 NFE; the two heads have the same architecture and FLOPs). A plan
  that reaches ``z*`` then answers as the converged DEQ does.
"""

from __future__ import annotations

from typing import Any

from ..engine.config import ConfigError

Plan = list[tuple]
TEACHER_HEAD = ("teacher_head",)
"""The last operation of a plan read out by the teacher's head."""

__all__ = ["TEACHER_HEAD", "Plan", "check_plan", "plan_body", "plan_nfe", "plan_to_json",
           "plans_from_json", "plans_to_json", "reads_teacher"]


def plan_nfe(plan: Plan) -> int:
    """The layer calls of ``plan``: one per operation, ``n`` for a ``("solve", n)``, none for the
    readout."""
    return sum(int(op[1]) if op[0] == "solve" else 0 if op[0] == "teacher_head" else 1 for op in plan)


def reads_teacher(plan: Plan) -> bool:
    """Whether ``plan`` ends with :data:`TEACHER_HEAD`."""
    return bool(plan) and tuple(plan[-1]) == TEACHER_HEAD


def plan_body(plan: Plan) -> Plan:
    """``plan`` without its readout operation: the operations that move the state."""
    return list(plan[:-1]) if reads_teacher(plan) else list(plan)


def check_plan(plan: Any) -> Plan:
    """``plan`` (tuples, or JSON lists) as a list of tuples; ``ConfigError`` naming the first
    invalid operation."""
    out = []
    for i, op in enumerate(plan):
        op = tuple(op) if isinstance(op, (list, tuple)) else (op,)
        name = op[0] if op else None
        number = len(op) == 2 and isinstance(op[1], (int, float)) and not isinstance(op[1], bool)
        if (name == "jump" and number) or (name in ("step", "jump_auto") and len(op) == 1):
            pass
        elif name == "solve":
            if len(op) != 2 or isinstance(op[1], bool) or not isinstance(op[1], int) or op[1] < 1:
                raise ConfigError(f"plan operation {list(op)!r} is not valid; give ['solve', n] with n >= 1")
        elif op == TEACHER_HEAD:
            if i != len(plan) - 1:
                raise ConfigError(f"plan operation {list(op)!r} must be the plan's last operation")
        else:
            raise ConfigError(f"plan operation {list(op)!r} is not valid; use ['jump', t], ['step'], "
                              "['jump_auto'], ['solve', n] or a last ['teacher_head']")
        out.append(op)
    return out


def plan_to_json(plan: Plan) -> list[list]:
    """A plan as JSON data: each operation a list, e.g. ``[["jump", 0.002], ["step"]]``."""
    return [list(op) for op in plan]


def plans_to_json(plans: dict[int, Plan]) -> dict[str, list[list]]:
    """A student's plans (budget -> plan) as JSON data, budgets in order."""
    return {str(k): plan_to_json(p) for k, p in sorted(plans.items())}


def plans_from_json(data: dict[str, list[list]]) -> dict[int, Plan]:
    """The inverse of :func:`plans_to_json`, every plan checked."""
    return {int(k): check_plan(v) for k, v in data.items()}
