"""Image classification with a convolutional DEQ (in the spirit of MDEQ's residual block).

Data: scikit-learn's digits (built in, the default), MNIST (``shared/data/mnist/mnist.npz``),
CIFAR-10 (the JPEG archive in ``shared/data/cifar10``), or a user's own images: an ``.npz`` with
``x_train, y_train, x_test, y_test`` or a folder of IDX files as the MNIST family ships them
(gzipped or not).

The layer, with ``u`` the injected input (a strided convolution of the image)::

    y = GN(relu(conv1(z)))
    y = GN(conv2(y) + u)
    f(z, u) = GN(relu(z + y))

with weight-normalised convolutions. The head pools ``z*`` and applies a linear layer.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config, ConfigError, check_choice, check_int
from ..deq.model import DEQModel
from ..deq.regularizers import apply_weight_norm
from .base import Task, register_task

# The project's data folder sits beside the checkout (``../shared/data``); CDEQ_DATA overrides it.
SHARED_DATA = Path(os.environ.get("CDEQ_DATA", Path(__file__).resolve().parents[4] / "shared" / "data"))


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent."""


# --- loading ----------------------------------------------------------------------------------
def _check_arrays(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
                  source: str) -> tuple[np.ndarray, ...]:
    for name, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim not in (3, 4):
            raise DataError(f"{source}: x_{name} must be (N, H, W) or (N, H, W, C) or (N, C, H, W), "
                            f"got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{source}: y_{name} must be a vector with one label per image "
                            f"({len(x)}), got shape {y.shape}")
        if len(x) == 0:
            raise DataError(f"{source}: the {name} split is empty")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
        if y.min() < 0:
            raise DataError(f"{source}: labels must be >= 0, found {int(y.min())} in y_{name}")
        if not np.isfinite(np.asarray(x, dtype=np.float64)).all():
            raise DataError(f"{source}: x_{name} contains NaN or inf")
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"{source}: train images {x_tr.shape[1:]} and test images {x_te.shape[1:]} "
                        "differ in shape")
    return x_tr, y_tr, x_te, y_te


