"""A run directory: its lock, its ``config.json``, its log and the files its stages leave.

:class:`RunDirectory` holds what every stage of :class:`cdeq.run.stages.Run` needs around the
stage itself:

- one writer at a time: :meth:`RunDirectory.locked` holds the OS lock ``DIR/.lock`` (see
  :func:`cdeq.engine.io.acquire_lock`); a second process gets :class:`cdeq.engine.io.BusyError` naming the PID
  that holds it;
- ``config.json`` is written once the configuration and the data are known to be good, and an
  existing one must hold the same configuration (:meth:`RunDirectory.adopt_config`), unless no
  stage has left a file yet: a start that failed never blocks the corrected retry;
- stage outputs and epoch checkpoints are saved and loaded with errors that say how to recover;
  :meth:`RunDirectory.done` and :meth:`RunDirectory.recorded` check what ``cdeq run`` would skip,
  rename a damaged file ``NAME.corrupt-<time>`` and let its stage run again;
- :meth:`RunDirectory.resumed` is the stage runner of the trained stages: resume from the
  checkpoint, run the loop, checkpoint after each epoch;
- ``DIR/log.txt`` receives cdeq's log lines (every module logger under ``cdeq``, INFO and above)
  while the directory is held: the library logs through module loggers and the run directory
  keeps what they said.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..consistency.arrays import TrajectoryArrays
from ..consistency.trajectory import TrajectoryStore
from ..engine import distributed
from ..engine.config import ConfigError
from ..engine.fit import LayerCalls
from ..engine.io import (
    CorruptFileError,
    acquire_lock,
    load_checkpoint,
    load_tensors,
    read_json,
    release_lock,
    save_checkpoint,
    save_tensors,
    set_aside,
    write_json,
)

logger = logging.getLogger("cdeq.run")

LOCK = ".lock"
#: the command whose stage writes each output (unrolled_k* and learned_init: ``baselines``)
MAKER = {"teacher": "train", "student": "distill", "student_plus": "plus", "student_tuned": "tune"}
#: the files stages leave; a directory holding none of them has no run worth protecting
STAGE_FILES = ("*.safetensors", "*.ckpt", "trajectories/*.safetensors", "trajectories/manifest.json",
               "report.json")


def writes(method: Callable) -> Callable:
    """Mark a stage method: it runs holding the run directory's lock."""
    @functools.wraps(method)
    def stage(self: RunDirectory, *args: Any, **kwargs: Any) -> Any:
        with self.locked():
            return method(self, *args, **kwargs)
    return stage


