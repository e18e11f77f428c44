"""Picard (fixed-point) iteration with damping: ``z <- (1 - beta) z + beta f(z)``."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from ..engine.config import check_range
from .base import Solver, SolverOptions, register_solver


@dataclasses.dataclass
class PicardOptions(SolverOptions):
    """``damping``: the step ``beta`` in (0, 1]; 1 is plain iteration."""

    damping: float = 1.0

    def validate(self) -> None:
        super().validate()
        check_range("damping", self.damping, 1e-6, 1.0)


@register_solver
class Picard(Solver):
    """Damped Picard iteration; one evaluation of ``f`` per step."""

    name = "picard"
    Options = PicardOptions

    def step(self, state: dict[str, Any], it: int, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        beta = self.options.damping
        return fz if beta == 1.0 else (1 - beta) * z + beta * fz
