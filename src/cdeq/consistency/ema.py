"""An exponential moving average of a module's parameters: the consistency target network."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..engine.config import check_range


class EMA:
    """``target <- decay * target + (1 - decay) * online`` after each step.

    With ``warmup`` steps the decay ramps as ``min(decay, (1 + n) / (10 + n))``, so an early,
    fast-moving student is tracked closely. Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.98, warmup: bool = True) -> None:
        check_range("ema decay", decay, 0.0, 1.0)
        self.decay = decay
        self.warmup = warmup
        self.steps = 0
        self.target = copy.deepcopy(model).eval()
        for p in self.target.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay of the next update (ramped up over the first steps with ``warmup``)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.steps) / (10 + self.steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the target's parameters toward ``model``'s (same architecture); copy its buffers."""
        d = self.current_decay()
        for t, s in zip(self.target.parameters(), model.parameters(), strict=True):
            t.lerp_(s.detach(), 1 - d)
        for t, s in zip(self.target.buffers(), model.buffers(), strict=True):
            t.copy_(s)
        self.steps += 1
