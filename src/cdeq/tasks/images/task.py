"""Image classification tasks: ``digits`` (the default demo), ``mnist``, ``cifar10`` and ``images``
(a user's ``.npz``, IDX folder or image folder).

Splits: the test split is the data's own; a seeded ``valid_fraction`` of the training split
(after ``train_subset``) is held out for validation, the rest trains. Images are standardised per
channel with the training split's mean and standard deviation.

An image folder (``dataset="folder"``, :mod:`.folder`) is streamed: its files are decoded per
batch in DataLoader workers, never held in memory together; its ``val/`` folder, when present, is
the validation split.

Examples:
    >>> task = DigitsTask(ImageConfig())                     # doctest: +SKIP
    >>> task.split_sizes()                                   # doctest: +SKIP
    {'train': 1260, 'valid': 140, 'test': 397}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...deq.model import DEQModel
from ...engine.batches import TensorItems
from ...engine.config import Config, ConfigError, check_choice, check_int, check_range
from ..base import Task, register_task
from ..datadir import data_dir
from . import presets
from .data import DataError, load_cifar10_archive, load_digits_split, load_idx_folder, load_npz, to_nchw
from .folder import FolderData, is_image_folder
from .model import ConvDEQCell, ConvInjection, MultiscaleCell, MultiscaleHead, MultiscaleInjection, PoolHead

__all__ = ["Cifar10Task", "DigitsTask", "ImageConfig", "ImageTask", "MnistTask", "image_model",
           "load_arrays"]


@dataclasses.dataclass
class ImageConfig(Config):
    """The image tasks' settings (``task_config``): the data, the model's size and the splits.

    Attributes:
        dataset: ``digits``, ``mnist``, ``cifar10``, or ``npz``/``idx``/``folder`` with ``data``.
        data: path of a user's ``.npz`` / IDX folder / image folder (or overrides a built-in file).
        channels, stride: width of the state and the injection's downsampling.
        scales: resolutions of the state: 1 (the default) is one map ``(B, C, H, W)``; ``N`` > 1 is
            MDEQ's multiscale state, a tuple of ``N`` maps halving in size, fused at every layer
            call, each with its own injection, read by a head over every scale.
        widths: with ``scales`` > 1, the channels of each resolution, finest first (e.g.
            ``[32, 64, 128, 256]``), in place of ``channels``; empty (the default): ``channels`` at
            every scale. Each is at least 4, and a multiple of 8 from 8 on (the group norms).
        hidden_mult: the residual block's inner width, as a multiple of its state's channels.
        size: ``""`` or ``"paper"``: MDEQ-small's shape (``presets.PAPER_TASK``: 4 scales 32/64/128/
            256 wide, blocks 5 times as wide inside, stride 4, 224x224 crops) in place of the fields
            left at their defaults; ``cdeq run`` takes these and MDEQ's solver budgets
            (``presets.PAPER_RUN``) over the task's preset and under the user's own settings.
        train_subset, test_subset: use only the first this many images of a split (0: all).
        valid_fraction: the share of the (subset) training split held out for validation,
            drawn with ``seed``.
        augment: random crops (and flips for CIFAR-10) in training.
        seed: seeds the digits split, the validation share and the model's initialisation.
        image_size, resize, workers, bad_images, check_images, mean, std: image folders only
            (:mod:`.folder`): the crop side (0: the first training image's shorter side), the
            shorter side before the centre crop (0: ``image_size``), DataLoader worker processes,
            ``"skip"`` or ``"error"`` for unreadable files, whether every header is read first,
            and fixed per-channel statistics (empty: from up to 512 training images).
    """

    dataset: str = "digits"
    data: str = ""
    channels: int = 32
    stride: int = 1
    scales: int = 1
    widths: tuple = ()
    hidden_mult: int = 2
    residual: bool = True
    train_subset: int = 0
    test_subset: int = 0
    valid_fraction: float = 0.1
    augment: bool = False
    seed: int = 0
    image_size: int = 0
    resize: int = 0
    workers: int = 2
    bad_images: str = "skip"
    check_images: bool = True
    mean: tuple = ()
    std: tuple = ()
    size: str = ""

    def __post_init__(self) -> None:
        if self.size == "paper":
            self.fill_defaults(presets.PAPER_TASK)
        super().__post_init__()

    def validate(self) -> None:
        check_choice("size", self.size, ["", "paper"])
        check_choice("dataset", self.dataset, ["digits", "mnist", "cifar10", "npz", "idx", "folder"])
        if self.dataset in ("npz", "idx", "folder") and not self.data:
            raise ConfigError(f"dataset={self.dataset!r} needs data=PATH")
        check_int("channels", self.channels, minimum=4)
        check_choice("stride", self.stride, [1, 2, 4])
        check_int("scales", self.scales, minimum=1)
        if self.scales > 4:
            raise ConfigError(f"scales={self.scales!r} is not valid; give 1 to 4 resolutions")
        self._check_widths()
        check_int("hidden_mult", self.hidden_mult, minimum=1)
        check_int("train_subset", self.train_subset, minimum=0)
        check_int("test_subset", self.test_subset, minimum=0)
        if self.train_subset == 1:
            raise ConfigError("train_subset=1 is not valid; it must be 0 (all) or >= 2 (a training "
                              "and a validation image at least)")
        check_range("valid_fraction", self.valid_fraction, 0.001, 0.5)
        check_int("seed", self.seed, minimum=0)
        check_int("image_size", self.image_size, minimum=0)
        check_int("resize", self.resize, minimum=0)
        check_int("workers", self.workers, minimum=0)
        check_choice("bad_images", self.bad_images, ["skip", "error"])
        if not isinstance(self.check_images, bool):
            raise ConfigError(f"check_images={self.check_images!r} is not valid; it must be true or false")
        for key in ("mean", "std"):
            value = getattr(self, key)
            if value and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
                raise ConfigError(f"{key}={value!r} is not valid; give three numbers (one per RGB "
                                  "channel) or [] to estimate them")
        if bool(self.mean) != bool(self.std) or (self.std and min(self.std) <= 0):
            raise ConfigError(f"mean={self.mean!r}, std={self.std!r} are not valid; give both (std > 0) "
                              "or neither")

    def _check_widths(self) -> None:
        if not isinstance(self.widths, (list, tuple)):
            raise ConfigError(f"widths={self.widths!r} is not valid; give a list of channels per scale "
                              "(e.g. [32, 64, 128, 256]) or [] for channels at every scale")
        self.widths = tuple(self.widths)
        if not self.widths:
            return
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 4 or (w >= 8 and w % 8)
               for w in self.widths):
            raise ConfigError(f"widths={list(self.widths)!r} is not valid; each width must be an "
                              "integer of at least 4, and a multiple of 8 from 8 on")
        if len(self.widths) != self.scales:
            raise ConfigError(f"widths={list(self.widths)!r} is not valid with scales={self.scales}; "
                              "give one width per scale (or [] for channels at every scale)")
        if self.scales == 1:
            raise ConfigError(f"widths={list(self.widths)!r} is not valid with scales=1; set channels "
                              "for the single map")

    def scale_widths(self) -> tuple[int, ...]:
        """The channels of each of the ``scales`` resolutions: ``widths``, or ``channels`` at each."""
        return self.widths or (self.channels,) * self.scales


def load_arrays(cfg: ImageConfig) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` of the configured data set."""
    if cfg.dataset == "digits":
        return load_digits_split(cfg.seed)
    if cfg.dataset == "mnist":
        return load_npz(cfg.data or data_dir() / "mnist" / "mnist.npz")
    if cfg.dataset == "cifar10":
        return load_cifar10_archive(cfg.data or data_dir() / "cifar10" / "cifar10_jpg.tar.xz")
    if cfg.dataset == "npz":
        return load_npz(cfg.data)
    return load_idx_folder(cfg.data)


def image_model(config: ImageConfig, in_channels: int, classes: int, **deq_options: Any) -> DEQModel:
    """The image tasks' DEQ for ``config`` on images of ``in_channels`` channels and ``classes``
    classes, seeded with ``config.seed``: :class:`ConvDEQCell` with one scale, :class:`MultiscaleCell`
    with ``config.scales`` > 1 (at ``config.scale_widths()``). ``deq_options`` go to
    :class:`DEQModel` (its solvers, backward).

    Examples:
        >>> model = image_model(ImageConfig(size="paper"), 3, 1000)      # doctest: +SKIP
        >>> [tuple(p.shape) for p in model.initial_state(model.inject(torch.zeros(1, 3, 224, 224)))]
        [(1, 32, 56, 56), (1, 64, 28, 28), (1, 128, 14, 14), (1, 256, 7, 7)]  # doctest: +SKIP
    """
    c = config
    torch.manual_seed(c.seed)
    if c.scales > 1:
        widths = c.scale_widths()
        return DEQModel(MultiscaleInjection(in_channels, widths, c.stride, c.scales),
                        MultiscaleCell(widths, c.scales, hidden_mult=c.hidden_mult),
                        MultiscaleHead(widths, c.scales, classes), **deq_options)
    return DEQModel(ConvInjection(in_channels, c.channels, c.stride),
                    ConvDEQCell(c.channels, hidden_mult=c.hidden_mult, residual=c.residual),
                    PoolHead(c.channels, classes), **deq_options)


def validation_share(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_ids, valid_ids)``: a seeded ``fraction`` of ``range(n)`` (at least one, at most
    ``n - 1``) for validation, the rest for training, each in increasing order."""
    n_valid = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


class ImageTask(Task):
    """Image classification; metric: accuracy."""

    name = "images"
    metric = "accuracy"
    higher_is_better = True
    Config = ImageConfig
    # MDEQ-small's shape and solver budgets (set before `presets` names the dict here)
    paper: ClassVar[dict[str, Any] | None] = {**presets.PAPER_RUN, "task_config": presets.PAPER_TASK}
    presets = presets.IMAGES
    dataset: ClassVar[str | None] = None  # a built-in dataset this task always uses

    def __init__(self, config: ImageConfig) -> None:
        if self.dataset is not None and config.dataset != self.dataset:
            config = config.replace(dataset=self.dataset)
        super().__init__(config)
        self.folder: FolderData | None = None
        if config.dataset == "folder":
            c = config
            self.folder = FolderData(c.data, c.image_size, c.resize, c.valid_fraction, c.seed,
                                     c.train_subset, c.test_subset, c.augment, c.workers, c.bad_images,
                                     c.check_images, c.mean, c.std)
            self.num_classes, self.in_channels = self.folder.num_classes, 3
            return
        x_tr, y_tr, x_te, y_te = load_arrays(config)
        x_tr, x_te = to_nchw(x_tr), to_nchw(x_te)
        if config.train_subset:
            x_tr, y_tr = x_tr[: config.train_subset], y_tr[: config.train_subset]
        if config.test_subset:
            x_te, y_te = x_te[: config.test_subset], y_te[: config.test_subset]
        if len(x_tr) < 2:
            raise DataError(f"the training split has {len(x_tr)} image(s); at least 2 are needed "
                            "(one is held out for validation)")
        train_ids, valid_ids = validation_share(len(x_tr), config.valid_fraction, config.seed)
        x_va, y_va = x_tr[valid_ids], y_tr[valid_ids]
        x_tr, y_tr = x_tr[train_ids], y_tr[train_ids]
        mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
        std = x_tr.std(axis=(0, 2, 3), keepdims=True) + 1e-6
        self.x_train, self.y_train = self._tensors(x_tr, y_tr, mean, std)
        self.x_valid, self.y_valid = self._tensors(x_va, y_va, mean, std)
        self.x_test, self.y_test = self._tensors(x_te, y_te, mean, std)
        seen = set(self.y_train.tolist())
        for split, y in (("validation", self.y_valid), ("test", self.y_test)):
            unseen = sorted(set(y.tolist()) - seen)
            if unseen:
                raise DataError(f"{split} labels {unseen} never occur in the training split; labels "
                                "must be class indices 0..C-1 shared by all splits")
        self.num_classes = int(self.y_train.max()) + 1
        self.in_channels = self.x_train.shape[1]

    @staticmethod
    def _tensors(x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray
                 ) -> tuple[Tensor, Tensor]:
        return torch.from_numpy((x - mean) / std), torch.from_numpy(np.asarray(y, dtype=np.int64))

    def split_sizes(self) -> dict[str, int]:
        """Images per split."""
        if self.folder is not None:
            return self.folder.sizes()
        return {"train": len(self.y_train), "valid": len(self.y_valid), "test": len(self.y_test)}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["task"] = self.config.dataset if self.config.dataset in ("digits", "mnist", "cifar10") \
            else f"images:{self.config.data}"
        sizes = self.split_sizes()
        out["train_size"], out["valid_size"], out["test_size"] = sizes["train"], sizes["valid"], sizes["test"]
        return out

    def build_model(self) -> DEQModel:
        """The configured model (:func:`image_model`); with ``size="paper"``, MDEQ's solvers."""
        solvers = self.preset_solvers() if self.config.size == "paper" else {}
        return image_model(self.config, self.in_channels, self.num_classes, **solvers)

    @classmethod
    def resolve_user_config(cls, user: dict[str, Any], data: str | None) -> dict[str, Any]:
        """``images`` with ``--data``: the reader chosen from the path (a folder with ``train/<class>/``
        is an image folder, another folder IDX, a file npz), unless ``task_config.dataset`` is given.
        With ``task_config.size="paper"``, MDEQ-small's shape and run settings (:attr:`paper`)."""
        out = super().resolve_user_config(user, data)
        if cls.dataset is None and data:
            kind = "folder" if is_image_folder(data) else "idx" if Path(data).is_dir() else "npz"
            out.setdefault("task_config", {}).setdefault("dataset", kind)
        return out

    def _augment(self, x: Tensor, gen: torch.Generator) -> Tensor:
        pad = 2 if x.shape[-1] <= 16 else 4
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        h, w = x.shape[-2:]
        i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,), generator=gen))
        out = padded[..., i : i + h, j : j + w]
        if self.config.dataset == "cifar10" and bool(torch.rand((), generator=gen) < 0.5):
            out = out.flip(-1)
        return out

    def train_batches(self, batch_size: int, shuffle: bool = True,
                      generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x (B, C, H, W), y (B,))`` of the training split (augmented when shuffled)."""
        if self.folder is not None:
            return self.folder.batches("train", batch_size, shuffle, generator)
        return self._array_train_batches(batch_size, shuffle, generator)

    def _array_train_batches(self, batch_size: int, shuffle: bool, generator: torch.Generator | None
                             ) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.y_train)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            x = self.x_train[idx]
            if shuffle and self.config.augment:
                x = self._augment(x, generator or torch.Generator())
            yield x, self.y_train[idx]

    @staticmethod
    def _in_order(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for s in range(0, len(y), batch_size):
            yield x[s : s + batch_size], y[s : s + batch_size]

    def train_items(self) -> TensorItems | None:
        """The training images and labels in memory, by index (``None`` for an image folder)."""
        return None if self.folder is not None else TensorItems(self.x_train, self.y_train)

    def validation_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The validation share (or an image folder's ``val/``), in a fixed order."""
        if self.folder is not None:
            return self.folder.batches("valid", batch_size)
        return self._in_order(self.x_valid, self.y_valid, batch_size)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The test split, in a fixed order."""
        if self.folder is not None:
            return self.folder.batches("test", batch_size)
        return self._in_order(self.x_test, self.y_test, batch_size)

    def data_report(self, teacher: DEQModel | None = None) -> dict[str, Any]:
        """An image folder's skipped files and image statistics (:meth:`FolderData.report`)."""
        return self.folder.report() if self.folder is not None else {}

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)

    def metric_items(self, logits: Tensor, y: Tensor) -> Tensor:
        """1.0 for each correctly classified image, else 0.0: ``(B,)``."""
        return (logits.argmax(-1) == y).float()


register_task(ImageTask)


@register_task
class DigitsTask(ImageTask):
    """8x8 handwritten digits (1,400 train, 140 of them validation, / 397 test): the default demo."""

    name = "digits"
    dataset = "digits"
    presets = presets.DIGITS


@register_task
class MnistTask(ImageTask):
    """MNIST from <data>/mnist/mnist.npz (or --data)."""

    name = "mnist"
    dataset = "mnist"
    presets = presets.MNIST


@register_task
class Cifar10Task(ImageTask):
    """CIFAR-10 from the JPEG archive in <data>/cifar10 (or --data)."""

    name = "cifar10"
    dataset = "cifar10"
    presets = presets.CIFAR10
