"""Language modelling: a DEQ-Transformer on characters (Tiny Shakespeare) or on a user's text.

The teacher is one weight-tied causal transformer block iterated to its fixed point::

    u  = tok_emb(x) + pos_emb(t)                           (injection, computed once, no NFE)
    f(z, u) = LN_out(h + MLP(LN_2(h)))                      (the cell, 1 NFE per call)
        with h = z + u + Attn(LN_1(z + u))                  (causal self-attention)
    logits = Linear(LN(z*))                                 (the head)

The final LayerNorm keeps every iterate at unit scale per token, so the iteration cannot blow
up and the solvers converge in tens of steps. Attention is causal (``scaled_dot_product_attention``
with ``is_causal=True``) and the only other operations act per position, so position ``t`` of
``z*`` depends on tokens ``<= t`` only.

Data (see ``docs/text.md``):

- task ``shakespeare``: the built-in Tiny Shakespeare characters, first 90% train, last 10%
  validation (the validation split is also the test split: the corpus has no third split).
- task ``text``: a user's ``data`` path, either one plain text file (split 90/10 the same way) or
  a folder in the WikiText layout (``wiki.{train,valid,test}.tokens`` or
  ``{train,valid,test}.txt``), at ``level="char"`` or ``level="word"`` (words are split on white
  space and every line ends with ``<eos>``, as in the usual WikiText-103 setup).

The vocabulary comes from the training split only; id 0 is ``<unk>``, to which every validation
or test symbol unseen in training maps.

Example:
    >>> task = TextTask(TextConfig(data=path, level="char"))        # doctest: +SKIP
    >>> model = task.build_model()                                   # doctest: +SKIP
    >>> x, y = next(iter(task.train_batches(8)))                     # doctest: +SKIP
    >>> logits, info = model(x)                  # (8, seq_len, vocab) # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError, check_choice, check_int, check_range
from ..deq.layer import SolverSpec
from ..deq.model import DEQModel
from .base import Batch, Task, register_task

UNK = "<unk>"
EOS = "<eos>"

# --- data --------------------------------------------------------------------------------------
SPLIT_FILES = {
    "train": ("wiki.train.tokens", "train.txt"),
    "valid": ("wiki.valid.tokens", "valid.txt"),
    "test": ("wiki.test.tokens", "test.txt"),
}
SHAKESPEARE_RELATIVE = Path("tinyshakespeare") / "input.txt"


def find_shakespeare() -> Path:
    """Path of the built-in Tiny Shakespeare file.

    Looked for in ``$CDEQ_DATA/tinyshakespeare/input.txt`` first, then in
    ``shared/data/tinyshakespeare/input.txt`` in a folder above this package (the project's
    shared data folder beside the checkout) or in the current directory.
    """
    tried = []
    env = os.environ.get("CDEQ_DATA")
    if env:
        tried.append(Path(env) / SHAKESPEARE_RELATIVE)
    for parent in Path(__file__).resolve().parents:
        tried.append(parent / "shared" / "data" / SHAKESPEARE_RELATIVE)
    tried.append(Path.cwd() / "shared" / "data" / SHAKESPEARE_RELATIVE)
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(
        "Tiny Shakespeare was not found; set CDEQ_DATA to the folder holding "
        f"{SHAKESPEARE_RELATIVE} or pass data=PATH (tried: {[str(p) for p in tried[:3]]}...)"
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); convert it to UTF-8"
        ) from err


def _split_files(folder: Path) -> dict[str, Path]:
    """The split files of a WikiText-layout folder; train and valid are required."""
    found: dict[str, Path] = {}
    for split, names in SPLIT_FILES.items():
        for name in names:
            if (folder / name).is_file():
                found[split] = folder / name
                break
    missing = [s for s in ("train", "valid") if s not in found]
    if missing:
        expected = ", ".join(f"{a} or {b}" for s, (a, b) in SPLIT_FILES.items() if s in missing)
        raise FileNotFoundError(f"{folder} has no {' / '.join(missing)} split: expected {expected}")
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


def load_corpus(path: str | os.PathLike, level: str = "char", valid_fraction: float = 0.1,
                max_train_tokens: int = 0, max_eval_tokens: int = 0, max_vocab: int = 0) -> Corpus:
    """Read a text file or a WikiText-layout folder into a :class:`Corpus`.

    Args:
        path: a UTF-8 text file (split into the first ``1 - valid_fraction`` for training, the
            rest for validation, cut at a line boundary for words) or a folder holding
            ``wiki.{train,valid,test}.tokens`` or ``{train,valid,test}.txt`` (test optional).
        level: ``"char"`` or ``"word"``.
        max_train_tokens, max_eval_tokens: keep only the first this many symbols of the training
            and of each held-out split (0: all). The vocabulary comes from what is kept.
        max_vocab: at word level, keep only the most frequent ``max_vocab - 1`` words (0: all).

    Raises:
        FileNotFoundError: no such file or folder, or a folder without train/valid files.
        ValueError: an empty split, text that is not UTF-8, a bad ``level``.
    """
    check_choice("level", level, ["char", "word"])
    path = Path(path).expanduser()
    key = (str(path.resolve()), level, valid_fraction, max_train_tokens, max_eval_tokens, max_vocab,
           _mtime(path))
    if key in _CACHE:
        return _CACHE[key]
    if not path.exists():
        raise FileNotFoundError(f"text data {str(path)!r} does not exist")
    limits = {"train": max_train_tokens, "valid": max_eval_tokens, "test": max_eval_tokens}
    if path.is_dir():
        files = _split_files(path)
        for name, file in files.items():
            if file.stat().st_size == 0:
                raise ValueError(f"the {name} split {file} is empty")
        if level == "char":
            texts = {name: _read_text(file) for name, file in files.items()}
            texts = {name: t[: limits[name]] if limits[name] else t for name, t in texts.items()}
            corpus = _char_corpus(texts, str(path))
        else:
            corpus = _word_corpus(dict(files), limits, max_vocab, str(path))
    else:
        text = _read_text(path)
        if not text.strip():
            raise ValueError(f"text data {str(path)!r} is empty")
        cut = int(len(text) * (1 - valid_fraction))
        if level == "word":  # cut at a line boundary so no word is split in two
            nl = text.rfind("\n", 0, cut)
            cut = nl + 1 if nl > 0 else cut
        texts = {"train": text[:cut], "valid": text[cut:]}
        if level == "char":
            texts = {name: t[: limits[name]] if limits[name] else t for name, t in texts.items()}
            corpus = _char_corpus(texts, str(path))
        else:
            corpus = _word_corpus(texts, limits, max_vocab, str(path))
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


def _window_starts(n_tokens: int, seq_len: int, count: int) -> Tensor:
    """Starts of ``count`` fixed, non-overlapping windows of ``seq_len + 1`` tokens spread evenly
    over ``n_tokens`` (all such windows when ``count`` is 0 or more than fit)."""
    available = (n_tokens - 1) // seq_len
    if count == 0 or count >= available:
        return torch.arange(available) * seq_len
    return (torch.arange(count) * available // count) * seq_len


def _windows(ids: Tensor, starts: Tensor, seq_len: int, batch_size: int) -> Iterator[Batch]:
    offsets = torch.arange(seq_len + 1)
    for i in range(0, len(starts), batch_size):
        chunk = ids[starts[i: i + batch_size, None] + offsets].long()
        yield chunk[:, :-1], chunk[:, 1:]


# --- model -------------------------------------------------------------------------------------
class TextInjection(nn.Module):
    """``x (B, T) -> u (B, T, D)``: token plus learned position embeddings.

    Variational dropout: in training one mask of shape ``(B, 1, D)`` is drawn per forward and
    applied to ``u``; ``u`` enters every solver iteration, so the same mask acts on all of them
    (and on every position), as DEQ-Transformers require.
    """

    def __init__(self, vocab_size: int, d_model: int, seq_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.seq_len = seq_len
        self.dropout = dropout
        nn.init.normal_(self.tok.weight, std=1.0)
        nn.init.normal_(self.pos.weight, std=0.2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"x must be integer token ids of shape (B, T), got {x.dtype} {tuple(x.shape)}")
        length = x.shape[1]
        if length > self.seq_len:
            raise ValueError(f"sequence length {length} exceeds the model's seq_len {self.seq_len}")
        u = self.tok(x) + self.pos(torch.arange(length, device=x.device))
        if self.training and self.dropout > 0:
            keep = 1 - self.dropout
            mask = torch.empty(u.shape[0], 1, u.shape[2], device=u.device).bernoulli_(keep) / keep
            u = u * mask
        return u


class CausalTransformerCell(nn.Module):
    """One weight-tied causal transformer block ``f(z, u)`` with ``z, u`` of shape ``(B, T, D)``.

    ``h = z + u; h = h + Attn(LN(h)); h = h + MLP(LN(h)); return LN(h)``. The last LayerNorm
    bounds every iterate, which keeps the fixed-point iteration stable.
    """

    channel_dim = -1

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self.channels = d_model
        self.n_heads = n_heads
        hidden = int(round(mlp_ratio * d_model))
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.ln_out = nn.LayerNorm(d_model)
        for lin in (self.qkv, self.proj, self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def state_shape(self, u: Tensor) -> torch.Size:
        return u.shape

    def attention(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        h = z + u
        h = h + self.attention(self.ln1(h))
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.ln_out(h)


class LMHead(nn.Module):
    """``z (B, T, D) -> logits (B, T, V)``: LayerNorm then Linear."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, z: Tensor) -> Tensor:
        return self.out(self.ln(z))


