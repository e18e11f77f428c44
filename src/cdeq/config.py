"""Validated dataclass configuration.

Every configuration in cdeq derives from :class:`Config`: building one from a mapping rejects
unknown keys (naming the allowed ones), and ``validate`` runs on construction so a bad value is
an error at the point where it was written, not deep inside a training loop.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Opt(Config):
    ...     lr: float = 1e-3
    ...     def validate(self) -> None:
    ...         check_positive("lr", self.lr)
    >>> Opt.from_dict({"lr": 0.1}).lr
    0.1
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration key or value a user wrote is not valid."""


def _suggest(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; allowed values: {choices}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} is not valid; it must be a number {bound}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name}={value!r} is not valid; it must lie in [{low}, {high}]")


def check_int(name: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not valid; it must be an integer >= {minimum}")


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, nested mappings merged key by key."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            value = _merged(out[key], value)
        out[key] = value
    return out


def check_keys(where: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Raise :class:`ConfigError` for any key of ``given`` not in ``allowed``."""
    allowed = sorted(allowed)
    for key in given:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r} in {where}{_suggest(key, allowed)}; allowed keys: {allowed}"
            )


@dataclasses.dataclass
class Config:
    """Base class: strict ``from_dict``/``to_dict`` and validation on construction."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values; subclasses raise :class:`ConfigError` naming the bad key."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None = None, **overrides: Any) -> C:
        """Build from a mapping; unknown keys and nested config sections are checked."""
        data = dict(data or {})
        data.update(overrides)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        check_keys(cls.__name__, data, fields)
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            hint = hints.get(key)
            if (
                isinstance(hint, type)
                and issubclass(hint, Config)
                and isinstance(value, Mapping)
            ):
                # merge over the field's own default, not the section class's defaults
                field = fields[key]
                base = field.default_factory() if field.default_factory is not dataclasses.MISSING \
                    else field.default
                if isinstance(base, Config):
                    value = _merged(base.to_dict(), value)
                value = hint.from_dict(value)
            elif isinstance(value, list) and isinstance(fields[key].default, tuple):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as err:  # a field given a value of the wrong kind
            raise ConfigError(f"{cls.__name__}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        check_keys(type(self).__name__, changes, [f.name for f in dataclasses.fields(self)])
        return dataclasses.replace(self, **changes)
