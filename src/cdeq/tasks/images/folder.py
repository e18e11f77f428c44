"""Image folders streamed from disk: ``DIR/train/<class>/*.jpg``, ``DIR/test/<class>/...`` and
optionally ``DIR/val/<class>/...`` (torchvision's ``ImageFolder`` layout, the layout ImageNet and
the CIFAR-10 JPEG archive come in).

Only the file list (relative paths as bytes, one integer label each) is held in memory; images
are decoded when a batch needs them, in :class:`torch.utils.data.DataLoader` workers, with Pillow.
torchvision's conventions are kept:

- classes are the sorted names of the sub-folders of ``train/``; their index is the label; the
  ``val/`` and ``test/`` folders may hold a subset of them (a class unknown to ``train/`` is an
  error naming the folder);
- images are converted to RGB; evaluation resizes the shorter side to ``resize`` and crops the
  centre ``image_size`` square; training with ``augment`` draws a random-resized crop (scale
  0.08-1, aspect 3/4-4/3, as ``RandomResizedCrop``) and a horizontal flip, or for images of at
  most 64 pixels a 4-pixel padded random crop and a flip (the CIFAR recipe);
- pixels are scaled to [0, 1] and standardised per channel (``Normalize``) with the mean and
  standard deviation of up to 512 training images (or the ``mean``/``std`` given).

Unreadable files: the headers of every file are read when the folder is opened (``check_images``),
so a file that is not an image is known before anything is trained. With ``bad_images="skip"`` it
is left out, counted and named in the log and in the report (``data.skipped_images``); an image
whose pixels fail to decode later (a truncated JPEG) is dropped from its batch and counted the same
way. With ``bad_images="error"`` either raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import DataError

__all__ = ["IMG_EXTENSIONS", "FolderSplit", "ImageFolderDataset", "ImageTransform", "find_classes",
           "is_image_folder", "scan_split"]

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIRS = {"train": ("train",), "valid": ("val", "valid"), "test": ("test",)}
SHOWN = 10  # files named in a log line before "and N more"


def is_image_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder whose ``train/`` holds class sub-folders."""
    train = Path(path) / "train"
    return train.is_dir() and any(p.is_dir() for p in train.iterdir())


def split_dir(root: Path, split: str) -> Path | None:
    """The folder of ``split`` (``train``, ``valid``: ``val/`` or ``valid/``, ``test``) or ``None``."""
    return next((root / name for name in SPLIT_DIRS[split] if (root / name).is_dir()), None)


def find_classes(folder: Path) -> list[str]:
    """The sorted names of the class sub-folders of ``folder`` (hidden ones left out)."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class sub-folders; an image folder holds "
                        "train/<class>/<image>, test/<class>/<image> (ImageFolder's layout)")
    return classes


class FolderSplit:
    """The files of one split: ``files`` ``(N,)`` bytes (paths relative to ``root``), ``labels``
    ``(N,)`` int64, and the ``skipped`` files (relative paths) whose header did not read."""

    def __init__(self, root: Path, files: np.ndarray, labels: np.ndarray, skipped: list[str]) -> None:
        self.root, self.files, self.labels, self.skipped = root, files, labels, skipped

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return self.root / self.files[i].decode()

    def take(self, ids: np.ndarray) -> FolderSplit:
        return FolderSplit(self.root, self.files[ids], self.labels[ids], self.skipped)


def _header_error(path: Path) -> str | None:
    """Why ``path``'s image header does not read (``None`` when it does)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.size[0] < 1 or img.size[1] < 1:
                return f"it has size {img.size}"
    except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        return f"{type(err).__name__}: {err}"
    return None