# --- configuration -----------------------------------------------------------------------------
QUICK_PRESET: dict[str, Any] = {
    "d_model": 32, "n_heads": 2, "mlp_ratio": 2.0, "seq_len": 32,
    "max_train_tokens": 4000, "max_eval_tokens": 800, "eval_windows": 8, "record_windows": 16,
    "epoch_windows": 64,
}


@dataclasses.dataclass
class TextConfig(Config):
    """Settings of the text tasks.

    Attributes:
        data: a text file or a WikiText-layout folder (``""``: the built-in Tiny Shakespeare).
        level: ``"char"`` or ``"word"``.
        d_model, n_heads, mlp_ratio: size of the transformer block.
        seq_len: context length (windows of ``seq_len`` inputs and targets).
        dropout: variational dropout on the injection (one mask per forward).
        valid_fraction: for a single file, the share of its end held out for validation.
        eval_split: ``"valid"`` or ``"test"`` (a folder with a test file only).
        eval_windows: fixed windows of the evaluation (and of the selection) batches, spread
            evenly over the split; 0: every non-overlapping window (the full split).
        record_windows: fixed training windows whose teacher trajectories are recorded.
        epoch_windows: random training windows per epoch (an epoch is the unit of the teacher's
            checkpoints); 0: ``len(train) // seq_len``, one pass worth of windows.
        max_train_tokens, max_eval_tokens: keep only the first this many symbols (0: all).
        max_vocab: word level: keep the most frequent words only (0: all).
        quick: a tiny preset (a few thousand characters, a 32-wide block) for smoke runs: the
            preset's values replace the fields left at their defaults.
    """

    data: str = ""
    level: str = "char"
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: float = 4.0
    seq_len: int = 64
    dropout: float = 0.0
    valid_fraction: float = 0.1
    eval_split: str = "valid"
    eval_windows: int = 256
    record_windows: int = 4096
    epoch_windows: int = 16000
    max_train_tokens: int = 0
    max_eval_tokens: int = 0
    max_vocab: int = 0
    quick: bool = False

    def __post_init__(self) -> None:
        if self.quick is True:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            for key, value in QUICK_PRESET.items():
                if getattr(self, key) == defaults[key]:
                    setattr(self, key, value)
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.data, str):
            raise ConfigError(f"data={self.data!r} is not valid; it must be a path (a string)")
        check_choice("level", self.level, ["char", "word"])
        check_choice("eval_split", self.eval_split, ["valid", "test"])
        for name in ("d_model", "n_heads", "seq_len"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("eval_windows", "record_windows", "epoch_windows", "max_train_tokens",
                     "max_eval_tokens", "max_vocab"):
            check_int(name, getattr(self, name), minimum=0)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not valid; it must be a multiple of "
                              f"n_heads={self.n_heads}")
        check_range("mlp_ratio", self.mlp_ratio, 0.25, 64)
        check_range("dropout", self.dropout, 0.0, 0.9)
        check_range("valid_fraction", self.valid_fraction, 0.001, 0.5)
        if not isinstance(self.quick, bool):
            raise ConfigError(f"quick={self.quick!r} is not valid; it must be true or false")
        if self.max_vocab == 1:
            raise ConfigError("max_vocab=1 is not valid; it must be 0 (all words) or >= 2")


