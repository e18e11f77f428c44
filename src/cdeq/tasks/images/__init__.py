"""Image classification with a convolutional DEQ: tasks ``digits``, ``mnist``, ``cifar10``, ``images``.

- :mod:`.data`: readers (the shipped digits, MNIST's npz, the CIFAR-10 JPEG archive, a user's
  ``.npz`` or IDX folder) and their checks.
- :mod:`.model`: the injection, the MDEQ-style cell and the pooling head.
- :mod:`.task`: the :class:`~cdeq.tasks.base.Task` subclasses (train / validation / test splits).
- :mod:`.presets`: each task's run defaults, as data.
"""

from .data import (
    DataError,
    check_arrays,
    load_cifar10_archive,
    load_digits_split,
    load_idx_folder,
    load_npz,
    read_idx,
    to_nchw,
)
from .model import ConvDEQCell, ConvInjection, PoolHead
from .task import Cifar10Task, DigitsTask, ImageConfig, ImageTask, MnistTask, load_arrays, validation_share

__all__ = [
    "Cifar10Task",
    "ConvDEQCell",
    "ConvInjection",
    "DataError",
    "DigitsTask",
    "ImageConfig",
    "ImageTask",
    "MnistTask",
    "PoolHead",
    "check_arrays",
    "load_arrays",
    "load_cifar10_archive",
    "load_digits_split",
    "load_idx_folder",
    "load_npz",
    "read_idx",
    "to_nchw",
    "validation_share",
]
