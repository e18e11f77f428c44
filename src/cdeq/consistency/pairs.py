"""Pair sampling strategies of the distillation: which recorded points ``(n, m)`` a minibatch
pairs, registered by name; each strategy's options are its dataclass fields."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..engine.config import Config, ConfigError, check_int, check_positive


@dataclasses.dataclass
class PairSampler(Config):
    """Draws ``(n, m)`` recorded-point indices with ``n < m <= L``; ``m = L`` is ``z*``.

    The draws use the loop's generator, on its device (the CPU in :func:`cdeq.engine.fit.fit`: the same
    draws on every rank, after a resume and on any device); the caller moves the indices to the
    data's device.
    """

    name: ClassVar[str] = ""

    def sample(self, batch: int, num_points: int, progress: float, gen: torch.Generator
               ) -> tuple[Tensor, Tensor]:
        """``(n, m)``, each of shape ``(batch,)``; ``progress`` in [0, 1] is the training fraction."""
        raise NotImplementedError


PAIR_SAMPLERS: dict[str, type[PairSampler]] = {}


def register_pair_sampler(name: str) -> Callable[[type[PairSampler]], type[PairSampler]]:
    """Class decorator: make a :class:`PairSampler` dataclass available as ``distill.pairs``."""
    def add(cls: type[PairSampler]) -> type[PairSampler]:
        cls.name = name
        PAIR_SAMPLERS[name] = cls
        return cls

    return add


def get_pair_sampler(spec: str | Mapping[str, Any] | PairSampler) -> PairSampler:
    """A sampler from an instance, a name, or ``{"name": ..., **options}`` (options checked)."""
    if isinstance(spec, PairSampler):
        return spec
    options = dict(spec) if isinstance(spec, Mapping) else {}
    name = options.pop("name", None) if isinstance(spec, Mapping) else spec
    if name not in PAIR_SAMPLERS:
        raise ConfigError(f"pairs={name!r} is not valid; choose from {sorted(PAIR_SAMPLERS)} (a name, "
                          "or a mapping with 'name' and the sampler's options)")
    return PAIR_SAMPLERS[name].from_dict(options)


@register_pair_sampler("uniform")
@dataclasses.dataclass
class UniformPairs(PairSampler):
    """``n`` uniform over the recorded points, ``m = min(n + gap, L)``."""

    gap: int = 1

    def validate(self) -> None:
        check_int("gap", self.gap, minimum=1)

    def sample(self, batch, num_points, progress, gen):
        n = torch.randint(0, num_points, (batch,), generator=gen, device=gen.device)
        return n, torch.clamp(n + self.gap, max=num_points)


@register_pair_sampler("early")
@dataclasses.dataclass
class EarlyPairs(PairSampler):
    """Favour early points (the ones inference starts from): ``P(n) ~ (n + 1)^-power``, ``m = n + 1``."""

    power: float = 1.0

    def validate(self) -> None:
        check_positive("power", self.power, allow_zero=True)

    def sample(self, batch, num_points, progress, gen):
        w = torch.arange(1, num_points + 1, dtype=torch.float, device=gen.device).pow(-self.power)
        n = torch.multinomial(w, batch, replacement=True, generator=gen)
        return n, n + 1


@register_pair_sampler("curriculum")
@dataclasses.dataclass
class CurriculumPairs(PairSampler):
    """Start with long jumps (``m`` at the end) and shrink the gap to ``final_gap`` over training."""

    final_gap: int = 1

    def validate(self) -> None:
        check_int("final_gap", self.final_gap, minimum=1)

    def sample(self, batch, num_points, progress, gen):
        n = torch.randint(0, num_points, (batch,), generator=gen, device=gen.device)
        gap = torch.clamp(((num_points - n) * (1 - progress)).round().long(), min=self.final_gap)
        return n, torch.minimum(n + gap, torch.full_like(n, num_points))