# --- the tasks ---------------------------------------------------------------------------------
@register_task
class TextTask(Task):
    """Next-token prediction with a DEQ-Transformer; the metric is nats per token (character).

    ``loss`` is the mean cross-entropy over every position; ``metric_sum`` returns the summed
    negative log-likelihood in nats and the number of predicted tokens. At word level the
    metric's name is ``nats_per_token`` (perplexity is its exponential).
    """

    name: ClassVar[str] = "text"
    metric: ClassVar[str] = "nats_per_char"
    higher_is_better: ClassVar[bool] = False
    Config: ClassVar[type[Config]] = TextConfig

    def __init__(self, config: TextConfig | None = None) -> None:
        config = self.Config() if config is None else config
        if not isinstance(config, TextConfig):
            raise TypeError(f"{type(self).__name__} takes a TextConfig, got {type(config).__name__}")
        super().__init__(config)
        self.corpus = load_corpus(self.data_path(), level=config.level,
                                  valid_fraction=config.valid_fraction,
                                  max_train_tokens=config.max_train_tokens,
                                  max_eval_tokens=config.max_eval_tokens, max_vocab=config.max_vocab)
        if self.corpus.level == "word":
            self.metric = "nats_per_token"  # the same quantity, per word
        if config.eval_split not in self.corpus.splits:
            raise ConfigError(f"eval_split={config.eval_split!r} is not valid: {self.corpus.source} has "
                              f"no test split (only {sorted(self.corpus.splits)})")
        for split in ("train", config.eval_split):
            n = self.corpus.splits[split].numel()
            if n < config.seq_len + 1:
                raise ValueError(f"the {split} split has {n} tokens, fewer than seq_len + 1 = "
                                 f"{config.seq_len + 1}; lower seq_len or give more text")

    def data_path(self) -> str:
        if not self.config.data:
            raise ConfigError("the text task needs data: a UTF-8 text file or a WikiText-layout "
                              "folder (wiki.train.tokens ... or train.txt ...)")
        return self.config.data

    # --- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.corpus.vocab)

    def encode(self, text: str) -> list[int]:
        return self.corpus.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.corpus.decode(ids)

    # --- model --------------------------------------------------------------------------------
    def build_model(self) -> DEQModel:
        c = self.config
        return DEQModel(
            TextInjection(self.vocab_size, c.d_model, c.seq_len, c.dropout),
            CausalTransformerCell(c.d_model, c.n_heads, c.mlp_ratio),
            LMHead(c.d_model, self.vocab_size),
            solver=SolverSpec(name="anderson", max_iter=8, tol=1e-3),
            eval_solver=SolverSpec(name="anderson", max_iter=40, tol=1e-4),
            backward="jacobian_free",
        )

    @classmethod
    def run_defaults(cls, quick: bool = False) -> dict[str, Any]:
        """Run-configuration sections for text: the teacher settings that reach the documented
        accuracy (docs/text.md), and sizes of the later stages that fit text windows."""
        if quick:
            return copy.deepcopy(QUICK_RUN)
        return copy.deepcopy(DEFAULT_RUN)

    # --- sampling -----------------------------------------------------------------------------
    def generate_text(self, model: nn.Module, prompt: str, n_tokens: int, nfe: int = 1, seed: int = 0,
                      temperature: float = 0.8, top_k: int = 0) -> tuple[str, float]:
        """``(prompt + sampled text, tokens per second)`` from a teacher or a student.

        A model with ``predict(x, nfe)`` (the C-DEQ student) runs at that budget; a
        :class:`DEQModel` runs its eval solver to convergence (``nfe`` is ignored).
        """
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty; give at least one character (or word)")
        model.eval()
        predict = getattr(model, "predict", None)
        step = (lambda x: predict(x, nfe=nfe)[0]) if predict is not None else model
        out = generate(step, ids, n_tokens, self.config.seq_len, temperature=temperature, top_k=top_k,
                       generator=torch.Generator().manual_seed(seed))
        sep = " " if self.corpus.level == "word" and not prompt.endswith(("\n", " ")) else ""
        return prompt + sep + self.decode(out.ids[0].tolist()), out.tokens_per_second

    # --- data ---------------------------------------------------------------------------------
    def _split(self, name: str) -> Tensor:
        return self.corpus.splits[name]

    def train_batches(self, batch_size: int, shuffle: bool = True,
                      generator: torch.Generator | None = None) -> Iterable[Batch]:
        """``epoch_windows`` windows of the training split: random offsets drawn with
        ``generator`` when ``shuffle``, else fixed non-overlapping windows in order."""
        ids, t = self._split("train"), self.config.seq_len
        count = self.config.epoch_windows or (ids.numel() - 1) // t
        if shuffle:
            starts = torch.randint(0, ids.numel() - t, (count,), generator=generator)
        else:
            starts = _window_starts(ids.numel(), t, count)
        return _windows(ids, starts, t, batch_size)

    def record_batches(self, batch_size: int) -> Iterable[Batch]:
        """``record_windows`` fixed windows spread evenly over the training split."""
        ids = self._split("train")
        starts = _window_starts(ids.numel(), self.config.seq_len, self.config.record_windows)
        return _windows(ids, starts, self.config.seq_len, batch_size)

    def selection_batches(self, batch_size: int) -> Iterable[Batch]:
        """``eval_windows`` fixed windows of the training split."""
        ids = self._split("train")
        starts = _window_starts(ids.numel(), self.config.seq_len, self.config.eval_windows)
        return _windows(ids, starts, self.config.seq_len, batch_size)

    def test_batches(self, batch_size: int) -> Iterable[Batch]:
        """``eval_windows`` fixed non-overlapping windows of the evaluation split (all when 0)."""
        ids = self._split(self.config.eval_split)
        starts = _window_starts(ids.numel(), self.config.seq_len, self.config.eval_windows)
        return _windows(ids, starts, self.config.seq_len, batch_size)

    # --- loss and metric ----------------------------------------------------------------------
    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def metric_sum(self, logits: Tensor, y: Tensor) -> tuple[float, int]:
        nll = F.cross_entropy(logits.detach().reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                              reduction="sum")
        return float(nll), int(y.numel())

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(vocab_size=self.vocab_size, level=self.corpus.level, data=self.corpus.source,
                   tokens={k: int(v.numel()) for k, v in self.corpus.splits.items()})
        return out


