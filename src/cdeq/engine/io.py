"""Safe files: atomic writes, versioned and checksummed safetensors, nested tensor structures.

Every file cdeq writes goes to a temporary file in the same folder and is renamed into place, so
an interrupted run leaves either the old file or the new one, never half of one; its mode is the
one the umask gives a new file (0644 under umask 022). Tensor files carry a format version and a
SHA-256 of their tensors in the safetensors metadata; loading checks both and names the file when
something is wrong. :func:`hold_lock` is the OS lock that keeps two processes from writing one run
directory at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

try:
    import fcntl
except ImportError:  # not a POSIX system: run directories are not locked
    fcntl = None

FORMAT_VERSION = 1


class CorruptFileError(ValueError):
    """A file cdeq wrote is truncated, corrupted, or of another format or kind."""


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read by setting and restoring
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename; the file gets the
    mode a plain ``open(path, "w")`` would give it (``0666`` less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temporary file renamed into place."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path``, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; a file that is not JSON is a :class:`CorruptFileError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err})") from err


def _digest(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], kind: str,
                 meta: Mapping[str, Any] | None = None) -> None:
    """Save ``tensors`` atomically with ``kind``, format version, checksum and JSON ``meta``."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "cdeq_format": str(FORMAT_VERSION),
        "kind": kind,
        "sha256": _digest(tensors),
        "meta": json.dumps(dict(meta or {})),
    }
    atomic_write_bytes(path, st_save(tensors, metadata=metadata))


