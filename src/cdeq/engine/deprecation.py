"""Old import paths kept working for one release: ``import cdeq.pipeline`` finds
:mod:`cdeq.run.stages` and warns with a :class:`DeprecationWarning` that names the new path.

Examples:
    >>> install_aliases("cdeq", {"fit": "cdeq.engine.fit"})  # doctest: +SKIP
    >>> import cdeq.fit  # DeprecationWarning: cdeq.fit moved to cdeq.engine.fit  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

__all__ = ["install_aliases"]


class _AliasLoader(importlib.abc.Loader):
    """Loads an old name as the module at its new path (the same module object)."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there (the old path goes "
                      "in the next release)", DeprecationWarning, stacklevel=4)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the module was imported at its new path."""


class _AliasFinder(importlib.abc.MetaPathFinder):
    def __init__(self, aliases: dict[str, str]) -> None:
        self.aliases = aliases

    def find_spec(self, fullname: str, path: object = None, target: object = None
                  ) -> importlib.machinery.ModuleSpec | None:
        new = self.aliases.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install_aliases(package: str, moved: dict[str, str]) -> None:
    """Let ``package.<old>`` import as the module at ``moved[old]`` (a full module path), with a
    ``DeprecationWarning``. Installing the same package's aliases again replaces them."""
    aliases = {f"{package}.{old}": new for old, new in moved.items()}
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not (isinstance(f, _AliasFinder) and set(f.aliases) == set(aliases))]
    sys.meta_path.append(_AliasFinder(aliases))
