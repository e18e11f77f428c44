"""Safe files: atomic writes, versioned and checksummed safetensors, nested tensor structures.

Every file cdeq writes goes to a temporary file in the same folder and is renamed into place, so
an interrupted run leaves either the old file or the new one, never half of one. Tensor files
carry a format version and a SHA-256 of their tensors in the safetensors metadata; loading checks
both and names the file when something is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

FORMAT_VERSION = 1


class CorruptFileError(ValueError):
    """A file cdeq wrote is truncated, corrupted, or of another format or kind."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
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
