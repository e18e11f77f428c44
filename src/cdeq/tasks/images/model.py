"""The convolutional DEQ of the image tasks (in the spirit of MDEQ's residual block).

The layer, with ``u`` the injected input (a strided convolution of the image)::

    y = GN(relu(conv1(z)))
    y = GN(conv2(y) + u)
    f(z, u) = GN(relu(z + y))

with weight-normalised convolutions. The head pools ``z*`` and applies a linear layer.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ...deq.regularizers import apply_weight_norm

__all__ = ["ConvDEQCell", "ConvInjection", "PoolHead"]


class ConvInjection(nn.Module):
    """Image ``(B, C_in, H, W)`` -> injection ``u`` ``(B, C, H/s, W/s)``.

    ``stride`` 1 is one 3x3 convolution; 2 or 4 use one or two stride-2 stages before it.
    """

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range({1: 0, 2: 1, 4: 2}[stride]):
            layers += [nn.Conv2d(c, channels, 3, stride=2, padding=1),
                       nn.GroupNorm(min(8, channels), channels), nn.ReLU()]
            c = channels
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.GroupNorm(min(8, channels), channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDEQCell(nn.Module):
    """MDEQ-style residual block ``f(z, u)``; state ``(B, C, H, W)``."""

    channel_dim = 1

    def __init__(self, channels: int, groups: int = 8, hidden_mult: int = 2, residual: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.residual = residual
        hidden = channels * hidden_mult
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(min(groups, hidden), hidden, affine=True)
        self.gn2 = nn.GroupNorm(min(groups, channels), channels, affine=True)
        self.gn3 = nn.GroupNorm(min(groups, channels), channels, affine=True)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0, 0.01)
        apply_weight_norm(self, "weight")

    def state_shape(self, u: Tensor) -> tuple[int, ...]:
        return tuple(u.shape)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        y = self.gn1(F.relu(self.conv1(z)))
        y = self.gn2(self.conv2(y) + u)
        return self.gn3(F.relu(z + y if self.residual else y))


class PoolHead(nn.Module):
    """Average-pool ``z`` to a ``grid x grid`` map, flatten, and classify linearly."""

    def __init__(self, channels: int, classes: int, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.fc = nn.Linear(channels * grid * grid, classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(z, self.grid).flatten(1))