class _LogFile(logging.Handler):
    """Appends each log line to a run's ``log.txt`` as ``HH:MM:SS message`` (rank 0 only)."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        if not distributed.is_main():
            return
        try:
            stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
            with open(self.path, "a") as fh:
                fh.write(f"{stamp} {record.getMessage()}\n")
        except Exception:  # noqa: BLE001 - logging must not break the run
            self.handleError(record)


class RunDirectory:
    """The files of a run in ``path``. While it is held (a stage runs, or :meth:`hold`), cdeq's
    log lines (the ``cdeq`` loggers, INFO and above) are also appended to ``DIR/log.txt``."""

    def __init__(self, path: str | Path) -> None:
        self.dir = Path(path)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"--out {self.dir} is an existing file, not a directory; name a new "
                              "directory or an existing run directory")
        self._log_file: _LogFile | None = None
        self._log_depth = 0  # nested holds of the log file
        self._log_level = logging.NOTSET  # the cdeq logger's level before the log file was attached
        self._held = False  # the lock taken by hold(), dropped by close()
        self._repair = False  # True in `cdeq run`: damaged checkpoints are set aside, not refused

    # --- the lock -------------------------------------------------------------------------------
    def _acquire(self) -> bool:
        """Take the lock (rank 0 only: the ranks of one torchrun share the directory)."""
        if not distributed.is_main():
            return False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the run directory {self.dir}: {err.strerror or err}; "
                              "choose another --out") from err
        acquire_lock(self.dir / LOCK)
        return True

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the directory's lock for the body (counted: nested use is fine in one process)."""
        held = self._acquire()
        if held:
            self._attach_log()
        try:
            yield
        finally:
            if held:
                self._detach_log()
                release_lock(self.dir / LOCK)

    def hold(self) -> None:
        """Take the lock until :meth:`close` (or the end of a ``with`` block)."""
        if not self._held:
            self._held = self._acquire()
            if self._held:
                self._attach_log()

    def close(self) -> None:
        if self._held:
            self._held = False
            self._detach_log()
            release_lock(self.dir / LOCK)

    def _attach_log(self) -> None:
        """Send the ``cdeq`` loggers' lines to ``DIR/log.txt`` too (INFO and above: the logger's
        level is lowered to INFO meanwhile when it was higher)."""
        self._log_depth += 1
        if self._log_depth > 1:
            return
        root = logging.getLogger("cdeq")
        self._log_file, self._log_level = _LogFile(self.dir / "log.txt"), root.level
        root.addHandler(self._log_file)
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)

    def _detach_log(self) -> None:
        self._log_depth -= 1
        if self._log_depth > 0 or self._log_file is None:
            return
        root = logging.getLogger("cdeq")
        root.removeHandler(self._log_file)
        root.setLevel(self._log_level)
        self._log_file = None

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a dropped Run does not keep its directory locked
        with contextlib.suppress(Exception):  # at interpreter shutdown the OS drops it anyway
            self.close()

    # --- configuration and log --------------------------------------------------------------------
    def adopt_config(self, new: dict, normalise: Callable[[dict], dict]) -> None:
        """Write ``new`` to ``config.json`` (call it holding the lock). An existing file must hold
        the same configuration once ``normalise`` fills the keys added since, unless no stage
        has left a file yet: then the new configuration replaces it (logged)."""
        path = self.dir / "config.json"
        if path.exists():
            written = read_json(path)
            old = normalise(written)
            if old == new:
                if written != new and distributed.is_main():
                    write_json(path, new)  # the same run, written out with the keys added since
                return
            outputs = self.stage_files()
            if outputs:
                raise ConfigError(
                    f"{self.dir} already holds a run with another configuration (differing in "
                    f"{differences(old, new)}; outputs: {', '.join(outputs[:3])}); use a new --out "
                    "directory, or delete the old run to start over")
            self.log("replacing the configuration of an earlier start that left no stage output "
                     f"(differing in {differences(old, new)})")
        if distributed.is_main():  # under torchrun only rank 0 writes run files
            write_json(path, new)

    def stage_files(self) -> list[str]:
        """The files stages have left (names relative to the directory)."""
        return [str(p.relative_to(self.dir)) for pattern in STAGE_FILES
                for p in sorted(self.dir.glob(pattern))]

    def log(self, msg: str) -> None:
        """Log ``msg`` (logger ``cdeq.run``, INFO); it reaches ``log.txt`` while the directory is
        held. Under torchrun only rank 0 speaks for the run."""
        if distributed.is_main():
            logger.info(msg)

    # --- stage outputs ----------------------------------------------------------------------------
    def _redo(self, name: str) -> str:
        return f"`cdeq {MAKER.get(name, 'baselines')} --out {self.dir}`"

    def save_module(self, name: str, module: torch.nn.Module, meta: dict) -> None:
        """Write ``DIR/NAME.safetensors`` with ``meta`` and the intra-op threads its stage ran with
        (the weights depend on them: floating-point sums are split differently)."""
        meta = {**meta, "threads": torch.get_num_threads()}
        if distributed.is_main():
            save_tensors(self.dir / f"{name}.safetensors", module.state_dict(), kind=name, meta=meta)
        distributed.barrier()  # the other ranks read it next

    def _read(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        path = self.dir / f"{name}.safetensors"
        try:
            return load_tensors(path, kind=name)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}: run {self._redo(name)} first (or `cdeq run`)") from err
        except CorruptFileError as err:
            raise CorruptFileError(f"{err}. Move it away and run {self._redo(name)} to redo its stage "
                                   "(`cdeq run` with the run's settings does both by itself)") from err

    def stage_threads(self) -> dict[str, int]:
        """``{module: intra-op threads its stage ran with}`` for the saved modules that say."""
        metas = {path.stem: self.read_meta(path.stem) for path in sorted(self.dir.glob("*.safetensors"))}
        return {name: meta["threads"] for name, meta in metas.items() if "threads" in meta}

    def read_meta(self, name: str) -> dict:
        """The JSON metadata of ``DIR/NAME.safetensors`` (checked like :meth:`load_module`)."""
        return self._read(name)[1]

    def load_module(self, name: str, module: torch.nn.Module) -> dict:
        """Load ``DIR/NAME.safetensors`` into ``module``; returns its metadata."""
        tensors, meta = self._read(name)
        try:
            module.load_state_dict(tensors)
        except RuntimeError as err:  # the whole message: missing, unexpected and mis-shaped keys
            raise ConfigError(
                f"{self.dir / name}.safetensors does not match the model built from config.json "
                f"(written by another configuration or version of the task):\n{err}\nMove it away "
                f"and run {self._redo(name)} to redo its stage") from err
        return meta

    def done(self, name: str, what: str) -> bool:
        """Whether ``DIR/NAME.safetensors`` exists and is whole (logged as skipping ``what``); a
        damaged one is renamed ``NAME.safetensors.corrupt-<time>`` so that its stage runs again."""
        path = self.dir / f"{name}.safetensors"
        if not path.exists():
            return False
        try:
            load_tensors(path, kind=name)
        except CorruptFileError as err:
            self.log(f"{path.name} is damaged ({err}); moved it to {set_aside(path).name} and "
                     f"redoing {what}")
            return False
        self.log(f"{path.name} exists: skipping {what}")
        return True

    def recorded(self) -> bool:
        """Whether the trajectories are complete. Damaged shards are set aside; missing or damaged
        ones are logged and make recording run again (it keeps the whole shards)."""
        store = TrajectoryStore(self.dir / "trajectories")
        manifest = store.root / store.MANIFEST
        if not manifest.exists():
            return False
        try:
            written = read_json(manifest)
        except (CorruptFileError, ValueError):
            written = {}
        if isinstance(written, dict) and written.get("mode") == "online":
            return getattr(self, "_online", None) is not None  # held in memory by this process
        if isinstance(written, dict) and written.get("format") == "arrays":
            store = TrajectoryArrays(self.dir / "trajectories")
        try:
            missing, damaged = store.check()
        except CorruptFileError as err:
            self.log(f"{err}; moved it to {set_aside(manifest).name} and recording again")
            return False
        for path, why in damaged:
            self.log(f"trajectory shard {path.name} is damaged ({why}); moved it to "
                     f"{set_aside(path).name}")
        lost = sorted(p.name for p in missing + [p for p, _ in damaged])
        if lost:
            names = ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
            self.log(f"trajectories/{store.MANIFEST} lists {len(store)} shards but {len(lost)} of "
                     f"them are missing or damaged ({names}): recording those again")
            return False
        self.log("trajectories exist: skipping recording")
        return True

    # --- epoch checkpoints and the stage runner -----------------------------------------------------
    def write_checkpoint(self, name: str, payload: dict) -> None:
        if distributed.is_main():
            save_checkpoint(self.dir / f"{name}.ckpt", payload)  # versioned + checksummed, atomic

    def read_checkpoint(self, name: str) -> dict | None:
        path = self.dir / f"{name}.ckpt"
        if not path.exists():
            return None
        try:
            return load_checkpoint(path)  # CorruptFileError naming the file when it is damaged
        except CorruptFileError as err:
            if not self._repair:
                raise
            self.log(f"{path.name} is damaged ({err}); moved it to {set_aside(path).name}: the stage "
                     "starts from its first epoch")
            return None

    def resumed(self, name: str, module: torch.nn.Module, what: str,
                loop: Callable[[int, dict | None, Callable[[int, dict], None]], dict],
                stage: str = "", counted: LayerCalls | None = None) -> dict:
        """Run a trained stage: resume ``module`` from ``DIR/NAME.ckpt`` when there is one, run
        ``loop(start_epoch, state, on_epoch_end)`` (``on_epoch_end(epoch, state)`` writes the
        checkpoint) and return the loop's history (a resumed loop's holds the earlier epochs too).
        The stage's work counted so far (``counted``'s layer calls, the samples this rank added to
        ``distributed.TALLY`` under ``stage``) is kept in the checkpoint and restored with it, so
        a resumed stage reports the work of an uninterrupted one."""
        start, state = 0, None
        ckpt = self.read_checkpoint(name)
        if ckpt is not None:
            module.load_state_dict(ckpt["model"])
            start, state = ckpt["epoch"] + 1, ckpt["state"]
            done = ckpt.get("counted", {})
            if counted is not None:
                counted.calls += int(done.get("calls", 0))
                counted.rows += int(done.get("rows", 0))
            if stage:
                distributed.TALLY.add(stage, int(done.get("samples", 0)))
            self.log(f"resuming {what} after epoch {start}")

        def save(epoch: int, st: dict) -> None:
            work = {"calls": counted.calls if counted is not None else 0,
                    "rows": counted.rows if counted is not None else 0,
                    "samples": distributed.TALLY.counts.get(stage, 0) if stage else 0}
            self.write_checkpoint(name, {"epoch": epoch, "model": module.state_dict(), "state": st,
                                         "counted": work})

        return loop(start, state, save)


def differences(old: dict, new: dict) -> str:
    """The dotted keys whose values differ between two configurations (the first five)."""
    found: list[str] = []

    def walk(a: dict, b: dict, prefix: str) -> None:
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            if isinstance(x, dict) and isinstance(y, dict):
                walk(x, y, f"{prefix}{key}.")
            elif x != y:
                found.append(f"{prefix}{key}: {json.dumps(x)} -> {json.dumps(y)}")

    walk(old, new, "")
    return ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
