"""The time schedule of the consistency student: iterate times and boundary scalings.

Each teacher iterate ``z_k`` gets a time ``t_k`` in ``[eps, T]`` with ``t = T`` at the equilibrium.

- ``kind="karras"``: an increasing rho-grid over the iterate index,
  ``t_k = (eps^(1/rho) + k/K (T^(1/rho) - eps^(1/rho)))^rho`` with ``K`` the solution's index.
- ``kind="residual"``: progress read off the relative residual ``r`` of the iterate,
  ``t = eps + (T - eps) * clip(log r / log r_end, 0, 1)``, so the time of any state can be computed
  at inference from its residual.

Scalings (``F = c_skip(t) z + c_out(t) G``), both exact at the boundary ``c_skip(T)=1, c_out(T)=0``:
``linear``: ``c_skip = t/T``, ``c_out = 1 - t/T``; ``edm``: with ``s = T - t``,
``c_skip = sd^2/(s^2 + sd^2)``, ``c_out = sd s / sqrt(s^2 + sd^2)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..engine.config import Config, ConfigError, check_choice, check_positive


@dataclasses.dataclass
class ScheduleConfig(Config):
    """How iterates get their times, and the boundary scalings (see the module docstring).

    Attributes:
        kind: ``karras`` (a rho-grid over the iterate index) or ``residual`` (time read off the
            iterate's relative residual).
        eps: the smallest time, that of the start ``z_0``.
        T: the time of the equilibrium ``z*``, where ``F(z, T, u) = z``.
        rho: the exponent of the Karras grid.
        scaling: ``linear`` (``c_skip = t/T``) or ``edm``.
        sigma_data: the data scale of the ``edm`` scalings.
        residual_end: the relative residual mapped to ``T`` by the ``residual`` kind.
    """

    kind: str = "karras"
    eps: float = 0.002
    T: float = 5.0
    rho: float = 7.0
    scaling: str = "linear"
    sigma_data: float = 0.5
    residual_end: float = 1e-4

    def validate(self) -> None:
        check_choice("kind", self.kind, ["karras", "residual"])
        check_choice("scaling", self.scaling, ["linear", "edm"])
        check_positive("eps", self.eps)
        check_positive("rho", self.rho)
        check_positive("sigma_data", self.sigma_data)
        check_positive("residual_end", self.residual_end)
        if not self.eps < self.T:
            raise ConfigError(f"T={self.T!r} is not valid; it must be greater than eps={self.eps}")
        if self.residual_end >= 1:
            raise ConfigError(f"residual_end={self.residual_end!r} is not valid; it must be < 1")


class TimeSchedule:
    """Times of iterates and the ``c_skip``/``c_out`` scalings."""

    def __init__(self, config: ScheduleConfig | None = None) -> None:
        self.config = config or ScheduleConfig()

    @property
    def T(self) -> float:
        return self.config.T

    @property
    def t_min(self) -> float:
        return self.config.eps

    def index_time(self, index: Tensor | float, last: int) -> Tensor:
        """Karras time of iterate ``index`` (any shape) when index ``last`` is the equilibrium."""
        c = self.config
        k = torch.as_tensor(index, dtype=torch.float64).clamp(0, last) / last
        lo, hi = c.eps ** (1 / c.rho), c.T ** (1 / c.rho)
        return ((lo + k * (hi - lo)) ** c.rho).float()

    def residual_time(self, rel_residual: Tensor) -> Tensor:
        """Time from the relative residual (any shape): ``eps`` at ``r >= 1``, ``T`` at ``r <= r_end``."""
        c = self.config
        r = rel_residual.double().clamp_min(1e-30)
        progress = (torch.log(r) / math.log(c.residual_end)).clamp(0, 1)
        progress = torch.where(torch.isfinite(progress), progress, torch.zeros_like(progress))
        return (c.eps + (c.T - c.eps) * progress).float()

    def times(self, index: Tensor, last: int, rel_residual: Tensor | None = None) -> Tensor:
        """Times of recorded iterates by the configured kind. The equilibrium (``index == last``)
        always gets ``T``."""
        if self.config.kind == "karras" or rel_residual is None:
            t = self.index_time(index, last)
        else:
            t = self.residual_time(rel_residual)
        return torch.where(torch.as_tensor(index) >= last, torch.full_like(t, self.T), t)

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_skip, c_out)`` of shape ``t.shape``; exactly ``(1, 0)`` at ``t = T``."""
        return self._scalings(t.clamp(max=self.config.T), torch.sqrt)

    def scalar_scalings(self, t: float) -> tuple[float, float]:
        """``(c_skip, c_out)`` of one time ``t`` as floats (a plan step's jump: one time for the
        whole batch; no tensor op); exactly ``(1.0, 0.0)`` at ``t = T``."""
        return self._scalings(min(float(t), self.config.T), math.sqrt)

    def _scalings(self, t: Any, sqrt: Callable[[Any], Any]) -> tuple[Any, Any]:
        """The scalings' formula for a time ``t <= T``, a tensor or a float (``sqrt`` to match)."""
        c = self.config
        if c.scaling == "linear":
            c_skip = t / c.T
            return c_skip, 1 - c_skip
        s = c.T - t
        sd2 = c.sigma_data**2
        return sd2 / (s**2 + sd2), c.sigma_data * s / sqrt(s**2 + sd2)
