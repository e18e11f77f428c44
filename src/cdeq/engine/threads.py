"""How many intra-op threads a run uses: its fair share of the cores it may run on.

Two threads that fight other processes for two cores run slower than one: each parallel region
waits at its barrier for the thread the scheduler put aside, and OpenMP's waiting threads spin.
The automatic policy (``threads=0``) therefore counts the cores this process may use
(``os.sched_getaffinity``), subtracts the cores other processes keep busy right now (sampled from
``/proc/stat`` over a short window; the 1-minute load average where that is unavailable), and
uses what is left, at least one thread. ``OMP_NUM_THREADS`` set by the user wins over the
automatic choice; an explicit ``threads=N`` wins over both. A run (:class:`cdeq.run.stages.Run`)
applies the policy once, when its first stage starts (or ``run.threads`` is read), so read-only
uses of a run directory (describe, summarize, loading a model) never wait for the sample.

OpenMP's wait policy (``OMP_WAIT_POLICY=PASSIVE``: waiting threads sleep instead of spinning) is
read once, when ``import torch`` loads the OpenMP runtime, so it cannot be changed from here; it
can only be set in the environment before Python starts. :func:`wait_policy` reports it.

Examples:
    >>> from cdeq.engine.threads import choose_threads
    >>> choose_threads(0, cores=2, busy=1.0)   # one of two cores taken by another process
    1
    >>> choose_threads(0, cores=2, busy=0.1)
    2
    >>> choose_threads(3, cores=2, busy=2.0)   # an explicit request is kept
    3
"""

from __future__ import annotations

import logging
import math
import os
import time

from .config import ConfigError

log = logging.getLogger(__name__)

MARGIN = 0.3
"""A core counts as free when at most this fraction of it is busy (the sampling's own noise)."""


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity API (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def cpu_times(cpus: set[int] | None, path: str = "/proc/stat") -> tuple[float, float]:
    """``(busy, total)`` jiffies summed over ``cpus`` (all when ``None``) from ``/proc/stat``."""
    busy = total = 0.0
    with open(path) as fh:
        for line in fh:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            if cpus is not None and int(name[3:]) not in cpus:
                continue
            values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle = values[3] + values[4]
            total += sum(values)
            busy += sum(values) - idle
    return busy, total


def busy_cores(window: float = 0.2) -> float | None:
    """How many of this process's cores other processes keep busy now (``None``: unknown).

    Samples ``/proc/stat`` twice, ``window`` seconds apart, while this process sleeps, so its own
    work does not count; falls back to the 1-minute load average (which includes this process).
    """
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = None
    try:
        b0, t0 = cpu_times(cpus)
        time.sleep(window)
        b1, t1 = cpu_times(cpus)
        if t1 > t0:
            n = len(cpus) if cpus is not None else (os.cpu_count() or 1)
            return n * (b1 - b0) / (t1 - t0)
    except (OSError, ValueError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def choose_threads(requested: int, cores: int, busy: float | None,
                   env_threads: str | None = None) -> int:
    """The thread count for a run (pure logic, no side effects).

    Args:
        requested: ``threads`` from the configuration; ``N > 0`` is used as is, 0 is automatic.
        cores: cores this process may use.
        busy: cores other processes keep busy (``None``: unknown, then all cores are assumed free).
        env_threads: the value of ``OMP_NUM_THREADS``, if the user set it (used when automatic).
    """
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ConfigError(f"threads={requested!r} is not valid; use 0 (automatic) or a positive int")
    if requested > 0:
        return requested
    if env_threads:
        try:
            return max(1, int(env_threads))
        except ValueError:
            log.warning("OMP_NUM_THREADS=%r is not an integer; ignoring it", env_threads)
    free = cores if busy is None else cores - max(0.0, busy)
    return max(1, min(cores, math.floor(free + MARGIN)))


def wait_policy() -> str:
    """OpenMP's wait policy as the runtime read it at start (``OMP_WAIT_POLICY`` or default)."""
    return os.environ.get("OMP_WAIT_POLICY", "default (spin, then sleep)")


def apply_thread_policy(requested: int) -> int:
    """Set ``torch``'s intra-op thread count for this run and return it (0 = automatic)."""
    import torch

    cores = available_cores()
    env = os.environ.get("OMP_NUM_THREADS")
    busy = None if requested or env else busy_cores()  # sample only when the load decides
    threads = choose_threads(requested, cores, busy, env)
    torch.set_num_threads(threads)
    log.info("threads: %d (requested %s, %d cores, %s busy elsewhere, OpenMP wait policy %s)",
             threads, requested or "auto", cores, "?" if busy is None else f"{busy:.1f}",
             wait_policy())
    return threads
