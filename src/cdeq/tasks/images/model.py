"""The convolutional DEQ of the image tasks (in the spirit of MDEQ's residual block).

The layer, with ``u`` the injected input (a strided convolution of the image)::

    y = GN(relu(conv1(z)))
    y = GN(conv2(y) + u)
    f(z, u) = GN(relu(z + y))

with weight-normalised convolutions. The head pools ``z*`` and applies a linear layer.

With ``scales`` > 1 (``task_config.scales``) the state is MDEQ's tuple of resolutions, one such
block per scale fused at every call (:class:`MultiscaleCell`), and the head reads every scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...deq.regularizers import apply_weight_norm

__all__ = ["ConvDEQCell", "ConvInjection", "MultiscaleCell", "MultiscaleHead", "MultiscaleInjection",
           "PoolHead", "scale_widths"]


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


# --- the multiscale model (``task_config.scales`` > 1) ---------------------------------------------
def scale_widths(channels: int | tuple[int, ...], scales: int) -> tuple[int, ...]:
    """The width of each of ``scales`` resolutions: ``channels`` itself when it is a tuple of
    ``scales`` widths, else ``channels`` for every scale."""
    if isinstance(channels, int):
        return (channels,) * scales
    widths = tuple(int(c) for c in channels)
    if len(widths) != scales:
        raise ValueError(f"{len(widths)} widths {widths} for {scales} scales; give one per scale")
    return widths


class MultiscaleInjection(nn.Module):
    """Image -> one injection per resolution ``(u_0, ..., u_{N-1})``: ``u_0`` is
    :class:`ConvInjection`'s map ``(B, C_0, H, W)``, each next one a stride-2 3x3 convolution of the
    previous (``(B, C_i, ceil(H/2^i), ceil(W/2^i))``), so every scale of the state has its own.

    ``channels``: one width for every scale, or a tuple of ``scales`` widths ``(C_0, ..., C_{N-1})``.
    """

    def __init__(self, in_channels: int, channels: int | tuple[int, ...], stride: int, scales: int) -> None:
        super().__init__()
        self.in_channels, self.stride, self.scales = in_channels, stride, scales
        self.channels = scale_widths(channels, scales)
        w = self.channels
        self.base = ConvInjection(in_channels, w[0], stride)
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(w[i], w[i + 1], 3, stride=2, padding=1),
                          nn.GroupNorm(min(8, w[i + 1]), w[i + 1])) for i in range(scales - 1))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = [self.base(x)]
        for down in self.down:
            out.append(down(out[-1]))
        return tuple(out)


class _Down(nn.Sequential):
    """Scale ``i`` to a coarser scale ``j``: ``j - i`` stride-2 3x3 convolutions (MDEQ's fusion), all
    at scale ``i``'s width but the last, which maps it to scale ``j``'s."""

    def __init__(self, c_in: int, c_out: int, steps: int, groups: int) -> None:
        layers: list[nn.Module] = []
        for s in range(steps):
            c = c_out if s == steps - 1 else c_in
            layers.append(nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False))
            layers.append(nn.GroupNorm(min(groups, c), c))
            if s < steps - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class _Up(nn.Module):
    """Scale ``i`` to a finer scale ``j``: a 1x1 convolution to scale ``j``'s width, then nearest
    upsampling to its size."""

    def __init__(self, c_in: int, c_out: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.norm = nn.GroupNorm(min(groups, c_out), c_out)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(self.norm(self.conv(x)), size=size, mode="nearest")


class MultiscaleCell(nn.Module):
    """MDEQ's multiscale layer: the state is a tuple of ``scales`` maps ``(B, C_i, H_i, W_i)``, finest
    first; ``channels`` is one width for every scale or a tuple of one width per scale. Each scale
    runs :class:`ConvDEQCell`'s residual block on its own map with its own injection
    (``x_i = z_i + GN(conv2(GN(relu(conv1(z_i)))) + u_i)``), then every scale fuses all of them,
    ``f_j = GN(relu(sum_i T_ij(x_i)))``, with ``T_jj`` the identity, stride-2 convolutions from
    finer scales and 1x1 convolutions plus upsampling from coarser ones, each ``T_ij`` mapping
    width ``C_i`` to ``C_j``. With one scale it is :class:`ConvDEQCell` (whose own class the image
    tasks keep for ``scales=1``)."""

    channel_dim = 1

    def __init__(self, channels: int | tuple[int, ...], scales: int, groups: int = 8,
                 hidden_mult: int = 2) -> None:
        super().__init__()
        self.scales = scales
        self.channels = w = scale_widths(channels, scales)  # one entry per part of the state
        hidden = [c * hidden_mult for c in w]
        self.conv1 = nn.ModuleList(nn.Conv2d(w[i], hidden[i], 3, padding=1, bias=False)
                                   for i in range(scales))
        self.conv2 = nn.ModuleList(nn.Conv2d(hidden[i], w[i], 3, padding=1, bias=False)
                                   for i in range(scales))
        self.gn1 = nn.ModuleList(nn.GroupNorm(min(groups, h), h) for h in hidden)
        self.gn2 = nn.ModuleList(nn.GroupNorm(min(groups, c), c) for c in w)
        self.gn3 = nn.ModuleList(nn.GroupNorm(min(groups, c), c) for c in w)
        self.fuse = nn.ModuleDict()
        for i in range(scales):
            for j in range(scales):
                if i < j:
                    self.fuse[f"{i}_{j}"] = _Down(w[i], w[j], j - i, groups)
                elif i > j:
                    self.fuse[f"{i}_{j}"] = _Up(w[i], w[j], groups)
        for conv in [*self.conv1, *self.conv2]:
            nn.init.normal_(conv.weight, 0, 0.01)
        apply_weight_norm(self, "weight")

    def state_shape(self, u: tuple[Tensor, ...]) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(part.shape) for part in u)

    def forward(self, z: tuple[Tensor, ...], u: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        xs = []
        for i, (zi, ui) in enumerate(zip(z, u, strict=True)):
            y = self.gn1[i](F.relu(self.conv1[i](zi)))
            xs.append(zi + self.gn2[i](self.conv2[i](y) + ui))
        out = []
        for j, xj in enumerate(xs):
            total = xj
            for i, xi in enumerate(xs):
                if i < j:
                    total = total + self.fuse[f"{i}_{j}"](xi)
                elif i > j:
                    total = total + self.fuse[f"{i}_{j}"](xi, xj.shape[-2:])
            out.append(self.gn3[j](F.relu(total)))
        return tuple(out)


class MultiscaleHead(nn.Module):
    """Every scale average-pooled to a ``grid x grid`` map, concatenated, classified linearly.

    ``channels``: one width for every scale, or a tuple of ``scales`` widths."""

    def __init__(self, channels: int | tuple[int, ...], scales: int, classes: int, grid: int = 4) -> None:
        super().__init__()
        self.grid, self.scales, self.classes = grid, scales, classes
        self.channels = scale_widths(channels, scales)
        self.fc = nn.Linear(sum(self.channels) * grid * grid, classes)

    def forward(self, z: tuple[Tensor, ...]) -> Tensor:
        return self.fc(torch.cat([F.adaptive_avg_pool2d(part, self.grid).flatten(1) for part in z], 1))
