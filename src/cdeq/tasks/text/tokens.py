"""Token files: a corpus as flat arrays of token ids on disk, read through memory maps.

A text corpus (one file, or a WikiText-layout folder) is prepared once into
``<cache>/<name>-<level>-<key>/{train,valid,test}.bin`` (uint8, uint16 or int32 ids, as nanoGPT's
``train.bin``), ``vocab.json`` and ``meta.json``, streaming the text in a few passes so that its
size never has to fit in memory. Later runs with the same file (size and modification time), level
and cuts open the cached arrays directly. The ids equal those of reading the whole text: the
vocabulary of the (kept) training split, ``<unk>`` = 0, characters in code-point order, words by
falling count.

A folder that already holds token ids is read as it is: ``train.bin``, ``val.bin`` (or
``valid.bin``) and ``test.bin``, with an optional ``meta.json`` (``{"dtype": "uint16",
"vocab_size": 50304}``; without it the ids are uint16 and the vocabulary is the largest training
id + 1). Its symbols are the ids themselves.

The cache folder is ``$CDEQ_CACHE`` or ``~/.cache/cdeq`` (``tokens/`` below it) unless given.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["EOS", "SPLIT_FILES", "TOKEN_FILES", "UNK", "cache_root", "id_dtype", "is_token_folder",
           "open_token_folder", "prepare_corpus", "split_files"]

UNK = "<unk>"
EOS = "<eos>"
SPLITS = ("train", "valid", "test")
SPLIT_FILES = {
    "train": ("wiki.train.tokens", "train.txt"),
    "valid": ("wiki.valid.tokens", "valid.txt"),
    "test": ("wiki.test.tokens", "test.txt"),
}
TOKEN_FILES = {"train": ("train.bin",), "valid": ("val.bin", "valid.bin"), "test": ("test.bin",)}
FORMAT = 1  # bumped when the prepared files change meaning
CHUNK = 1 << 20  # characters per conversion chunk


def cache_root(given: str = "") -> Path:
    """Where prepared corpora go: ``given``, else ``$CDEQ_CACHE/tokens`` or ``~/.cache/cdeq/tokens``."""
    if given:
        return Path(given).expanduser()
    base = os.environ.get("CDEQ_CACHE") or Path.home() / ".cache" / "cdeq"
    return Path(base) / "tokens"


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest id type for ``vocab_size`` symbols: uint8, uint16 or int32."""
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def is_token_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding ``train.bin``."""
    return (Path(path) / "train.bin").is_file()


def _memmap(path: Path, dtype: np.dtype) -> Tensor:
    """The ids of ``path`` as a tensor over a copy-on-write memory map (nothing is read yet)."""
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ValueError(f"{path} has {size} bytes, not a whole number of {dtype} ids; a token file is "
                         f"a flat array of {dtype} (give its dtype in meta.json)")
    if size == 0:
        return torch.zeros(0, dtype=torch.int32)
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c"))


def _max_id(path: Path, dtype: np.dtype) -> int:
    """The largest id of a token file, read in chunks with ordinary reads (not through the memory
    map, so the scan leaves none of the file's pages in the process's resident set)."""
    top, step = -1, 1 << 24
    with open(path, "rb") as fh:
        while chunk := fh.read(step * dtype.itemsize):
            top = max(top, int(np.frombuffer(chunk, dtype=dtype).max()))
    return top


def open_token_folder(folder: str | Path) -> tuple[dict[str, Tensor], dict]:
    """``({split: ids (n,) over a memory map}, meta)`` of a folder of ``.bin`` token files.

    Raises:
        FileNotFoundError: a split file is missing (the message names the files it looked for).
        ValueError: a file that is not a whole number of ids, a bad ``meta.json``, or an id of
            the validation or test split beyond the vocabulary.
    """
    folder = Path(folder)
    meta: dict = {}
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            dtype = np.dtype(meta.get("dtype", "uint16"))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{meta_path} is not valid: {err}; write {{\"dtype\": \"uint16\", "
                             "\"vocab_size\": N}") from err
        if not isinstance(meta, dict) or dtype.kind not in "iu":
            raise ValueError(f"{meta_path} must be a JSON object whose dtype is an integer type")
    else:
        dtype = np.dtype(np.uint16)
    splits: dict[str, Tensor] = {}
    paths: dict[str, Path] = {}
    for split, names in TOKEN_FILES.items():
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{folder} has no {' or '.join(names)}: a token folder holds "
                                    "train.bin, val.bin and test.bin")
        splits[split], paths[split] = _memmap(path, dtype), path
    tops = {split: _max_id(path, dtype) for split, path in paths.items()}
    vocab_size = int(meta.get("vocab_size") or tops["train"] + 1)
    for split, top in tops.items():
        if top >= vocab_size:
            where = "meta.json" if meta.get("vocab_size") else "the largest training id + 1"
            raise ValueError(f"{folder}: the {split} file holds id {top}, beyond the vocabulary of "
                             f"{vocab_size} ({where})")
    return splits, {"dtype": dtype.name, "vocab_size": vocab_size, "level": "ids",
                    "vocab": meta.get("vocab")}


# --- preparing a text corpus ---------------------------------------------------------------------
def split_files(folder: Path) -> dict[str, Path]:
    """The three split files of a WikiText-layout folder (all required)."""
    found: dict[str, Path] = {}
    for split, names in SPLIT_FILES.items():
        for name in names:
            if (folder / name).is_file():
                found[split] = folder / name
                break
    missing = [s for s in SPLITS if s not in found]
    if missing:
        expected = ", ".join(f"{a} or {b}" for s, (a, b) in SPLIT_FILES.items() if s in missing)
        raise FileNotFoundError(f"{folder} has no {' / '.join(missing)} split: expected {expected} "
                                "(a folder holds train, valid and test files, or train.bin, val.bin "
                                "and test.bin token ids; a single text file is split in three instead)")
    return found


def _lines(path: Path) -> Iterator[str]:
    try:
        with path.open(encoding="utf-8") as handle:
            yield from handle
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it "
                         "to UTF-8") from err


def _file_cuts(path: Path, level: str, valid_fraction: float, test_fraction: float) -> list[int]:
    """The character positions that end the training and the validation split of one file: the
    shares of its length, moved back to just after a line end at word level (none before:
    unchanged), never before the previous cut."""
    total = sum(len(line) for line in _lines(path))
    if not total or not any(line.strip() for line in _lines(path)):
        raise ValueError(f"text data {str(path)!r} is empty")
    raw = [int(total * share) for share in (1 - valid_fraction - test_fraction, 1 - test_fraction)]
    if level == "word":  # the last line end before each raw cut (str.rfind's "\n" at index > 0)
        last = [-1, -1]
        pos = 0
        for line in _lines(path):
            end = pos + len(line) - 1
            if line.endswith("\n"):
                for k, cut in enumerate(raw):
                    if end < cut:
                        last[k] = end
            pos += len(line)
            if pos > raw[1]:
                break
        raw = [nl + 1 if nl > 0 else cut for nl, cut in zip(last, raw, strict=True)]
    cuts: list[int] = []
    for cut in raw:
        cuts.append(max(cut, cuts[-1] if cuts else 0))
    return cuts


def _pieces(path: Path | dict[str, Path], cuts: list[int] | None) -> Iterator[tuple[str, str]]:
    """``(split, text)`` pieces in order: a folder's three files line by line, or one file's lines
    cut at ``cuts`` (a line across a cut is split there)."""
    if isinstance(path, dict):
        for split in SPLITS:
            for line in _lines(path[split]):
                yield split, line
        return
    assert cuts is not None
    bounds = [(0, cuts[0], "train"), (cuts[0], cuts[1], "valid"), (cuts[1], None, "test")]
    pos = 0
    for line in _lines(path):
        end = pos + len(line)
        for lo, hi, split in bounds:
            a, b = max(lo, pos), end if hi is None else min(hi, end)
            if a < b:
                yield split, line[a - pos : b - pos]
        pos = end


def _chunks(pieces: Iterator[tuple[str, str]], split: str, limit: int) -> Iterator[str]:
    """The text of ``split`` in chunks of about :data:`CHUNK` characters, at most ``limit`` (0: all)."""
    buf: list[str] = []
    size = kept = 0
    for name, text in pieces:
        if name != split:
            continue
        if limit and kept + len(text) > limit:
            text = text[: limit - kept]
        buf.append(text)
        size += len(text)
        kept += len(text)
        if size >= CHUNK:
            yield "".join(buf)
            buf, size = [], 0
        if limit and kept >= limit:
            break
    if buf:
        yield "".join(buf)


def _words(pieces: Iterator[tuple[str, str]], split: str, limit: int, by_file_line: bool) -> Iterator[str]:
    """Words of ``split`` with ``<eos>`` after every line, at most ``limit``. A folder's file lines
    are lines as read (``by_file_line``); one file's text is cut into lines by ``str.splitlines``."""
    count = 0
    for name, text in pieces:
        if name != split:
            continue
        for line in [text] if by_file_line else text.splitlines():
            for word in (*line.split(), EOS):
                if limit and count >= limit:
                    return
                yield word
                count += 1


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def _write_ids(path: Path, chunks: Iterator[np.ndarray], dtype: np.dtype) -> int:
    n = 0
    with open(path, "wb") as fh:
        for ids in chunks:
            fh.write(np.ascontiguousarray(ids, dtype=dtype).tobytes())
            n += len(ids)
    return n


