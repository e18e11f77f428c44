"""Image data loading (npz, IDX) with clear errors, and the conv DEQ cell."""

import gzip
import struct

import numpy as np
import pytest
import torch

from cdeq.engine.config import ConfigError
from cdeq.tasks.images import (
    ConvDEQCell,
    DataError,
    DigitsTask,
    ImageConfig,
    ImageTask,
    MnistTask,
    load_digits_split,
    load_idx_folder,
    load_npz,
    read_idx,
    validation_share,
)


def write_idx(path, array, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_arrays(n_train=40, n_test=20, size=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 255, (n_train, size, size), dtype=np.uint8),
            rng.integers(0, classes, n_train).astype(np.int64),
            rng.integers(0, 255, (n_test, size, size), dtype=np.uint8),
            rng.integers(0, classes, n_test).astype(np.int64))


def test_npz_roundtrip_and_task(tmp_path):
    x_tr, y_tr, x_te, y_te = make_arrays()
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    task = ImageTask(ImageConfig(dataset="npz", data=str(path), channels=8))
    assert task.split_sizes() == {"train": 36, "valid": 4, "test": 20}  # 10% of 40 held out
    assert task.x_train.shape == (36, 1, 8, 8) and task.num_classes == 3
    assert abs(float(task.x_train.mean())) < 1e-4  # standardised with training statistics
    xb, yb = next(iter(task.train_batches(16, generator=torch.Generator().manual_seed(0))))
    assert xb.shape == (16, 1, 8, 8) and yb.dtype == torch.int64
    logits, info = task.build_model().eval()(xb)
    assert logits.shape == (16, 3) and info.nfe.shape == (16,)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder(tmp_path, gz):
    x_tr, y_tr, x_te, y_te = make_arrays()
    ext = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", x_tr, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", y_tr.astype(np.uint8), gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", x_te, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", y_te.astype(np.uint8), gz)
    a, b, c, d = load_idx_folder(tmp_path)
    assert np.array_equal(a, x_tr) and np.array_equal(b, y_tr) and np.array_equal(d, y_te)
    assert c.shape == x_te.shape


def test_bad_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError, match="not a valid .npz"):
        load_npz(tmp_path / "junk.npz")
    x_tr, y_tr, x_te, y_te = make_arrays()
    np.savez(tmp_path / "nolabels.npz", x_train=x_tr, x_test=x_te, y_test=y_te)
    with pytest.raises(DataError, match="y_train"):
        load_npz(tmp_path / "nolabels.npz")
    np.savez(tmp_path / "mismatch.npz", x_train=x_tr, y_train=y_tr[:5], x_test=x_te, y_test=y_te)
    with pytest.raises(DataError, match="one label per image"):
        load_npz(tmp_path / "mismatch.npz")
    np.savez(tmp_path / "shape.npz", x_train=x_tr, y_train=y_tr, x_test=x_te[:, :4], y_test=y_te)
    with pytest.raises(DataError, match="differ in shape"):
        load_npz(tmp_path / "shape.npz")
    np.savez(tmp_path / "neg.npz", x_train=x_tr, y_train=-y_tr - 1, x_test=x_te, y_test=y_te)
    with pytest.raises(DataError, match=">= 0"):
        load_npz(tmp_path / "neg.npz")
    bad = x_tr.astype(np.float32)
    bad[0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=bad, y_train=y_tr, x_test=x_te, y_test=y_te)
    with pytest.raises(DataError, match="NaN"):
        load_npz(tmp_path / "nan.npz")
    with pytest.raises(DataError, match="t10k-images"):
        write_idx(tmp_path / "train-images-idx3-ubyte", x_tr)
        write_idx(tmp_path / "train-labels-idx1-ubyte", y_tr.astype(np.uint8))
        load_idx_folder(tmp_path)
    (tmp_path / "short.idx").write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 100) + b"\x01")
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short.idx")