def scan_split(root: Path, folder: Path, classes: list[str], check: bool, bad_images: str) -> FolderSplit:
    """The image files under ``folder/<class>/`` (any depth, sorted) with the index of their class
    in ``classes``; with ``check`` each header is read (in threads) and a bad file skipped or
    refused as ``bad_images`` says."""
    names: list[str] = []
    labels: list[int] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in classes:
            raise DataError(f"{sub} is a class the training folder does not have; the classes are "
                            f"the sub-folders of {root / 'train'}: {classes[:SHOWN]}"
                            f"{' ...' if len(classes) > SHOWN else ''}")
        found = sorted(str(p.relative_to(root)) for p in sub.rglob("*")
                       if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
        names += found
        labels += [classes.index(sub.name)] * len(found)
    if not names:
        raise DataError(f"{folder} holds no image files ({', '.join(IMG_EXTENSIONS)}) in its class "
                        "sub-folders")
    skipped: list[str] = []
    if check:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            errors = list(pool.map(lambda name: _header_error(root / name), names, chunksize=256))
        bad = [i for i, why in enumerate(errors) if why is not None]
        if bad and bad_images == "error":
            first = bad[0]
            raise DataError(f"{root / names[first]} is not a readable image ({errors[first]}); "
                            f"{len(bad)} such file(s) in {folder}. Remove them or set "
                            "task_config.bad_images=skip")
        if bad:
            skipped = [names[i] for i in bad]
            keep = np.setdiff1d(np.arange(len(names)), bad)
            names = [names[i] for i in keep]
            labels = [labels[i] for i in keep]
            more = f" and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
            log.warning("skipped %d unreadable file(s) in %s: %s%s", len(bad), folder,
                        ", ".join(skipped[:SHOWN]), more)
        if not names:
            raise DataError(f"{folder} holds no readable image")
    return FolderSplit(root, np.array([n.encode() for n in names], dtype=bytes),
                       np.array(labels, dtype=np.int64), skipped)


class ImageTransform:
    """PIL image -> ``(3, size, size)`` float32 tensor, standardised (see the module docstring).

    Args:
        size: output side; resize: the shorter side before the centre crop (evaluation);
        augment: training crops and flips; mean, std: per-channel statistics (3 each).
    """

    def __init__(self, size: int, resize: int, augment: bool, mean: np.ndarray, std: np.ndarray) -> None:
        self.size, self.resize, self.augment = size, resize, augment
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __call__(self, img: Any, rng: np.random.Generator) -> Tensor:
        from PIL import Image

        img = img.convert("RGB")
        if not self.augment:
            img = _centre_crop(_resize_shorter(img, self.resize), self.size)
        elif self.size <= 64:  # the CIFAR recipe: pad 4, random crop, flip
            img = _centre_crop(_resize_shorter(img, self.resize), self.size)
            arr = np.pad(np.asarray(img), ((4, 4), (4, 4), (0, 0)), mode="reflect")
            i, j = rng.integers(0, 9, size=2)
            arr = arr[i : i + self.size, j : j + self.size]
            img = Image.fromarray(np.ascontiguousarray(arr))
        else:
            img = _random_resized_crop(img, self.size, rng)
        if self.augment and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((x - self.mean) / self.std)


def _resize_shorter(img: Any, side: int) -> Any:
    from PIL import Image

    w, h = img.size
    if min(w, h) == side:
        return img
    scale = side / min(w, h)
    return img.resize((max(side, round(w * scale)), max(side, round(h * scale))), Image.Resampling.BILINEAR)


def _centre_crop(img: Any, size: int) -> Any:
    w, h = img.size
    if w < size or h < size:
        raise DataError(f"an image of {w}x{h} pixels is smaller than image_size={size} after resizing; "
                        "set resize >= image_size")
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _random_resized_crop(img: Any, size: int, rng: np.random.Generator) -> Any:
    """torchvision's ``RandomResizedCrop(size)`` (scale 0.08-1, log-uniform aspect 3/4-4/3,
    ten tries, then the centre crop of the clamped aspect)."""
    from PIL import Image

    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            i, j = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            break
    else:
        ratio = w / h
        cw, ch = (w, round(w / (4 / 3))) if ratio > 4 / 3 else (round(h * 3 / 4), h) if ratio < 3 / 4 \
            else (w, h)
        i, j = (h - ch) // 2, (w - cw) // 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(j, i, j + cw, i + ch))


class ImageFolderDataset(torch.utils.data.Dataset):
    """Item ``i`` of a :class:`FolderSplit`: ``(x (3, S, S) or None, label, relative path)``.

    A file that fails to decode gives ``x = None`` (``bad_images="skip"``; :func:`collate` drops
    it) or raises :class:`DataError` naming it. Augmentation draws from a generator seeded with
    ``(epoch_seed, i)``, so a batch does not depend on the number of workers.
    """

    def __init__(self, split: FolderSplit, transform: ImageTransform, bad_images: str) -> None:
        self.split, self.transform, self.bad_images = split, transform, bad_images
        self.epoch_seed = 0

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[Tensor | None, int, str]:
        from PIL import Image

        path = self.split.path(i)
        name = self.split.files[i].decode()
        try:
            with Image.open(path) as img:
                img.load()
                x = self.transform(img, np.random.default_rng((self.epoch_seed, int(i))))
        except (OSError, ValueError, SyntaxError) as err:
            if isinstance(err, DataError) or self.bad_images == "error":
                raise DataError(f"{path} could not be decoded ({type(err).__name__}: {err})") from err
            return None, int(self.split.labels[i]), name
        return x, int(self.split.labels[i]), name


def collate(items: list[tuple[Tensor | None, int, str]]) -> tuple[Tensor | None, Tensor, list[str]]:
    """``(x (B, 3, S, S), y (B,), skipped names)``; items that failed to decode are left out."""
    good = [(x, y) for x, y, _ in items if x is not None]
    skipped = [name for x, _, name in items if x is None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), skipped
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped


def loader_batches(dataset: ImageFolderDataset, ids: np.ndarray, batch_size: int, workers: int,
                   skipped: set[str]) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches of ``dataset`` items ``ids`` in that order, decoded by ``workers`` processes (0: in
    this one); the names of files that failed to decode are added to ``skipped``."""
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, ids.tolist()), batch_size=batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate, persistent_workers=False,
        multiprocessing_context="fork" if workers else None)
    for x, y, bad in loader:
        if bad:
            new = [b for b in bad if b not in skipped]
            skipped.update(bad)
            if new:
                log.warning("skipped %d image(s) that failed to decode: %s", len(new),
                            ", ".join(new[:SHOWN]))
        if x is not None:
            yield x, y


def channel_stats(split: FolderSplit, transform: ImageTransform, count: int = 512
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of up to ``count`` training images spread evenly
    over the split (decoded with ``transform``'s evaluation path, before standardising)."""
    from PIL import Image

    ids = np.unique(np.linspace(0, len(split) - 1, min(count, len(split))).round().astype(np.int64))
    total, sq, n = np.zeros(3), np.zeros(3), 0
    for i in ids:
        try:
            with Image.open(split.path(int(i))) as img:
                img = _centre_crop(_resize_shorter(img.convert("RGB"), transform.resize), transform.size)
        except (OSError, ValueError, SyntaxError) as err:
            if isinstance(err, DataError):
                raise
            continue
        x = np.asarray(img, dtype=np.float64).reshape(-1, 3) / 255.0
        total += x.sum(0)
        sq += (x * x).sum(0)
        n += len(x)
    if n == 0:
        raise DataError(f"none of the sampled training images under {split.root} decodes")
    mean = total / n
    std = np.sqrt(np.maximum(sq / n - mean**2, 0)) + 1e-6
    return mean.astype(np.float32), std.astype(np.float32)


class FolderData:
    """The three splits of an image folder, streamed (module docstring).

    Args:
        root: the folder holding ``train/``, ``test/`` and optionally ``val/``.
        image_size: output side (0: the shorter side of the first training image).
        resize: the shorter side before the centre crop (0: ``image_size``).
        valid_fraction, seed: without ``val/``, the seeded share of ``train/`` held out.
        train_subset, test_subset: a seeded subset of this many files (0: all).
        augment, workers, bad_images, check_images, mean, std: see the module docstring.
    """

    def __init__(self, root: str | Path, image_size: int = 0, resize: int = 0, valid_fraction: float = 0.1,
                 seed: int = 0, train_subset: int = 0, test_subset: int = 0, augment: bool = False,
                 workers: int = 2, bad_images: str = "skip", check_images: bool = True,
                 mean: tuple = (), std: tuple = ()) -> None:
        from PIL import Image

        root = Path(root)
        if not root.is_dir():
            raise DataError(f"{root} is not a folder; an image folder holds train/<class>/<image> and "
                            "test/<class>/<image>")
        for split in ("train", "test"):
            if split_dir(root, split) is None:
                raise DataError(f"{root} has no {split}/ folder; an image folder holds "
                                "train/<class>/<image>, test/<class>/<image> and optionally val/")
        self.root, self.workers, self.bad_images = root, workers, bad_images
        self.classes = find_classes(root / "train")
        scan = {s: scan_split(root, d, self.classes, check_images, bad_images)
                for s in ("train", "valid", "test") if (d := split_dir(root, s)) is not None}
        rng = np.random.default_rng(seed)
        train = scan["train"]
        if train_subset and train_subset < len(train):
            train = train.take(np.sort(rng.permutation(len(train))[:train_subset]))
        if "valid" in scan:
            valid = scan["valid"]
        else:
            if len(train) < 2:
                raise DataError(f"{root / 'train'} has {len(train)} readable image(s); at least 2 are "
                                "needed (one is held out for validation)")
            n_valid = min(len(train) - 1, max(1, round(valid_fraction * len(train))))
            perm = np.random.default_rng(seed).permutation(len(train))
            valid, train = train.take(np.sort(perm[:n_valid])), train.take(np.sort(perm[n_valid:]))
        test = scan["test"]
        if test_subset and test_subset < len(test):
            test = test.take(np.sort(np.random.default_rng(seed).permutation(len(test))[:test_subset]))
        self.splits = {"train": train, "valid": valid, "test": test}
        self.skipped: dict[str, set[str]] = {s: set(scan[s].skipped) for s in scan}
        if not image_size:
            with Image.open(train.path(0)) as img:
                image_size = min(img.size)
        self.image_size, self.resize = image_size, resize or image_size
        if self.resize < self.image_size:
            raise DataError(f"resize={self.resize} is smaller than image_size={self.image_size}")
        plain = ImageTransform(self.image_size, self.resize, False, np.zeros(3), np.ones(3))
        if mean and std:
            self.mean, self.std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        else:
            self.mean, self.std = channel_stats(train, plain)
        self.datasets = {
            split: ImageFolderDataset(part, ImageTransform(self.image_size, self.resize,
                                                           augment and split == "train", self.mean,
                                                           self.std), bad_images)
            for split, part in self.splits.items()}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def sizes(self) -> dict[str, int]:
        """Files per split (those whose header reads)."""
        return {split: len(part) for split, part in self.splits.items()}

    def batches(self, split: str, batch_size: int, shuffle: bool = False,
                generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """``(x (B, 3, S, S), y (B,))`` of ``split``: in file order, or shuffled with ``generator``
        (which also seeds the augmentation of the epoch)."""
        dataset = self.datasets[split]
        n = len(dataset)
        if shuffle:
            gen = generator or torch.Generator()
            ids = torch.randperm(n, generator=gen).numpy()
            dataset.epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        else:
            ids = np.arange(n)
        return loader_batches(dataset, ids, batch_size, self.workers, self.skipped.setdefault(split, set()))

    def report(self) -> dict[str, Any]:
        """What the report keeps: the files skipped per split (count and up to 10 names)."""
        return {"skipped_images": {split: {"count": len(names), "files": sorted(names)[:SHOWN]}
                                   for split, names in self.skipped.items()},
                "image_size": self.image_size, "resize": self.resize,
                "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}
