"""Validated dataclass configuration.

Every configuration in cdeq derives from :class:`Config`: building one from a mapping rejects
unknown keys (naming the allowed ones) and values whose type does not match the field's type hint
(a section given a scalar, a number given a string: the error names the full key path, e.g.
``teacher.train_solver.max_iter``, and the expected form), and ``validate`` runs on construction
so a bad value is an error at the point where it was written, not deep inside a training loop.

Examples:
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

import copy
import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration key or value a user wrote is not valid.

    ``key_path`` is the section the message already names (set by :meth:`Config.from_dict`).
    """

    key_path: str = ""


def _suggest(key: str, allowed: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """A :class:`ConfigError` naming ``name`` and the allowed values unless ``value`` is in ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; allowed values: {choices}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """A :class:`ConfigError` unless ``value`` is a number > 0 (>= 0 with ``allow_zero``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value >= 0 if allow_zero else value > 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value!r} is not valid; it must be a number {bound}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    """A :class:`ConfigError` unless ``value`` is a number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(f"{name}={value!r} is not valid; it must lie in [{low}, {high}]")


def check_bool(name: str, value: bool) -> None:
    """A :class:`ConfigError` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not valid; it must be true or false")


def check_int(name: str, value: int, minimum: int = 0) -> None:
    """A :class:`ConfigError` unless ``value`` is an integer >= ``minimum`` (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is not valid; it must be an integer >= {minimum}")


#: nested keys whose mapping replaces the one beneath instead of merging into it: solver options
#: belong to the solver named next to them (another solver rejects the first one's options)
REPLACED_KEYS = frozenset({"options"})


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``; nested mappings merge key by key, except those under a key
    in :data:`REPLACED_KEYS`, which ``override`` replaces whole. Neither argument is changed."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key not in REPLACED_KEYS:
            value = merged(out[key], value)
        out[key] = copy.deepcopy(value)
    return out


#: the form each plain field type expects, as a user reads it in an error message
_FORMS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          tuple: "a list, e.g. [1, 2]", list: "a list, e.g. [1, 2]", dict: "a mapping (a JSON object)",
          type(None): "null"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the kind the type hint ``hint`` asks for (bool is no number)."""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (tuple, list):
        return isinstance(value, (tuple, list))
    if hint is dict:
        return isinstance(value, Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (tuple, list, dict):
        return _fits(value, origin)
    return True  # Any, type variables, literals...: left to validate()


def _form(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, Config):
        keys = sorted(f.name for f in dataclasses.fields(hint))
        return f"a mapping of {hint.__name__} settings (keys: {keys})"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_form(a) for a in typing.get_args(hint))
    return _FORMS.get(typing.get_origin(hint) or hint, str(hint))


def _at(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_keys(where: str, given: Iterable[str], allowed: Iterable[str], key_path: str = "") -> None:
    """Raise :class:`ConfigError` for any key of ``given`` not in ``allowed`` (named with its full
    path when ``key_path`` says where the section sits)."""
    allowed = sorted(allowed)
    for key in given:
        if key not in allowed:
            raise ConfigError(f"unknown key {_at(key_path, str(key))!r} in {where}"
                              f"{_suggest(str(key), allowed)}; allowed keys: {allowed}")


@dataclasses.dataclass
class Config:
    """Base class: strict ``from_dict``/``to_dict`` and validation on construction."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check values; subclasses raise :class:`ConfigError` naming the bad key."""

    @classmethod
    def from_dict(cls: type[C], data: Mapping[str, Any] | None = None, *, key_path: str = "",
                  **overrides: Any) -> C:
        """Build from a mapping: unknown keys, values of the wrong type and nested sections that
        are not mappings raise :class:`ConfigError` naming the full key (``key_path`` is where
        this section sits, e.g. ``teacher.train_solver``); the values are then validated."""
        if not isinstance(data, Mapping) and data is not None:
            raise ConfigError(f"{key_path or cls.__name__}={data!r} is not valid; expected {_form(cls)}")
        data = dict(data or {})
        data.update(overrides)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        check_keys(cls.__name__, data, fields, key_path)
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in data.items():
            hint, path = hints.get(key, Any), _at(key_path, key)
            if isinstance(hint, type) and issubclass(hint, Config):
                if isinstance(value, hint):
                    value = value.to_dict()
                if not isinstance(value, Mapping):
                    named = "name" in {f.name for f in dataclasses.fields(hint)} and isinstance(value, str)
                    hint_ = f" (to choose one by name, set {path}.name={value})" if named else ""
                    raise ConfigError(f"{path}={value!r} is not valid; expected {_form(hint)}{hint_}")
                # merge over the field's own default, not the section class's defaults
                field = fields[key]
                base = field.default_factory() if field.default_factory is not dataclasses.MISSING \
                    else field.default
                if isinstance(base, Config):
                    value = merged(base.to_dict(), value)
                value = hint.from_dict(value, key_path=path)
            elif not _fits(value, hint):
                raise ConfigError(f"{path}={value!r} is not valid; expected {_form(hint)}")
            elif isinstance(value, list) and (hint is tuple or typing.get_origin(hint) is tuple):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigError as err:
            if key_path and not getattr(err, "key_path", ""):
                err = ConfigError(f"{key_path}: {err}")
                err.key_path = key_path  # the outer sections do not prefix it again
                raise err from None
            raise
        except TypeError as err:  # a field given a value of the wrong kind
            raise ConfigError(f"{key_path or cls.__name__}: {err}") from err

    def fill_defaults(self, values: Mapping[str, Any]) -> None:
        """Set each field named in ``values`` that still holds its declared default (a preset
        under the values a user gave: ``size="paper"``, ``quick=True``); call before validation."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for key, value in values.items():
            if getattr(self, key) == defaults[key]:
                setattr(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """The configuration as nested plain data (what ``config.json`` holds)."""
        return dataclasses.asdict(self)

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes``; an unknown key is a :class:`ConfigError` naming the allowed ones."""
        check_keys(type(self).__name__, changes, [f.name for f in dataclasses.fields(self)])
        return dataclasses.replace(self, **changes)
