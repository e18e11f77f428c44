"""Image data: readers for the built-in data sets and a user's ``.npz`` or IDX folder.

Every reader returns ``(x_train, y_train, x_test, y_test)`` numpy arrays: images ``(N, H, W)``,
``(N, H, W, C)`` or ``(N, C, H, W)`` and integer labels ``(N,)``, checked by
:func:`check_arrays`. The task carves its validation split from the training arrays.

- digits: the 1,797 8x8 digits shipped with this package (``digits.npz``, see ``DIGITS.md``),
  seeded split 1,400 train / 397 test.
- MNIST: ``<data>/mnist/mnist.npz``; CIFAR-10: the JPEG archive ``<data>/cifar10``.
- a user's ``.npz`` with ``x_train, y_train, x_test, y_test``, or a folder of IDX files as the
  MNIST family ships them (gzipped or not).
"""

from __future__ import annotations

import gzip
import lzma
import os
import struct
import tarfile
import zipfile
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent."""


# --- loading ----------------------------------------------------------------------------------
def check_arrays(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray,
                  source: str) -> tuple[np.ndarray, ...]:
    """Check the image arrays and labels of the train and test splits; returns them unchanged.

    Args:
        x_tr: training images ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``.
        y_tr: training labels ``(N,)``, integers.
        x_te: test images, as ``x_tr``.
        y_te: test labels, as ``y_tr``.
        source: the file the arrays came from, named in errors.

    Raises:
        DataError: a wrong rank, an empty split, one label per image missing, labels that are
            not non-negative integers, NaN or inf, or train and test images of different shapes;
            the message names ``source``.
    """
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
    """Read an image ``.npz`` (``np.savez`` of ``x_train, y_train, x_test, y_test``)."""
    path = Path(path)
    expect = "a valid one is a zip archive of .npy arrays x_train, y_train, x_test, y_test (np.savez)"
    if not path.exists():
        raise DataError(f"{path} does not exist; give an .npz with x_train, y_train, x_test, y_test")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not a valid .npz file (its bytes are not a zip archive); {expect}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data]
            if missing:
                raise DataError(f"{path} lacks {missing}; an image .npz needs x_train, y_train, "
                                f"x_test, y_test (found {sorted(data.files)})")
            arrays = tuple(data[k] for k in NPZ_KEYS)
        bad = [k for k, a in zip(NPZ_KEYS, arrays, strict=True) if not isinstance(a, np.ndarray)]
        if bad:  # np.load hands back the raw bytes of a member that is not a .npy array
            raise DataError(f"{path} is not a valid .npz file: its members {[k + '.npy' for k in bad]} "
                            f"are not .npy arrays (empty or other bytes); {expect}")
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} is not a valid .npz file ({type(err).__name__}: {err}); {expect}; "
                        "arrays of Python objects are refused") from err
    return check_arrays(*arrays, source=str(path))


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
    """Read a folder of IDX files as the MNIST family ships them (``train-images``,
    ``train-labels``, ``t10k-images`` or ``test-images``, ``t10k-labels`` or ``test-labels``;
    gzipped or not) into ``(x_train, y_train, x_test, y_test)``."""
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
    return check_arrays(found["x_train"], found["y_train"].astype(np.int64), found["x_test"],
                         found["y_test"].astype(np.int64), source=str(folder))


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, ...]:
    """The shipped digits ``(1797, 8, 8)`` float32, shuffled with ``seed``: 1,400 train, 397 test."""
    with resources.files(__package__).joinpath("digits.npz").open("rb") as fh, np.load(fh) as d:
        x = d["images"].astype(np.float32)
        y = d["target"].astype(np.int64)
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
    expect = ("CIFAR-10 needs the JPEG archive: a tar file (gzip, bz2 or xz compressed, or not) of "
              "train/<class>/*.jpg and test/<class>/*.jpg")
    if not path.is_file():
        raise DataError(f"{path} is not a file; {expect}")
    try:
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
                try:
                    img = Image.open(BytesIO(tar.extractfile(m).read())).convert("RGB")
                except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                    raise DataError(f"{path}: {m.name} is not a readable JPEG image ({err})") from err
                splits[split][0].append(np.asarray(img, dtype=np.uint8))
                splits[split][1].append(cls)
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        raise DataError(f"{path} is not a readable tar archive ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else 'no detail'}); {expect}") from err
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
    return check_arrays(*out, source=str(path))
