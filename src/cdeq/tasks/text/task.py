"""Language-modelling tasks: ``text`` (a user's text) and ``shakespeare`` (Tiny Shakespeare).

Splits (see :mod:`.data` and ``docs/concepts/text.md``): a single file is cut into train / valid / test
(``1 - valid_fraction - test_fraction`` / ``valid_fraction`` / ``test_fraction``, by default
90% / 5% / 5%); a WikiText-layout folder's three files are the three splits. Training windows
come from the training split, selection and validation windows from the validation split, test
windows from the test split only.

Examples:
    >>> task = TextTask(TextConfig(data=path, level="char"))        # doctest: +SKIP
    >>> model = task.build_model()                                   # doctest: +SKIP
    >>> x, y = next(iter(task.train_batches(8)))                     # doctest: +SKIP
    >>> logits, info = model(x)                  # (8, seq_len, vocab) # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...deq.model import DEQModel
from ...engine.config import Config, ConfigError, check_choice, check_int, check_range
from ...engine.fit import model_device
from ..base import Batch, Task, register_task
from . import presets
from .data import SPLITS, find_shakespeare, load_corpus, window_starts, windows
from .generate import generate
from .model import CausalTransformerCell, LMHead, TextInjection

__all__ = ["ShakespeareConfig", "ShakespeareTask", "TextConfig", "TextTask"]


@dataclasses.dataclass
class TextConfig(Config):
    """Settings of the text tasks.

    Attributes:
        data: a text file or a WikiText-layout folder (``""``: the built-in Tiny Shakespeare).
        level: ``"char"`` or ``"word"``.
        d_model, n_heads, mlp_ratio: size of the transformer block.
        seq_len: context length (windows of ``seq_len`` inputs and targets).
        dropout: variational dropout on the injection (one mask per forward).
        valid_fraction, test_fraction: for a single file, the shares held out for validation
            (before the end) and test (at the end).
        eval_windows: fixed windows of the validation batches and of the test batches, spread
            evenly over each split; 0: every non-overlapping window (the full split).
        record_windows: fixed training windows whose teacher trajectories are recorded.
        epoch_windows: random training windows per epoch (an epoch is the unit of the teacher's
            checkpoints); 0: ``len(train) // seq_len``, one pass worth of windows.
        max_train_tokens, max_eval_tokens: keep only the first this many symbols (0: all).
        max_vocab: word level: keep the most frequent words only (0: all).
        cache: where text is prepared into token files once (""): ``$CDEQ_CACHE/tokens`` or
            ``~/.cache/cdeq/tokens``; see :mod:`.tokens`).
        size: ``""`` or ``"paper"``: the DEQ-Transformer's sizes (``presets.PAPER_TASK``) in place
            of the fields left at their defaults; ``cdeq run`` also takes the paper's solver budgets
            (``presets.PAPER_RUN``) under the user's settings.
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
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    eval_windows: int = 256
    record_windows: int = 4096
    epoch_windows: int = 16000
    max_train_tokens: int = 0
    max_eval_tokens: int = 0
    max_vocab: int = 0
    cache: str = ""
    size: str = ""
    quick: bool = False

    def __post_init__(self) -> None:
        if self.size == "paper":
            self.fill_defaults(presets.PAPER_TASK)
        if self.quick is True:
            self.fill_defaults(presets.QUICK_TASK)
        super().__post_init__()

    def validate(self) -> None:
        for key in ("data", "cache"):
            if not isinstance(getattr(self, key), str):
                raise ConfigError(f"{key}={getattr(self, key)!r} is not valid; it must be a path (a string)")
        check_choice("level", self.level, ["char", "word"])
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
        check_range("test_fraction", self.test_fraction, 0.001, 0.5)
        held_out = self.valid_fraction + self.test_fraction
        if held_out > 0.9:
            raise ConfigError(f"valid_fraction + test_fraction = {held_out:g} is not valid; it must "
                              "be at most 0.9 (the rest trains)")
        check_choice("size", self.size, ["", "paper"])
        if not isinstance(self.quick, bool):
            raise ConfigError(f"quick={self.quick!r} is not valid; it must be true or false")
        if self.max_vocab == 1:
            raise ConfigError("max_vocab=1 is not valid; it must be 0 (all words) or >= 2")