def test_unseen_test_label_is_an_error(tmp_path):
    x_tr, y_tr, x_te, y_te = make_arrays(classes=3)
    y_te[0] = 7
    np.savez(tmp_path / "d.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    with pytest.raises(DataError, match="never occur"):
        ImageTask(ImageConfig(dataset="npz", data=str(tmp_path / "d.npz")))


def test_conv_cell_fixed_point_converges():
    torch.manual_seed(0)
    cell = ConvDEQCell(8, hidden_mult=1).double()
    from cdeq import get_solver

    u = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    res = get_solver("anderson", max_iter=100, tol=1e-8).solve(cell, torch.zeros_like(u), u)
    assert bool(res.converged.all())
    with torch.no_grad():
        assert torch.allclose(cell(res.z, u), res.z, atol=1e-6)


@pytest.mark.parametrize("content", [b"not a zip file", b"\x93NUMPY" + bytes(range(200)), b""])
def test_garbage_npz_is_named_and_explained(tmp_path, content):
    """Garbage bytes: the message names the file and what a valid .npz holds, and does not
    advise allow_pickle."""
    path = tmp_path / "garbage.npz"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_npz(path)
    msg = str(err.value)
    assert str(path) in msg and "not a valid .npz" in msg
    assert "x_train, y_train, x_test, y_test" in msg
    assert "allow_pickle" not in msg


def test_damaged_zip_npz_is_not_valid(tmp_path):
    x_tr, y_tr, x_te, y_te = make_arrays()
    path = tmp_path / "cut.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    path.write_bytes(path.read_bytes()[:300] + b"\x00" * 50 + path.read_bytes()[350:])
    with pytest.raises(DataError, match="not a valid .npz"):
        load_npz(path)


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x}


def test_validation_share_is_seeded_disjoint_and_sized(tmp_path):
    x_tr, y_tr, x_te, y_te = make_arrays(n_train=50, n_test=10)
    x_tr[:, 0, 0] = np.arange(50)  # every training image distinct
    np.savez(tmp_path / "d.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    cfg = ImageConfig(dataset="npz", data=str(tmp_path / "d.npz"), valid_fraction=0.2)
    task = ImageTask(cfg)
    assert task.split_sizes() == {"train": 40, "valid": 10, "test": 10}
    train, valid = _rows(task.x_train), _rows(task.x_valid)
    assert len(train) == 40 and len(valid) == 10 and not train & valid  # disjoint, nothing lost
    again = ImageTask(cfg)
    assert torch.equal(again.x_valid, task.x_valid) and torch.equal(again.y_valid, task.y_valid)
    other = ImageTask(cfg.replace(seed=1))
    assert _rows(other.x_valid) != valid  # the share follows the seed
    tr, va = validation_share(50, 0.2, seed=0)
    assert len(va) == 10 and sorted(np.concatenate([tr, va]).tolist()) == list(range(50))


def test_digits_split_sizes_and_selection_never_uses_test(monkeypatch):
    task = DigitsTask(ImageConfig())
    assert task.split_sizes() == {"train": 1260, "valid": 140, "test": 397}
    assert task.describe()["splits"] == task.split_sizes()
    assert not _rows(task.x_train) & _rows(task.x_valid)
    assert not _rows(task.x_valid) & _rows(task.x_test)

    def no_test(*args, **kwargs):
        raise AssertionError("selection touched the test split")

    monkeypatch.setattr(task, "test_batches", no_test)
    selected = list(task.selection_batches(64))
    expected = list(task.validation_batches(64))
    assert len(selected) == len(expected) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(selected, expected, strict=True))
    assert torch.equal(torch.cat([x for x, _ in selected]), task.x_valid)


@pytest.mark.parametrize("bad", [0.0, 0.6, "0.1", -0.1])
def test_valid_fraction_is_validated(bad):
    with pytest.raises(ConfigError, match="valid_fraction"):
        ImageConfig(valid_fraction=bad)


