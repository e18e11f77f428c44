"""Text data: a file or a WikiText-layout folder read into token ids, and fixed windows of them.

- One file: the first ``1 - valid_fraction - test_fraction`` is the training split, the next
  ``valid_fraction`` the validation split, the last ``test_fraction`` the test split (cut at line
  boundaries at word level).
- A folder: ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt``, the three files
  kept apart as the three splits.

The vocabulary comes from the training split only; id 0 is ``<unk>``, to which every validation
or test symbol unseen in training maps.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...engine.config import check_choice, check_range
from ..base import Batch
from ..datadir import data_file

__all__ = ["EOS", "SPLITS", "UNK", "Corpus", "find_shakespeare", "load_corpus", "window_starts", "windows"]

UNK = "<unk>"
EOS = "<eos>"
SPLITS = ("train", "valid", "test")
SPLIT_FILES = {
    "train": ("wiki.train.tokens", "train.txt"),
    "valid": ("wiki.valid.tokens", "valid.txt"),
    "test": ("wiki.test.tokens", "test.txt"),
}
SHAKESPEARE_RELATIVE = Path("tinyshakespeare") / "input.txt"


def find_shakespeare() -> Path:
    """Path of the built-in Tiny Shakespeare file, ``<data>/tinyshakespeare/input.txt`` (see
    :func:`cdeq.tasks.datadir.data_dir`)."""
    return data_file(SHAKESPEARE_RELATIVE, "Tiny Shakespeare")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
        ) from err


def _split_files(folder: Path) -> dict[str, Path]:
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
                                "(a folder holds train, valid and test files; a single text file is "
                                "split in three instead)")
    return found


def _words(lines: Iterable[str], limit: int) -> Iterator[str]:
    """Words of ``lines`` (white-space split, ``<eos>`` after every line), at most ``limit``."""
    count = 0
    for line in lines:
        for word in (*line.split(), EOS):
            if limit and count >= limit:
                return
            yield word
            count += 1


def _lines_of(source: Path | str) -> Iterator[str]:
    if isinstance(source, str):
        yield from source.splitlines()
        return
    try:
        with source.open(encoding="utf-8") as handle:
            yield from handle
    except UnicodeDecodeError as err:
        raise ValueError(f"{source} is not UTF-8 text; convert it to UTF-8") from err


@dataclasses.dataclass
class Corpus:
    """Token ids of each split and the vocabulary.

    Attributes:
        vocab: symbol of each id; ``vocab[0] == "<unk>"``.
        splits: ``{"train": ids, "valid": ids[, "test": ids]}``, 1-D int32 tensors.
        level: ``"char"`` or ``"word"``.
        source: where the text came from.
    """

    vocab: list[str]
    splits: dict[str, Tensor]
    level: str
    source: str

    def __post_init__(self) -> None:
        self.stoi = {s: i for i, s in enumerate(self.vocab)}

    @property
    def unk_id(self) -> int:
        return 0

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (characters, or white-space words with ``<eos>`` at line ends)."""
        if self.level == "char":
            return [self.stoi.get(c, 0) for c in text]
        lines = text.split("\n")
        words: list[str] = []
        for i, line in enumerate(lines):
            words.extend(line.split())
            if i < len(lines) - 1:
                words.append(EOS)
        return [self.stoi.get(w, 0) for w in words]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (``<eos>`` becomes a new line at word level)."""
        symbols = [self.vocab[int(i)] for i in ids]
        if self.level == "char":
            return "".join(symbols)
        out = []
        for s in symbols:
            if s == EOS:
                out.append("\n")
            else:
                out.append(s if not out or out[-1] == "\n" else " " + s)
        return "".join(out)


def _char_ids(text: str, codes: np.ndarray) -> Tensor:
    """Ids of the characters of ``text`` given the sorted code points ``codes`` (id = 1 + index)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    pos = np.searchsorted(codes, points)
    pos_clipped = np.minimum(pos, len(codes) - 1)
    known = codes[pos_clipped] == points
    ids = np.where(known, pos_clipped + 1, 0).astype(np.int32)
    return torch.from_numpy(ids)


def _char_corpus(texts: dict[str, str], source: str) -> Corpus:
    train = texts["train"]
    if not train:
        raise ValueError(f"the training split of {source!r} is empty")
    codes = np.unique(np.frombuffer(train.encode("utf-32-le"), dtype="<u4"))
    vocab = [UNK] + [chr(int(c)) for c in codes]
    splits = {name: _char_ids(text, codes) for name, text in texts.items()}
    return Corpus(vocab, splits, "char", source)


def _word_corpus(sources: dict[str, Path | str], limits: dict[str, int], max_vocab: int,
                 source: str) -> Corpus:
    counts = Counter(_words(_lines_of(sources["train"]), limits["train"]))
    counts.pop(UNK, None)  # WikiText writes <unk> in its text: it is our id 0
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if max_vocab:
        ranked = ranked[: max_vocab - 1]
    vocab = [UNK] + [w for w, _ in ranked]
    stoi = {w: i for i, w in enumerate(vocab)}
    splits = {}
    for name, src in sources.items():
        ids = np.fromiter((stoi.get(w, 0) for w in _words(_lines_of(src), limits[name])),
                          dtype=np.int32)
        splits[name] = torch.from_numpy(ids)
    return Corpus(vocab, splits, "word", source)


