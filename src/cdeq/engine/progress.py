"""Progress bars that stay quiet when output is not a terminal (CI logs, tests)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def progress(iterable: Iterable, total: int | None = None, desc: str = "", **kwargs: Any) -> tqdm:
    """A tqdm bar; disabled when stderr is not a terminal or ``CDEQ_PROGRESS=0``."""
    flag = os.environ.get("CDEQ_PROGRESS")
    disable = flag == "0" if flag is not None else not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, **kwargs)