def test_shipped_digits_match_the_original_order():
    """The shipped array file gives today's seeded split: the same arrays scikit-learn gives."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    assert np.array_equal(x_tr, d.images.astype(np.float32)[perm][:1400])
    assert np.array_equal(y_te, d.target[perm][1400:])
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64


def test_shipped_digits_without_sklearn():
    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    assert x_tr.shape == (1400, 8, 8) and x_te.shape == (397, 8, 8)
    assert x_tr.min() == 0 and x_tr.max() == 16
    assert np.bincount(np.concatenate([y_tr, y_te])).tolist() == [178, 182, 177, 183, 181, 182, 181,
                                                                  179, 174, 180]


def test_data_folder_is_read_when_used(tmp_path, monkeypatch):
    """CDEQ_DATA set after cdeq is imported still takes effect."""
    x_tr, y_tr, x_te, y_te = make_arrays(n_train=30, n_test=7)
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "mnist.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    monkeypatch.setenv("CDEQ_DATA", str(tmp_path))
    task = MnistTask(ImageConfig(channels=8))
    assert task.split_sizes() == {"train": 27, "valid": 3, "test": 7}


def test_images_task_picks_the_reader_from_the_path(tmp_path):
    (tmp_path / "idx").mkdir()
    assert ImageTask.resolve_user_config({}, str(tmp_path / "idx")) == {"task_config": {"dataset": "idx"}}
    user = {"task_config": {"channels": 8}}
    assert ImageTask.resolve_user_config(user, str(tmp_path / "d.npz")) == {
        "task_config": {"channels": 8, "dataset": "npz"}}
    assert user == {"task_config": {"channels": 8}}  # the caller's dict is left alone
    given = {"task_config": {"dataset": "idx"}}
    assert ImageTask.resolve_user_config(given, str(tmp_path / "d.npz")) == given
    assert MnistTask.resolve_user_config({}, str(tmp_path / "d.npz")) == {}  # a fixed dataset
    assert ImageTask.variants({"a": 1}) == [(None, {"a": 1})]


@pytest.mark.parametrize("member", [b"", b"\x93NUMPY\x01\x00", b"plain bytes"])
def test_npz_whose_members_are_not_arrays_is_named(tmp_path, member):
    """A zip holding the four names, each empty, a cut .npy header or other bytes."""
    import zipfile

    path = tmp_path / "hollow.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(f"{key}.npy", member)
    with pytest.raises(DataError, match="not a valid .npz") as err:
        load_npz(path)
    assert str(path) in str(err.value) and "x_train, y_train, x_test, y_test" in str(err.value)


def test_cli_images_with_a_hollow_npz_gives_a_clear_error(tmp_path, capsys):
    import zipfile

    from cdeq.cli import main

    path = tmp_path / "hollow.npz"
    with zipfile.ZipFile(path, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(f"{key}.npy", b"")
    out = tmp_path / "run"
    assert main(["run", "images", "--quick", "--data", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not a valid .npz" in err and "Traceback" not in err
    assert not out.exists()  # nothing written for a data set that failed


@pytest.mark.parametrize("content", [b"not a tar archive " * 40, b"", "gzip"])
def test_cifar10_garbage_archive_is_named(tmp_path, content):
    from cdeq.tasks.images.data import load_cifar10_archive

    path = tmp_path / "cifar10_jpg.tar.gz"
    if content == "gzip":  # a valid gzip stream whose content is not a tar archive
        path.write_bytes(gzip.compress(b"\x01" * 4000))
    else:
        path.write_bytes(content)
    cache = tmp_path / "cache.npz"
    with pytest.raises(DataError, match="not a readable tar archive") as err:
        load_cifar10_archive(path, cache=cache)
    assert str(path) in str(err.value) and "train/<class>/*.jpg" in str(err.value)
    assert not cache.exists()
    with pytest.raises(DataError, match="is not a file"):
        load_cifar10_archive(tmp_path, cache=cache)


def test_cifar10_archive_with_a_broken_image_names_the_member(tmp_path):
    import io
    import tarfile

    from cdeq.tasks.images.data import load_cifar10_archive

    path = tmp_path / "c.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("cifar10/train/cat/0001.jpg")
        info.size = 12
        tar.addfile(info, io.BytesIO(b"not a jpeg!!"))
    with pytest.raises(DataError, match=r"train/cat/0001.jpg is not a readable JPEG"):
        load_cifar10_archive(path, cache=tmp_path / "cache.npz")
