"""Task domains: each a dataset, a DEQ cell, a head and a metric. Importing this package
registers the built-in tasks."""

import importlib

from .base import TASKS, Batch, Task, register_task

for _module in ("images", "text", "graphs"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _err:  # a domain not written yet, or its optional extra missing
        if _err.name not in (f"{__name__}.{_module}",):
            raise

__all__ = ["TASKS", "Batch", "Task", "register_task"]