def to_nchw(x: np.ndarray) -> np.ndarray:
    """``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` -> ``(N, C, H, W)`` float32."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    return x.astype(np.float32)


def load_npz(path: str | Path) -> tuple[np.ndarray, ...]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; give an .npz with x_train, y_train, x_test, y_test")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in data]
            if missing:
                raise DataError(f"{path} lacks {missing}; an image .npz needs x_train, y_train, "
                                f"x_test, y_test (found {sorted(data.files)})")
            arrays = tuple(data[k] for k in ("x_train", "y_train", "x_test", "y_test"))
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path} is not a readable .npz file ({err})") from err
    return _check_arrays(*arrays, source=str(path))


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (as MNIST ships them), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise DataError(f"{path} could not be read ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DataError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(dtypes[data[2]])
    body = np.frombuffer(data, dtype=dtype, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims}, found {body.size} values")
    return body.reshape(dims)


def load_idx_folder(folder: str | Path) -> tuple[np.ndarray, ...]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of IDX files")
    names = {"x_train": "train-images", "y_train": "train-labels",
             "x_test": ("t10k-images", "test-images"), "y_test": ("t10k-labels", "test-labels")}
    found = {}
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for key, stems in names.items():
        stems = (stems,) if isinstance(stems, str) else stems
        match = [p for p in files if any(p.name.startswith(s) for s in stems)]
        if not match:
            raise DataError(f"{folder} has no {' or '.join(stems)}* file; an IDX folder needs "
                            "train-images, train-labels, t10k-images and t10k-labels (.idx*[.gz])")
        found[key] = read_idx(match[0])
    return _check_arrays(found["x_train"], found["y_train"].astype(np.int64), found["x_test"],
                         found["y_test"].astype(np.int64), source=str(folder))


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    n_train = 1400
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def load_cifar10_archive(path: str | Path, cache: str | Path | None = None) -> tuple[np.ndarray, ...]:
    """Decode the CIFAR-10 JPEG archive (``train/<class>/*.jpg``, ``test/<class>/*.jpg``) once and
    cache the arrays as an ``.npz`` next to the run (the data folder stays read-only)."""
    path = Path(path)
    cache = Path(cache or Path.home() / ".cache" / "cdeq" / "cifar10-shuffled.npz")
    if cache.exists():
        return load_npz(cache)
    if not path.exists():
        raise DataError(f"{path} does not exist; CIFAR-10 needs the JPEG archive")
    from io import BytesIO

    from PIL import Image

    splits: dict[str, tuple[list, list]] = {"train": ([], []), "test": ([], [])}
    classes: list[str] = []
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                         key=lambda m: m.name)
        for m in members:
            parts = Path(m.name).parts
            split = next((s for s in ("train", "test") if s in parts), None)
            if split is None:
                continue
            cls = parts[parts.index(split) + 1]
            if cls not in classes:
                classes.append(cls)
            img = Image.open(BytesIO(tar.extractfile(m).read())).convert("RGB")
            splits[split][0].append(np.asarray(img, dtype=np.uint8))
            splits[split][1].append(cls)
    classes.sort()
    out = []
    rng = np.random.default_rng(0)  # the archive is sorted by class: fix one shuffled order
    for split in ("train", "test"):
        xs, names = splits[split]
        if not xs:
            raise DataError(f"{path} has no {split}/<class>/*.jpg images")
        order = rng.permutation(len(xs))
        out += [np.stack(xs)[order], np.array([classes.index(c) for c in names], dtype=np.int64)[order]]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, x_train=out[0], y_train=out[1], x_test=out[2], y_test=out[3])
    os.replace(tmp, cache)
    return _check_arrays(*out, source=str(path))


# --- model --------------------------------------------------------------------------------------
class ConvInjection(nn.Module):
    """Image ``(B, C_in, H, W)`` -> injection ``u`` ``(B, C, H/s, W/s)``.

    ``stride`` 1 is one 3x3 convolution; 2 or 4 use one or two stride-2 stages before it.
    """

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for _ in range({1: 0, 2: 1, 4: 2}[stride]):
            layers += [nn.Conv2d(c, channels, 3, stride=2, padding=1),
                       nn.GroupNorm(min(8, channels), channels), nn.ReLU()]
            c = channels
        layers += [nn.Conv2d(c, channels, 3, padding=1), nn.GroupNorm(min(8, channels), channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDEQCell(nn.Module):
    """MDEQ-style residual block ``f(z, u)``; state ``(B, C, H, W)``."""

    channel_dim = 1

    def __init__(self, channels: int, groups: int = 8, hidden_mult: int = 2, residual: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.residual = residual
        hidden = channels * hidden_mult
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(min(groups, hidden), hidden, affine=True)
        self.gn2 = nn.GroupNorm(min(groups, channels), channels, affine=True)
        self.gn3 = nn.GroupNorm(min(groups, channels), channels, affine=True)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, 0, 0.01)
        apply_weight_norm(self, "weight")

    def state_shape(self, u: Tensor) -> tuple[int, ...]:
        return tuple(u.shape)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        y = self.gn1(F.relu(self.conv1(z)))
        y = self.gn2(self.conv2(y) + u)
        return self.gn3(F.relu(z + y if self.residual else y))


class PoolHead(nn.Module):
    """Average-pool ``z`` to a ``grid x grid`` map, flatten, and classify linearly."""

    def __init__(self, channels: int, classes: int, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.fc = nn.Linear(channels * grid * grid, classes)

    def forward(self, z: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(z, self.grid).flatten(1))


# --- the task -----------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageConfig(Config):
    """Attributes:
        dataset: ``digits``, ``mnist``, ``cifar10``, or ``npz``/``idx`` with ``data``.
        data: path of a user's ``.npz`` / IDX folder (or overrides a built-in file).
        channels, stride: width of the state and the injection's downsampling.
        train_subset, test_subset: use only the first this many images of a split (0: all).
        augment: random crops (and flips for CIFAR-10) in training.
    """

    dataset: str = "digits"
    data: str = ""
    channels: int = 32
    stride: int = 1
    hidden_mult: int = 2
    residual: bool = True
    train_subset: int = 0
    test_subset: int = 0
    augment: bool = False
    seed: int = 0

    def validate(self) -> None:
        check_choice("dataset", self.dataset, ["digits", "mnist", "cifar10", "npz", "idx"])
        if self.dataset in ("npz", "idx") and not self.data:
            raise ConfigError(f"dataset={self.dataset!r} needs data=PATH")
        check_int("channels", self.channels, minimum=4)
        check_choice("stride", self.stride, [1, 2, 4])
        check_int("hidden_mult", self.hidden_mult, minimum=1)
        check_int("train_subset", self.train_subset, minimum=0)
        check_int("test_subset", self.test_subset, minimum=0)


def load_arrays(cfg: ImageConfig) -> tuple[np.ndarray, ...]:
    if cfg.dataset == "digits":
        return load_digits_split(cfg.seed)
    if cfg.dataset == "mnist":
        return load_npz(cfg.data or SHARED_DATA / "mnist" / "mnist.npz")
    if cfg.dataset == "cifar10":
        return load_cifar10_archive(cfg.data or SHARED_DATA / "cifar10" / "cifar10_jpg.tar.xz")
    if cfg.dataset == "npz":
        return load_npz(cfg.data)
    return load_idx_folder(cfg.data)


class ImageTask(Task):
    """Image classification; metric: accuracy."""

    name = "images"
    metric = "accuracy"
    higher_is_better = True
    Config = ImageConfig
    dataset: ClassVar[str | None] = None  # a built-in dataset this task always uses

    def __init__(self, config: ImageConfig) -> None:
        if self.dataset is not None and config.dataset != self.dataset:
            config = config.replace(dataset=self.dataset)
        super().__init__(config)
        x_tr, y_tr, x_te, y_te = load_arrays(config)
        x_tr, x_te = to_nchw(x_tr), to_nchw(x_te)
        if config.train_subset:
            x_tr, y_tr = x_tr[: config.train_subset], y_tr[: config.train_subset]
        if config.test_subset:
            x_te, y_te = x_te[: config.test_subset], y_te[: config.test_subset]
        mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
        std = x_tr.std(axis=(0, 2, 3), keepdims=True) + 1e-6
        self.x_train = torch.from_numpy((x_tr - mean) / std)
        self.y_train = torch.from_numpy(np.asarray(y_tr, dtype=np.int64))
        self.x_test = torch.from_numpy((x_te - mean) / std)
        self.y_test = torch.from_numpy(np.asarray(y_te, dtype=np.int64))
        unseen = sorted(set(self.y_test.tolist()) - set(self.y_train.tolist()))
        if unseen:
            raise DataError(f"test labels {unseen} never occur in the training split; labels must "
                            "be class indices 0..C-1 shared by both splits")
        self.num_classes = int(self.y_train.max()) + 1
        self.in_channels = self.x_train.shape[1]

    @classmethod
    def run_defaults(cls, quick: bool = False) -> dict[str, Any]:
        if quick:
            return {
                "task_config": {"channels": 8, "hidden_mult": 1, "train_subset": 256,
                                "test_subset": 128},
                "teacher": {"epochs": 1, "batch_size": 64,
                            "train_solver": {"name": "anderson", "max_iter": 8, "tol": 1e-3}},
                "record": {"batch_size": 128, "solver": {"name": "anderson", "max_iter": 12}},
                "distill": {"epochs": 2, "batch_size": 64},
                "baselines": {"init_select_batches": 1},
                "plans": {"max_nfe": 4, "batches": 1},
                "evaluate": {"budgets": [1, 2, 4], "latency_repeats": 1, "batch_size": 128,
                             "latency_batch": 64, "reference": {"max_iter": 30}},
            }
        return cls.full_defaults()

    @classmethod
    def full_defaults(cls) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["task"] = self.config.dataset if self.config.dataset in ("digits", "mnist", "cifar10") \
            else f"images:{self.config.data}"
        out["train_size"], out["test_size"] = len(self.y_train), len(self.y_test)
        return out

    def build_model(self) -> DEQModel:
        c = self.config
        torch.manual_seed(c.seed)
        return DEQModel(ConvInjection(self.in_channels, c.channels, c.stride),
                        ConvDEQCell(c.channels, hidden_mult=c.hidden_mult, residual=c.residual),
                        PoolHead(c.channels, self.num_classes))

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
        n = len(self.y_train)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            x = self.x_train[idx]
            if shuffle and self.config.augment:
                x = self._augment(x, generator or torch.Generator())
            yield x, self.y_train[idx]

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        for s in range(0, len(self.y_test), batch_size):
            yield self.x_test[s : s + batch_size], self.y_test[s : s + batch_size]

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y)

    def metric_sum(self, logits: Tensor, y: Tensor) -> tuple[float, int]:
        return float((logits.argmax(-1) == y).sum()), int(y.numel())


register_task(ImageTask)


@register_task
class DigitsTask(ImageTask):
    """scikit-learn's 8x8 digits (1,400 train / 397 held out): the default demo."""

    name = "digits"
    dataset = "digits"


@register_task
class MnistTask(ImageTask):
    """MNIST from shared/data/mnist/mnist.npz (or --data)."""

    name = "mnist"
    dataset = "mnist"

    @classmethod
    def full_defaults(cls) -> dict[str, Any]:  # sized for 2 CPU cores (docs/results.md)
        return {
            "task_config": {"stride": 4, "channels": 32, "train_subset": 20000},
            "teacher": {"epochs": 3, "batch_size": 32},
            "record": {"max_samples": 10000},
            "distill": {"epochs": 10},
        }


@register_task
class Cifar10Task(ImageTask):
    """CIFAR-10 from the JPEG archive in shared/data/cifar10 (or --data)."""

    name = "cifar10"
    dataset = "cifar10"

    @classmethod
    def full_defaults(cls) -> dict[str, Any]:
        return {
            # about an hour on 2 CPU cores (docs/results.md); baselines would add 4x the distillation
            "task_config": {"stride": 2, "channels": 32, "augment": True},
            "teacher": {"epochs": 5, "batch_size": 128, "train_solver": {"max_iter": 10, "tol": 1e-4}},
            "record": {"max_samples": 10000, "dtype": "float16"},
            "distill": {"epochs": 8},
            "baselines": {"enabled": False},
        }
