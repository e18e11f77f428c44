"""Batches from a user's own loader: ``(x, y)`` pairs, or dicts read through an explicit key map.

cdeq's loops take any iterable of ``(x, y)`` batches (``x`` whatever the model's injection takes:
a tensor, or a tuple such as a graph's ``(features, adjacency)``). A loader that yields dicts (the
Hugging Face convention) is wrapped once with :func:`pairs`, naming the keys::

    >>> import torch
    >>> loader = [{"pixel_values": torch.zeros(2, 3), "labels": torch.tensor([0, 1])}]
    >>> x, y = next(iter(pairs(loader, inputs="pixel_values", targets="labels")))
    >>> tuple(x.shape), y.tolist()
    ((2, 3), [0, 1])

A tuple of keys gives a tuple input (``inputs=("input_ids", "attention_mask")``). A dict batch
reaching a loop unwrapped is an error that names its keys (:func:`as_pair`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor

from .config import Config, ConfigError

Keys = str | Sequence[str]


@dataclasses.dataclass
class BatchKeys(Config):
    """Which entries of a dict batch are the inputs ``x`` and the targets ``y``.

    Attributes:
        inputs: a key, or a list of keys (then ``x`` is the tuple of those entries).
        targets: a key, a list of keys, or ``""`` (no targets: ``y`` is ``None``).
    """

    inputs: Any = "x"
    targets: Any = "y"

    def validate(self) -> None:
        for name in ("inputs", "targets"):
            value = getattr(self, name)
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, (list, tuple)) or not all(isinstance(k, str) for k in names):
                raise ConfigError(f"{name}={value!r} is not valid; give a key (a string) or a list "
                                  "of keys")
        if not self.inputs:
            raise ConfigError("inputs='' is not valid; name the key (or keys) of the inputs")

    def take(self, batch: Mapping[str, Any]) -> tuple[Any, Any]:
        """``(x, y)`` of a dict batch; a missing key is an error naming the keys it has."""
        return self._pick(batch, self.inputs), (self._pick(batch, self.targets)
                                                if self.targets else None)

    @staticmethod
    def _pick(batch: Mapping[str, Any], keys: Keys) -> Any:
        names = [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in names if k not in batch]
        if missing:
            raise KeyError(f"the batch has no key {missing[0]!r}; its keys are {sorted(batch)}")
        values = [batch[k] for k in names]
        return values[0] if isinstance(keys, str) else tuple(values)


def pairs(batches: Iterable[Any], inputs: Keys = "x", targets: Keys = "y") -> Iterable[tuple[Any, Any]]:
    """``batches`` as ``(x, y)`` pairs: dict batches read through ``inputs``/``targets`` (keys),
    pairs passed through. The result can be iterated again whenever ``batches`` can (a
    ``DataLoader``: once per epoch)."""
    return _Pairs(batches, BatchKeys(inputs=inputs, targets=targets))


class _Pairs:
    def __init__(self, batches: Iterable[Any], keys: BatchKeys) -> None:
        self.batches, self.keys = batches, keys

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for batch in self.batches:
            yield self.keys.take(batch) if isinstance(batch, Mapping) else as_pair(batch)

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def as_pair(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` of a pair batch; a dict batch is an error that says how to map its keys."""
    if isinstance(batch, Mapping):
        raise TypeError(f"a dict batch (keys {sorted(batch)}) needs a key map: wrap the loader in "
                        "cdeq.pairs(loader, inputs=KEY, targets=KEY)")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"a batch must be an (x, y) pair, got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


class TensorItems:
    """An indexable data set of ``(x[i], y[i])`` over two tensors, with a batched :meth:`take`:
    what a task's training split offers so that trajectories keep indices, not copies."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y {y.shape[0]}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def take(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        return self.x[ids], self.y[ids]
