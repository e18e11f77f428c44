"""The toy DEQ shared by the training-loop and multi-process tests: a tanh cell on 8 channels and a
3-class task on 5 features (96 samples: 64 for training, 32 for validation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import cdeq
from cdeq.tasks.base import Task


class ToyCell(nn.Module):
    """``f(z, u) = tanh(0.5 W z + u)``, states ``(B, 8)``: a contraction for small ``W``."""

    channels, channel_dim = 8, -1

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def state_shape(self, u):
        return u.shape

    def forward(self, z, u):
        return torch.tanh(0.5 * self.lin(z) + u)


class ToyTask(Task):
    """Labels ``[x_0 > 0] + [x_1 > 0]`` (learnable); training rows 0-63, validation rows 64-95."""

    name = "toy"

    def __init__(self):
        super().__init__(None)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(96, 5, generator=gen)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 0).long()

    def build_model(self):
        torch.manual_seed(0)
        return cdeq.DEQModel(nn.Linear(5, 8), ToyCell(), nn.Linear(8, 3))

    def train_batches(self, batch_size, shuffle=True, generator=None):
        order = torch.randperm(64, generator=generator) if shuffle else torch.arange(64)
        for s in range(0, 64, batch_size):
            yield self.x[order[s:s + batch_size]], self.y[order[s:s + batch_size]]

    def validation_batches(self, batch_size):
        yield self.x[64:], self.y[64:]

    def loss(self, logits, y):
        return F.cross_entropy(logits, y)
