"""Recipes that rebuild a user's modules: each module's import path and init arguments, as JSON.

:func:`describe` turns a module into ``{"class": "pkg.mod:Name", "init": {...}}`` (nested modules
inside), :func:`build` turns that back into a fresh module; the weights then come from a file.
The init arguments come from, in order:

1. the arguments recorded by the :func:`saveable` class decorator (any class, any arguments that
   are JSON values or modules);
2. ``nn.Sequential``/``nn.ModuleList``: their children;
3. otherwise the ``__init__`` signature, each argument read from the attribute of the same name
   (``self.width = width``); arguments not stored fall back to their defaults. A recipe found
   this way is checked by rebuilding the module and comparing parameter names and shapes.

A plain function (a parameter-free cell ``f(z, u)``) is recorded by its import path. Loading
imports the named modules: load recipes only from sources you trust, as with any code.

Examples:
    >>> from torch import nn
    >>> describe(nn.Linear(3, 4))
    {'class': 'torch.nn.modules.linear:Linear', 'init': {'in_features': 3, 'out_features': 4}}
    >>> build(describe(nn.Linear(3, 4, bias=False))).bias is None
    True
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

from torch import nn

from ..engine.config import ConfigError

_JSON = (bool, int, float, str, type(None))
_CONTAINERS = (nn.Sequential, nn.ModuleList)


def saveable(cls: type) -> type:
    """Class decorator: record each instance's init arguments so that it can be rebuilt.

    :meth:`cdeq.Pipeline.save_pretrained` writes a module's import path and init arguments;
    without this decorator they are read from attributes of the same names. Use it on a class
    whose arguments are not kept as attributes. The arguments must be JSON data or modules
    that can themselves be recorded.

    Examples:
        >>> @saveable
        ... class Cell(nn.Module):
        ...     def __init__(self, width: int, scale: float = 0.5):
        ...         super().__init__()
        ...         self.lin = nn.Linear(width, width)     # ``width`` is not kept as an attribute
        ...         self.scale = scale                     # doctest: +SKIP
    """
    init = cls.__init__
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        if type(self) is cls:  # the most derived decorated class records its own arguments
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(signature.parameters)))  # self
            object.__setattr__(self, "_cdeq_init", arguments)
        init(self, *args, **kwargs)

    cls.__init__ = wrapped
    return cls


def import_path(obj: Any) -> str:
    """``"package.module:Qualified.name"`` of a class or function defined at module level."""
    qual = getattr(obj, "__qualname__", "")
    if "<locals>" in qual or "<lambda>" in qual or not qual:
        raise ConfigError(f"{obj!r} is defined inside a function (or is a lambda), so it cannot be "
                          "imported when loading; define it at module level")
    return f"{obj.__module__}:{qual}"


def resolve(path: str) -> Any:
    """The object named by :func:`import_path`; a clear error when it cannot be imported."""
    module_name, _, qual = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import {path!r} ({type(err).__name__}: {err}); make the module "
                          "that defines it importable (install it or add it to PYTHONPATH)") from err
    return obj


def _is_json(value: Any) -> bool:
    if isinstance(value, _JSON):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _encode(name: str, value: Any, owner: str) -> Any:
    if _is_json(value):
        return value
    if isinstance(value, nn.Module) or inspect.isfunction(value):
        return {"__module__": describe(value)}
    raise ConfigError(f"{owner}: init argument {name!r} is a {type(value).__name__}, which cannot be "
                      "written as JSON; give the class JSON-valued or module arguments")


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"__module__"}:
        return build(value["__module__"])
    return value


def _inferred_init(module: nn.Module) -> dict[str, Any]:
    cls = type(module)
    init: dict[str, Any] = {}
    for name, param in list(inspect.signature(cls.__init__).parameters.items())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = getattr(module, name, inspect.Parameter.empty)
        if _is_json(value) or (isinstance(value, nn.Module) and name in module._modules):
            init[name] = value
        elif param.default is inspect.Parameter.empty:
            raise ConfigError(
                f"cannot tell how to rebuild {cls.__name__}: its init argument {name!r} is not "
                f"stored as an attribute of that name; store it (self.{name} = {name}) or decorate "
                "the class with @cdeq.saveable")
    return init


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def describe(module: Any) -> dict[str, Any] | None:
    """A JSON recipe that rebuilds ``module`` (an ``nn.Module``, a function or ``None``)."""
    if module is None:
        return None
    if inspect.isfunction(module):
        return {"function": import_path(module)}
    from ..deq.model import FunctionCell

    if isinstance(module, FunctionCell):
        return describe(module.fn)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"cannot save a {type(module).__name__}: give an nn.Module or a function")
    cls = type(module)
    path = import_path(cls)
    if isinstance(module, _CONTAINERS) and cls in _CONTAINERS:
        return {"class": path, "children": [describe(m) for m in module]}
    recorded = getattr(module, "_cdeq_init", None)
    init = recorded if recorded is not None else _inferred_init(module)
    recipe = {"class": path, "init": {k: _encode(k, v, cls.__name__) for k, v in init.items()}}
    if recorded is None:
        rebuilt = build(recipe)
        if _shapes(rebuilt) != _shapes(module):
            raise ConfigError(
                f"cannot tell how to rebuild {cls.__name__}: rebuilt from the attributes "
                f"{recipe['init']} it has other parameters than the original; decorate the class "
                "with @cdeq.saveable so that its init arguments are recorded")
    return recipe


def build(recipe: dict[str, Any] | None) -> Any:
    """The module (or function) a :func:`describe` recipe names, freshly initialised."""
    if recipe is None:
        return None
    if "function" in recipe:
        fn = resolve(recipe["function"])
        if not callable(fn):
            raise ConfigError(f"{recipe['function']!r} is not callable")
        return fn
    cls = resolve(recipe["class"])
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"{recipe['class']!r} is not an nn.Module class")
    if "children" in recipe:
        return cls(*[build(r) for r in recipe["children"]])
    try:
        return cls(**{k: _decode(v) for k, v in recipe.get("init", {}).items()})
    except TypeError as err:
        raise ConfigError(f"cannot rebuild {recipe['class']} from {recipe.get('init')}: {err}") from err
