"""Where the data sets live: one lookup for every task, read at call time.

``$CDEQ_DATA`` names the data folder when set. Otherwise the folder is the first
``shared/data`` that exists in a folder above this package (the project's shared data folder
beside the checkout) or in the current directory.

Examples:
    >>> data_dir() / "mnist" / "mnist.npz"        # doctest: +SKIP
    PosixPath('.../shared/data/mnist/mnist.npz')
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "data_file"]

_RELATIVE = Path("shared") / "data"


def _candidates() -> list[Path]:
    env = os.environ.get("CDEQ_DATA")
    if env:
        return [Path(env).expanduser()]
    above = [parent / _RELATIVE for parent in Path(__file__).resolve().parents]
    return [*above, Path.cwd() / _RELATIVE]


def data_dir() -> Path:
    """The data folder: ``$CDEQ_DATA`` (read now, not at import) or the first ``shared/data``
    found above this package or in the current directory (the nearest candidate if none
    exists, so that an error can name it)."""
    candidates = _candidates()
    return next((path for path in candidates if path.is_dir()), candidates[0])


def data_file(relative: str | Path, what: str) -> Path:
    """``data_dir() / relative``, raising ``FileNotFoundError`` that names the file, ``what`` it is
    and how to point cdeq at it when it is missing."""
    path = data_dir() / relative
    if not path.exists():
        raise FileNotFoundError(
            f"{what} was not found at {str(path)!r}; set CDEQ_DATA to the folder holding "
            f"{str(Path(relative))!r} or give data=PATH (--data)")
    return path
