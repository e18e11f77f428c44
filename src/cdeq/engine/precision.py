"""Devices and numeric precision: ``--device cpu|cuda|auto`` and ``precision=fp32|bf16``.

- :func:`resolve_device` turns the configuration's device name into a :class:`torch.device`.
- :func:`autocast` is the one context for mixed precision: ``"fp32"`` does nothing, ``"bf16"``
  runs the layers under bfloat16 autocast on the given device (CPU included).
- :func:`to_device` moves a batch (a tensor, or tuples, lists, dicts and dataclasses of them, such
  as a graph's ``(features, adjacency)`` or a recorded trajectory batch) to a device.
- :func:`clock` is the one timer of cdeq's reports: ``time.perf_counter`` after the device's queued
  work is done (a CUDA synchronisation when CUDA is in use), so GPU timings measure the work and
  not its launch.
- The solvers keep their own arithmetic (residuals, Anderson's mixing and least squares,
  Broyden's updates) in float32 inside autocast: they leave autocast with
  :func:`full_precision` and re-enter the caller's autocast around each call of ``f`` with
  :func:`caller_autocast`.

Examples:
    >>> import torch
    >>> device = resolve_device("cpu")
    >>> with autocast("bf16", device):
    ...     y = torch.nn.Linear(4, 4)(torch.ones(2, 4))
    >>> y.dtype
    torch.bfloat16
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

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
    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():  # "cuda" or "cuda:N"
        raise ConfigError(f"device={name!r} is not available: this torch sees no CUDA device; "
                          "use device='cpu' or 'auto'")
    index = int(name[5:]) if ":" in name else None
    if index is not None and index >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r} is not available: {torch.cuda.device_count()} "
                          "CUDA device(s) are visible")
    return torch.device(name)


def check_device(name: str) -> None:
    """Raise :class:`ConfigError` unless ``name`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto``
    (whether CUDA is there is :func:`resolve_device`'s check)."""
    if not isinstance(name, str) or not (
            name in DEVICES or (name.startswith("cuda:") and name[5:].isdigit())):
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


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it on ``device``: tensors (dense or sparse), and tuples, lists,
    dicts and dataclass instances of them, recursively; anything else is returned as it is.

    A tensor already there is returned itself (no copy), so on the CPU this costs nothing.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=obj.device.type == "cpu" and obj.is_pinned())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_device(getattr(obj, f.name), device)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for the work queued on ``device`` (every CUDA device in use when ``None``); nothing on
    the CPU or when CUDA was never initialised."""
    if device is not None and torch.device(device).type != "cuda":
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device)


def clock(device: torch.device | str | None = None) -> float:
    """``time.perf_counter()`` after :func:`synchronize`: differences of two calls are the wall
    time of the work between them, on a GPU too."""
    synchronize(device)
    return time.perf_counter()