@dataclasses.dataclass
class ShakespeareConfig(TextConfig):
    """:class:`TextConfig` whose ``data`` defaults to the built-in Tiny Shakespeare."""

    def validate(self) -> None:
        super().validate()
        if self.level != "char":
            raise ConfigError(f"level={self.level!r} is not valid for shakespeare; it is a "
                              "character task (use the text task for words)")


@register_task
class ShakespeareTask(TextTask):
    """Tiny Shakespeare characters: first 90% train, last 10% validation (also the test split)."""

    name: ClassVar[str] = "shakespeare"
    Config: ClassVar[type[Config]] = ShakespeareConfig

    def data_path(self) -> str:
        return self.config.data or str(find_shakespeare())


# The teacher settings that reach the documented accuracy (docs/text.md), and the later stages
# sized for text windows (B windows x seq_len positions x d_model per state).
DEFAULT_RUN: dict[str, Any] = {
    "teacher": {"epochs": 4, "batch_size": 32,
                "optim": {"lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 100},
                "backward": "jacobian_free",
                "train_solver": {"name": "anderson", "max_iter": 8, "tol": 1e-3},
                "eval_solver": {"name": "anderson", "max_iter": 40, "tol": 1e-4}},
    "record": {"batch_size": 64, "dtype": "float16",
               "solver": {"name": "anderson", "max_iter": 40, "tol": 1e-4}},
    "distill": {"batch_size": 32, "max_residual": 1e-2},
    "evaluate": {"batch_size": 64, "latency_batch": 32,
                 "reference": {"name": "anderson", "max_iter": 60, "tol": 1e-5}},
}
QUICK_RUN: dict[str, Any] = {
    "threads": 1,  # a tiny model gains nothing from more threads, and they slow it on busy cores
    "task_config": {"quick": True},
    "teacher": {"epochs": 4, "batch_size": 8, "optim": {"lr": 1e-2}, "backward": "jacobian_free",
                "train_solver": {"name": "anderson", "max_iter": 8, "tol": 1e-3},
                "eval_solver": {"name": "anderson", "max_iter": 20, "tol": 1e-4}},
    "record": {"batch_size": 16, "solver": {"name": "anderson", "max_iter": 12, "tol": 1e-4}},
    "distill": {"epochs": 2, "batch_size": 8},
    "plans": {"max_nfe": 4, "batches": 1},
    "evaluate": {"budgets": [1, 2, 4], "latency_repeats": 1, "batch_size": 8, "latency_batch": 8,
                 "reference": {"max_iter": 30}},
}


# --- sampling ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Generation:
    """What :func:`generate` returns.

    Attributes:
        ids: ``(B, n_tokens)`` the sampled tokens (the prompt not included).
        seconds: wall time of the sampling loop.
        tokens_per_second: ``B * n_tokens / seconds``.
        nfe_per_token: mean layer calls per sampled token when ``step_fn`` returns solver info
            (``(logits, info)`` with ``info.nfe``), else ``None``.
    """

    ids: Tensor
    seconds: float
    tokens_per_second: float
    nfe_per_token: float | None = None


@torch.no_grad()
def generate(step_fn: Callable[[Tensor], Any], prompt_ids: Tensor | list[int], n_tokens: int,
             seq_len: int, temperature: float = 1.0, top_k: int = 0,
             generator: torch.Generator | None = None) -> Generation:
    """Sample ``n_tokens`` tokens after ``prompt_ids`` from any model mapping ids to logits.

    Args:
        step_fn: ``ids (B, t) -> logits (B, t, V)`` (or ``(logits, info)``, as a
            :class:`DEQModel` returns; ``info.nfe`` is then averaged into ``nfe_per_token``).
        prompt_ids: ``(t,)`` or ``(B, t)`` token ids, ``t >= 1``.
        n_tokens: how many tokens to sample.
        seq_len: the model's context: each step runs the model on the last ``seq_len`` tokens
            only. A DEQ has no key/value cache (its fixed point at every position changes with
            the whole window), so each new token costs a full solve over the window.
        temperature: softmax temperature; 0 picks the most likely token (greedy).
        top_k: sample among the ``top_k`` most likely tokens only (0: all).
        generator: seeds the sampling.
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must hold at least one token id, shape (t,) or (B, t); "
                         f"got shape {tuple(ids.shape)}")
    check_int("n_tokens", n_tokens, minimum=0)
    check_int("seq_len", seq_len, minimum=1)
    check_int("top_k", top_k, minimum=0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is not valid; it must be a number >= 0")
    start = ids.shape[1]
    nfe_total, nfe_seen = 0.0, False
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        out = step_fn(ids[:, -seq_len:])
        if isinstance(out, tuple):
            out, info = out[0], (out[1] if len(out) > 1 else None)
            if info is not None and hasattr(info, "nfe"):
                nfe_total += float(torch.as_tensor(info.nfe).float().mean())
                nfe_seen = True
        logits = out[:, -1].float()
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, -math.inf)
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, nxt.to(ids.dtype)], dim=1)
    seconds = time.perf_counter() - t0
    new = ids[:, start:]
    return Generation(
        ids=new,
        seconds=seconds,
        tokens_per_second=new.numel() / seconds if seconds > 0 else math.inf,
        nfe_per_token=nfe_total / n_tokens if nfe_seen and n_tokens else None,
    )