_CACHE: dict[tuple, Corpus] = {}


def _cut_file(text: str, level: str, valid_fraction: float, test_fraction: float) -> dict[str, str]:
    """One text split into train / valid / test by position (at line boundaries for words)."""
    cuts = []
    for share in (1 - valid_fraction - test_fraction, 1 - test_fraction):
        cut = int(len(text) * share)
        if level == "word":  # cut at a line boundary so no word is split in two
            nl = text.rfind("\n", 0, cut)
            cut = nl + 1 if nl > 0 else cut
        cuts.append(max(cut, cuts[-1] if cuts else 0))
    return {"train": text[: cuts[0]], "valid": text[cuts[0]: cuts[1]], "test": text[cuts[1]:]}


def _read_splits(path: Path, level: str, valid_fraction: float, test_fraction: float,
                 limits: dict[str, int], max_vocab: int) -> Corpus:
    if path.is_dir():
        files = _split_files(path)
        for name, file in files.items():
            if file.stat().st_size == 0:
                raise ValueError(f"the {name} split {file} is empty")
        if level == "word":
            return _word_corpus(dict(files), limits, max_vocab, str(path))
        texts = {name: _read_text(file) for name, file in files.items()}
    else:
        text = _read_text(path)
        if not text.strip():
            raise ValueError(f"text data {str(path)!r} is empty")
        texts = _cut_file(text, level, valid_fraction, test_fraction)
        if level == "word":
            return _word_corpus(texts, limits, max_vocab, str(path))
    texts = {name: t[: limits[name]] if limits[name] else t for name, t in texts.items()}
    return _char_corpus(texts, str(path))


def load_corpus(path: str | os.PathLike, level: str = "char", valid_fraction: float = 0.05,
                test_fraction: float = 0.05, max_train_tokens: int = 0, max_eval_tokens: int = 0,
                max_vocab: int = 0) -> Corpus:
    """Read a text file or a WikiText-layout folder into a :class:`Corpus` of three splits.

    Args:
        path: a UTF-8 text file (the first ``1 - valid_fraction - test_fraction`` for training,
            then ``valid_fraction`` for validation, the last ``test_fraction`` for test; cut at a
            line boundary for words) or a folder holding ``wiki.{train,valid,test}.tokens`` or
            ``{train,valid,test}.txt``.
        level: ``"char"`` or ``"word"``.
        max_train_tokens: keep only the first this many symbols of the training split (0: all).
            The vocabulary comes from what is kept.
        max_eval_tokens: the same for each held-out split.
        max_vocab: at word level, keep only the most frequent ``max_vocab - 1`` words (0: all).

    Raises:
        FileNotFoundError: no such file or folder, or a folder without its three split files.
        ValueError: an empty split, text that is not UTF-8, a bad ``level`` or fraction.
    """
    check_choice("level", level, ["char", "word"])
    check_range("valid_fraction", valid_fraction, 0.001, 0.5)
    check_range("test_fraction", test_fraction, 0.001, 0.5)
    path = Path(path).expanduser()
    key = (str(path.resolve()), level, valid_fraction, test_fraction, max_train_tokens, max_eval_tokens,
           max_vocab, _mtime(path))
    if key in _CACHE:
        return _CACHE[key]
    if not path.exists():
        raise FileNotFoundError(f"text data {str(path)!r} does not exist")
    limits = {"train": max_train_tokens, "valid": max_eval_tokens, "test": max_eval_tokens}
    corpus = _read_splits(path, level, valid_fraction, test_fraction, limits, max_vocab)
    eos = corpus.stoi.get(EOS, -1)
    for name, ids in corpus.splits.items():
        if ids.numel() == 0 or bool((ids == eos).all()):
            raise ValueError(f"the {name} split of {str(path)!r} is empty (it holds no {level}s)")
    _CACHE[key] = corpus
    return corpus


def _mtime(path: Path) -> float:
    """Modification time of a file, or the latest of a folder's files (the cache key)."""
    try:
        if path.is_dir():
            return max((p.stat().st_mtime for p in path.iterdir() if p.is_file()), default=-1.0)
        return path.stat().st_mtime
    except OSError:
        return -1.0


def window_starts(n_tokens: int, seq_len: int, count: int) -> Tensor:
    """Starts of ``count`` fixed, non-overlapping windows of ``seq_len + 1`` tokens spread evenly
    over ``n_tokens`` (all such windows when ``count`` is 0 or more than fit)."""
    available = (n_tokens - 1) // seq_len
    if count == 0 or count >= available:
        return torch.arange(available) * seq_len
    return (torch.arange(count) * available // count) * seq_len


def windows(ids: Tensor, starts: Tensor, seq_len: int, batch_size: int) -> Iterator[Batch]:
    """Batches ``(x, y)`` of the windows at ``starts``: ``x`` the tokens ``(B, seq_len)``, ``y`` the
    next tokens ``(B, seq_len)`` (``y[:, t] = x[:, t + 1]`` within the text); ``ids`` ``(n_tokens,)``."""
    offsets = torch.arange(seq_len + 1)
    for i in range(0, len(starts), batch_size):
        chunk = ids[starts[i: i + batch_size, None] + offsets].long()
        yield chunk[:, :-1], chunk[:, 1:]