def _batched(words: Iterator[str], stoi: dict[str, int], size: int = CHUNK) -> Iterator[np.ndarray]:
    buf: list[int] = []
    for w in words:
        buf.append(stoi.get(w, 0))
        if len(buf) >= size:
            yield np.array(buf, dtype=np.int64)
            buf = []
    if buf:
        yield np.array(buf, dtype=np.int64)


def _source_key(path: Path, files: list[Path], settings: dict) -> str:
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    text = json.dumps({"format": FORMAT, "files": stats, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_corpus(path: str | Path, level: str, valid_fraction: float, test_fraction: float,
                   limits: dict[str, int], max_vocab: int, cache: str = "") -> Path:
    """The folder of ``path``'s prepared token files, writing it first if it is not cached.

    Args mirror :func:`cdeq.tasks.text.data.load_corpus`; ``cache``: the cache folder
    (:func:`cache_root`). The folder is written under a temporary name and renamed when complete,
    so an interrupted preparation leaves nothing that a later run would read.
    """
    path = Path(path).expanduser()
    source: Path | dict[str, Path] = split_files(path) if path.is_dir() else path
    files = list(source.values()) if isinstance(source, dict) else [path]
    settings = {"level": level, "valid_fraction": valid_fraction, "test_fraction": test_fraction,
                "limits": limits, "max_vocab": max_vocab}
    out = cache_root(cache) / f"{path.name}-{level}-{_source_key(path, files, settings)}"
    if (out / "meta.json").is_file():
        return out
    if isinstance(source, dict):
        for split, file in source.items():
            if file.stat().st_size == 0:
                raise ValueError(f"the {split} split {file} is empty")
        cuts = None
    else:
        cuts = _file_cuts(path, level, valid_fraction, test_fraction)

    def pieces() -> Iterator[tuple[str, str]]:
        return _pieces(source, cuts)

    by_line = isinstance(source, dict)
    if level == "char":
        codes = np.zeros(0, dtype="<u4")
        for chunk in _chunks(pieces(), "train", limits["train"]):
            codes = np.union1d(codes, _code_points(chunk))
        if not len(codes):
            raise ValueError(f"the training split of {str(path)!r} is empty")
        vocab = [UNK] + [chr(int(c)) for c in codes]
    else:
        counts = Counter(_words(pieces(), "train", limits["train"], by_line))
        counts.pop(UNK, None)  # WikiText writes <unk> in its text: it is our id 0
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        if max_vocab:
            ranked = ranked[: max_vocab - 1]
        vocab = [UNK] + [w for w, _ in ranked]
        stoi = {w: i for i, w in enumerate(vocab)}
    dtype = id_dtype(len(vocab))
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        sizes = {}
        eos = vocab.index(EOS) if EOS in vocab else -1
        for split in SPLITS:
            limit = limits[split]
            if level == "char":
                ids = (_char_ids(chunk, codes) for chunk in _chunks(pieces(), split, limit))
            else:
                ids = _batched(_words(pieces(), split, limit, by_line), stoi)
            counted = _CountEos(ids, eos)
            sizes[split] = _write_ids(tmp / f"{split}.bin", counted, dtype)
            if sizes[split] == 0 or counted.all_eos:
                raise ValueError(f"the {split} split of {str(path)!r} is empty (it holds no {level}s)")
        (tmp / "vocab.json").write_text(json.dumps(vocab))
        meta = {"format": FORMAT, "source": str(path), "level": level, "dtype": dtype.name,
                "vocab_size": len(vocab), "tokens": sizes, **settings}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if out.exists():  # another process finished first: keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _CountEos:
    """Passes id chunks through, noting whether every id was ``<eos>`` (an empty split)."""

    def __init__(self, chunks: Iterator[np.ndarray], eos: int) -> None:
        self.chunks, self.eos, self.all_eos = chunks, eos, True

    def __iter__(self) -> Iterator[np.ndarray]:
        for ids in self.chunks:
            if self.all_eos and bool((ids != self.eos).any()):
                self.all_eos = False
            yield ids


def _char_ids(text: str, codes: np.ndarray) -> np.ndarray:
    """Ids of the characters of ``text`` given the sorted code points ``codes`` (id = 1 + index,
    0 for a character not among them)."""
    points = _code_points(text)
    pos = np.minimum(np.searchsorted(codes, points), len(codes) - 1)
    return np.where(codes[pos] == points, pos + 1, 0)


def open_prepared(folder: Path) -> tuple[dict[str, Tensor], dict, list[str]]:
    """``(splits over memory maps, meta, vocab)`` of a folder :func:`prepare_corpus` wrote."""
    meta = json.loads((folder / "meta.json").read_text())
    vocab = json.loads((folder / "vocab.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return {split: _memmap(folder / f"{split}.bin", dtype) for split in SPLITS}, meta, vocab