def load_tensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_tensors`; checks kind, version and checksum."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError, Exception) as err:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({err})") from err
    metadata = header.get("__metadata__") or {}
    if metadata.get("cdeq_format") != str(FORMAT_VERSION):
        raise CorruptFileError(
            f"{path} has format version {metadata.get('cdeq_format')!r}; "
            f"this cdeq reads version {FORMAT_VERSION}"
        )
    if metadata.get("kind") != kind:
        raise CorruptFileError(f"{path} holds a {metadata.get('kind')!r}, expected a {kind!r}")
    if metadata.get("sha256") != _digest(tensors):
        raise CorruptFileError(f"{path} failed its checksum: the file is corrupted")
    return tensors, json.loads(metadata.get("meta", "{}"))


def safetensors_damage(path: str | os.PathLike) -> str | None:
    """Why the safetensors file ``path`` is structurally damaged (truncated, bad header), or
    ``None`` when its size matches its header. Reads the header only (no checksum)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or header_len > size - 8:
                return f"truncated: {size} bytes, shorter than its header"
            header = json.loads(fh.read(header_len))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        return f"unreadable header ({err})"
    if size != 8 + header_len + end:
        return f"{size} bytes where its header describes {8 + header_len + end}: truncated or padded"
    return None


def set_aside(path: str | os.PathLike) -> Path:
    """Rename a damaged file to ``NAME.corrupt-YYYYmmdd-HHMMSS`` (kept for inspection); returns
    the new path."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    return target


# --- one writer per run directory ------------------------------------------------------------------
class BusyError(RuntimeError):
    """Another process holds the lock of a run directory."""


_HELD: dict[str, list] = {}  # lock path -> [fd, count]: one OS lock per process, counted


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"PID {text}" if text.isdigit() else "PID unknown"


def acquire_lock(path: str | os.PathLike) -> None:
    """Take the exclusive OS lock (``flock``) on the file ``path`` without waiting, and write this
    process's PID into it. Raises :class:`BusyError` naming the holder's PID when another process
    holds it. The OS drops the lock when the process exits, however it exits (SIGKILL included).
    Within one process the lock is counted: every :func:`acquire_lock` needs a :func:`release_lock`.
    """
    path = Path(path)
    key = os.path.realpath(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    if fcntl is None:
        _HELD[key] = [None, 1]
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise BusyError(
            f"{path.parent} is in use by another cdeq process ({holder}, which holds {path}); wait "
            "for it to finish or stop it (the lock goes with the process), or use another --out "
            "directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]


def release_lock(path: str | os.PathLike) -> None:
    """Undo one :func:`acquire_lock`; the last one drops the OS lock (the file stays)."""
    key = os.path.realpath(path)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] == 0:
        del _HELD[key]
        if held[0] is not None:
            os.ftruncate(held[0], 0)
            os.close(held[0])  # closing the descriptor drops the flock


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike) -> Iterator[None]:
    """``with hold_lock(DIR / ".lock"):`` the body runs holding :func:`acquire_lock`."""
    acquire_lock(path)
    try:
        yield
    finally:
        release_lock(path)


# --- checkpoints (torch.save payloads with a version and a checksum) ------------------------------
CHECKPOINT_MAGIC = b"CDEQCKPT"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: Any) -> None:
    """``torch.save(payload)`` written atomically behind a header: magic, version, SHA-256.

    Layout: ``CDEQCKPT`` (8 bytes), version (4 bytes little-endian), hex SHA-256 of the body
    (64 bytes), body (the ``torch.save`` bytes).
    """
    import io as _io

    buf = _io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = CHECKPOINT_MAGIC + CHECKPOINT_VERSION.to_bytes(4, "little")
    atomic_write_bytes(path, header + hashlib.sha256(body).hexdigest().encode() + body)


def load_checkpoint(path: str | os.PathLike) -> Any:
    """Load a file written by :func:`save_checkpoint`; a truncated, corrupted or foreign file
    raises :class:`CorruptFileError` naming it (never silently wrong weights)."""
    import io as _io

    path = Path(path)
    data = path.read_bytes()
    if data[:8] != CHECKPOINT_MAGIC or len(data) < 76:
        raise CorruptFileError(f"{path} is not a cdeq checkpoint (bad header; truncated or written "
                               "by another program); delete it to restart the stage")
    version = int.from_bytes(data[8:12], "little")
    if version != CHECKPOINT_VERSION:
        raise CorruptFileError(f"{path} has checkpoint version {version}; this cdeq reads version "
                               f"{CHECKPOINT_VERSION}; delete it to restart the stage")
    body = data[76:]
    if hashlib.sha256(body).hexdigest().encode() != data[12:76]:
        raise CorruptFileError(f"{path} failed its checksum (truncated or corrupted); delete it to "
                               "restart the stage")
    try:
        return torch.load(_io.BytesIO(body), weights_only=True)
    except Exception as err:  # noqa: BLE001 - reported with the file name
        raise CorruptFileError(f"{path} is not a readable checkpoint ({err})") from err


# --- nested structures of tensors (inputs may be tuples, dicts, sparse tensors) -----------------
def flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> Any:
    """Flatten ``obj`` into ``out`` (``prefix.i`` keys); returns a JSON spec to rebuild it."""
    if obj is None:
        return None
    if isinstance(obj, Tensor):
        if obj.is_sparse:
            obj = obj.coalesce()
            out[f"{prefix}.indices"] = obj.indices()
            out[f"{prefix}.values"] = obj.values()
            return {"sparse": prefix, "size": list(obj.shape)}
        out[prefix] = obj
        return {"tensor": prefix}
    if isinstance(obj, (tuple, list)):
        return {"seq": [flatten(item, f"{prefix}.{i}", out) for i, item in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if isinstance(obj, Mapping):
        return {"map": {str(k): flatten(v, f"{prefix}.{k}", out) for k, v in obj.items()}}
    raise TypeError(f"cannot store an object of type {type(obj).__name__} in a tensor file")


def unflatten(spec: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of :func:`flatten`: rebuild the object ``spec`` describes from ``tensors``."""
    if spec is None:
        return None
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "sparse" in spec:
        key = spec["sparse"]
        return torch.sparse_coo_tensor(tensors[f"{key}.indices"], tensors[f"{key}.values"],
                                       spec["size"], check_invariants=False).coalesce()
    if "seq" in spec:
        items = [unflatten(s, tensors) for s in spec["seq"]]
        return tuple(items) if spec["tuple"] else items
    return {k: unflatten(v, tensors) for k, v in spec["map"].items()}
