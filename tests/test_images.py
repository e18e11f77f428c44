"""Image data loading (npz, IDX) with clear errors, and the conv DEQ cell."""

import gzip
import struct

import numpy as np
import pytest
import torch

from cdeq.tasks.images import (
    ConvDEQCell,
    DataError,
    ImageConfig,
    ImageTask,
    load_idx_folder,
    load_npz,
    read_idx,
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
    assert task.x_train.shape == (40, 1, 8, 8) and task.num_classes == 3
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
    with pytest.raises(DataError, match="not a readable"):
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
