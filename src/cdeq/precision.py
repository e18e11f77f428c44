"""Devices and numeric precision: ``--device cpu|cuda|auto`` and ``precision=fp32|bf16``.

- :func:`resolve_device` turns the configuration's device name into a :class:`torch.device`.
- :func:`autocast` is the one context for mixed precision: ``"fp32"`` does nothing, ``"bf16"``
  runs the layers under bfloat16 autocast on the given device (CPU included).
- The solvers keep their own arithmetic (residuals, Anderson's mixing and least squares,
  Broyden's updates) in float32 inside autocast: they leave autocast with
  :func:`full_precision` and re-enter the caller's autocast around each call of ``f`` with
  :func:`caller_autocast`.

Example:
    >>> import torch
    >>> device = resolve_device("cpu")
    >>> with autocast("bf16", device):
    ...     y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    >>> y.dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from .config import ConfigError

DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("fp32", "bf16")
_AUTOCAST_TYPES = ("cpu", "cuda")  # device types autocast is used on here
_LOW = (torch.float16, torch.bfloat16)


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"`` (CUDA when available) as a device.

    Raises :class:`ConfigError` for another name, or for CUDA on a machine without it.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if not isinstance(name, str):
        raise ConfigError(f"device={name!r} is not valid; use one of {list(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} is not available: this torch sees no CUDA device; "
                              "use device='cpu' or 'auto'")
        index = int(name[5:]) if ":" in name else None
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} is not available: {torch.cuda.device_count()} "
                              "CUDA device(s) are visible")
        return torch.device(name)
    raise ConfigError(f"device={name!r} is not valid; use one of {list(DEVICES)} (or 'cuda:N')")


def check_precision(precision: str) -> None:
    """Raise :class:`ConfigError` unless ``precision`` is ``"fp32"`` or ``"bf16"``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not valid; allowed values: {list(PRECISIONS)}")


def autocast(precision: str, device: torch.device | str) -> AbstractContextManager:
    """The context for ``precision`` on ``device``: a no-op for fp32, bf16 autocast for bf16."""
    check_precision(precision)
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type not in _AUTOCAST_TYPES:
        raise ConfigError(f"precision='bf16' needs a cpu or cuda device, not {device.type!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def full_precision(device: torch.device) -> AbstractContextManager:
    """Leave autocast on ``device`` (if it is on) so that the code inside runs in its own dtypes."""
    if device.type not in _AUTOCAST_TYPES or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def caller_autocast(device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of contexts that re-enter the autocast active now on ``device`` (if any).

    Call it before :func:`full_precision`; each context it makes restores the caller's autocast.
    """
    if device.type not in _AUTOCAST_TYPES or not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext
    dtype = torch.get_autocast_dtype(device.type)
    return lambda: torch.autocast(device.type, dtype=dtype)


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a solver computes in: float32 for half types, the given dtype otherwise."""
    return torch.float32 if dtype in _LOW else dtype