@register_task
class TextTask(Task):
    """Next-token prediction with a DEQ-Transformer; the metric is nats per token (character).

    ``loss`` is the mean cross-entropy over every position; ``metric_items`` is each predicted
    token's negative log-likelihood in nats. At word level the
    metric's name is ``nats_per_token`` (perplexity is its exponential).
    """

    name: ClassVar[str] = "text"
    metric: ClassVar[str] = "nats_per_char"
    higher_is_better: ClassVar[bool] = False
    Config: ClassVar[type[Config]] = TextConfig
    # the DEQ-Transformer's sizes and solver budgets (set before `presets` names the dict here)
    paper: ClassVar[dict[str, Any] | None] = {**presets.PAPER_RUN, "task_config": presets.PAPER_TASK}
    presets: ClassVar[dict[str, dict[str, Any]]] = presets.TEXT

    def __init__(self, config: TextConfig | None = None) -> None:
        config = self.Config() if config is None else config
        if not isinstance(config, TextConfig):
            raise TypeError(f"{type(self).__name__} takes a TextConfig, got {type(config).__name__}")
        super().__init__(config)
        self.corpus = load_corpus(self.data_path(), level=config.level,
                                  valid_fraction=config.valid_fraction, test_fraction=config.test_fraction,
                                  max_train_tokens=config.max_train_tokens,
                                  max_eval_tokens=config.max_eval_tokens, max_vocab=config.max_vocab,
                                  cache=config.cache)
        if self.corpus.level != "char":
            self.metric = "nats_per_token"  # the same quantity, per word
        for split in SPLITS:
            n = self.corpus.splits[split].numel()
            if n < config.seq_len + 1:
                raise ValueError(f"the {split} split has {n} tokens, fewer than seq_len + 1 = "
                                 f"{config.seq_len + 1}; lower seq_len or give more text")

    def data_path(self) -> str:
        if not self.config.data:
            raise ConfigError("the text task needs data: a UTF-8 text file, a WikiText-layout "
                              "folder (wiki.train.tokens ... or train.txt ...) or a folder of token "
                              "files (train.bin, val.bin, test.bin)")
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
            **self.preset_solvers(quick=c.quick),  # the preset's teacher solvers (presets.py)
        )

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
        device = model_device(model)

        def step(x: Tensor) -> Any:  # ids to the model's device, logits back to the sampler's CPU
            out = predict(x.to(device), nfe=nfe)[0] if predict is not None else model(x.to(device))
            return (out[0].cpu(), *out[1:]) if isinstance(out, tuple) else out.cpu()

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
            starts = window_starts(ids.numel(), t, count)
        return windows(ids, starts, t, batch_size)

    def _fixed(self, split: str, count: int, batch_size: int) -> Iterable[Batch]:
        ids = self._split(split)
        return windows(ids, window_starts(ids.numel(), self.config.seq_len, count), self.config.seq_len,
                       batch_size)

    def record_batches(self, batch_size: int) -> Iterable[Batch]:
        """``record_windows`` fixed windows spread evenly over the training split."""
        return self._fixed("train", self.config.record_windows, batch_size)

    def validation_batches(self, batch_size: int) -> Iterable[Batch]:
        """``eval_windows`` fixed non-overlapping windows of the validation split (all when 0)."""
        return self._fixed("valid", self.config.eval_windows, batch_size)

    def test_batches(self, batch_size: int) -> Iterable[Batch]:
        """``eval_windows`` fixed non-overlapping windows of the test split (all when 0)."""
        return self._fixed("test", self.config.eval_windows, batch_size)

    def split_sizes(self) -> dict[str, int]:
        """Tokens per split: characters at ``level="char"``, words (with ``<eos>``) at ``"word"``."""
        return {name: int(self._split(name).numel()) for name in SPLITS}

    # --- loss and metric ----------------------------------------------------------------------
    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def metric_items(self, logits: Tensor, y: Tensor) -> Tensor:
        """The negative log-likelihood of each predicted token in nats: ``(B * L,)``."""
        return F.cross_entropy(logits.detach().reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                               reduction="none")

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
    """Tiny Shakespeare characters: first 90% train, next 5% validation, last 5% test."""

    name: ClassVar[str] = "shakespeare"
    Config: ClassVar[type[Config]] = ShakespeareConfig

    def data_path(self) -> str:
        return self.config.data or str(find_shakespeare())
