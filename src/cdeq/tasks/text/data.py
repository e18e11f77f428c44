"""Text data: a file, a WikiText-layout folder or token files as token ids, and fixed windows of them.

- One file: the first ``1 - valid_fraction - test_fraction`` is the training split, the next
  ``valid_fraction`` the validation split, the last ``test_fraction`` the test split (cut at line
  boundaries at word level).
- A folder: ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt``, the three files
  kept apart as the three splits.

- Token files: ``train.bin``, ``val.bin``, ``test.bin`` (:mod:`.tokens`).

The vocabulary comes from the training split only; id 0 is ``<unk>``, to which every validation
or test symbol unseen in training maps. Text is prepared once into token files in a cache folder
and read through memory maps (:mod:`.tokens`): windows touch only their own pages.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from ...engine.config import check_choice, check_range
from ..base import Batch
from ..datadir import data_file
from .tokens import EOS, UNK, is_token_folder, open_prepared, open_token_folder, prepare_corpus

__all__ = ["EOS", "SPLITS", "UNK", "Corpus", "find_shakespeare", "load_corpus", "window_starts", "windows"]

SPLITS = ("train", "valid", "test")
SHAKESPEARE_RELATIVE = Path("tinyshakespeare") / "input.txt"


def find_shakespeare() -> Path:
    """Path of the built-in Tiny Shakespeare file, ``<data>/tinyshakespeare/input.txt`` (see
    :func:`cdeq.tasks.datadir.data_dir`)."""
    return data_file(SHAKESPEARE_RELATIVE, "Tiny Shakespeare")


@dataclasses.dataclass
class Corpus:
    """Token ids of each split and the vocabulary.

    Attributes:
        vocab: symbol of each id; ``vocab[0] == "<unk>"`` (token files: the ids' own names).
        splits: ``{"train": ids, "valid": ids, "test": ids}``, 1-D integer tensors over memory
            maps of the prepared token files (:mod:`.tokens`): windows read only their pages.
        level: ``"char"``, ``"word"`` or ``"ids"`` (a folder of token files).
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
        """Ids of ``text`` (characters, or white-space words with ``<eos>`` at line ends; for token
        files, white-space separated ids)."""
        if self.level == "ids":
            return [int(t) for t in text.split()]
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
        if self.level == "ids":
            return " ".join(symbols)
        if self.level == "char":
            return "".join(symbols)
        out = []
        for s in symbols:
            if s == EOS:
                out.append("\n")
            else:
                out.append(s if not out or out[-1] == "\n" else " " + s)
        return "".join(out)


_CACHE: dict[tuple, Corpus] = {}


def load_corpus(path: str | os.PathLike, level: str = "char", valid_fraction: float = 0.05,
                test_fraction: float = 0.05, max_train_tokens: int = 0, max_eval_tokens: int = 0,
                max_vocab: int = 0, cache: str = "") -> Corpus:
    """Read a text file, a WikiText-layout folder or a folder of token files into a
    :class:`Corpus` of three splits over memory maps.

    Text is prepared once into token files in the cache (:func:`.tokens.prepare_corpus`), then
    memory-mapped: the whole corpus is never held in memory.

    Args:
        path: a UTF-8 text file (the first ``1 - valid_fraction - test_fraction`` for training,
            then ``valid_fraction`` for validation, the last ``test_fraction`` for test; cut at a
            line boundary for words), a folder holding ``wiki.{train,valid,test}.tokens`` or
            ``{train,valid,test}.txt``, or a folder of token ids ``train.bin``, ``val.bin``,
            ``test.bin`` (:func:`.tokens.open_token_folder`; ``level`` does not apply).
        level: ``"char"`` or ``"word"``.
        max_train_tokens: keep only the first this many symbols of the training split (0: all).
            The vocabulary comes from what is kept.
        max_eval_tokens: the same for each held-out split.
        max_vocab: at word level, keep only the most frequent ``max_vocab - 1`` words (0: all).
        cache: the folder of prepared corpora (:func:`.tokens.cache_root`).

    Raises:
        FileNotFoundError: no such file or folder, or a folder without its three split files.
        ValueError: an empty split, text that is not UTF-8, a bad ``level`` or fraction, a token
            file that is not a whole number of ids.
    """
    check_choice("level", level, ["char", "word"])
    check_range("valid_fraction", valid_fraction, 0.001, 0.5)
    check_range("test_fraction", test_fraction, 0.001, 0.5)
    path = Path(path).expanduser()
    key = (str(path.resolve()), level, valid_fraction, test_fraction, max_train_tokens, max_eval_tokens,
           max_vocab, _mtime(path), cache)
    if key in _CACHE:
        return _CACHE[key]
    if not path.exists():
        raise FileNotFoundError(f"text data {str(path)!r} does not exist")
    if is_token_folder(path):
        splits, meta = open_token_folder(path)
        limits = {"train": max_train_tokens, "valid": max_eval_tokens, "test": max_eval_tokens}
        splits = {k: v[: limits[k]] if limits[k] else v for k, v in splits.items()}
        vocab = meta["vocab"] or [str(i) for i in range(meta["vocab_size"])]
        corpus = Corpus(vocab, splits, "ids", str(path))
        for name, ids in splits.items():
            if ids.numel() == 0:
                raise ValueError(f"the {name} token file of {str(path)!r} is empty")
    else:
        limits = {"train": max_train_tokens, "valid": max_eval_tokens, "test": max_eval_tokens}
        folder = prepare_corpus(path, level, valid_fraction, test_fraction, limits, max_vocab, cache)
        splits, _, vocab = open_prepared(folder)
        corpus = Corpus(vocab, splits, level, str(path))
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
