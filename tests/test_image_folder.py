"""Image folders (ImageFolder's layout) streamed from disk: splits, transforms, worker-independent
augmentation, and unreadable files skipped and counted or refused with the file's name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from cdeq.cli import main  # noqa: E402
from cdeq.tasks.images import DataError, ImageConfig, ImageTask  # noqa: E402
from cdeq.tasks.images.folder import FolderData  # noqa: E402

CLASSES = ("cat", "dog", "eel")


def write_folder(root, n_train=6, n_test=3, val=0, size=(12, 10)):
    """Class ``c``'s images are filled with the value ``60 c + noise`` (PNG and JPEG alternate)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test), ("val", val)):
        if n == 0:
            continue
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((size[1], size[0], 3)) * 20 + 60 * c).astype(np.uint8)
                Image.fromarray(arr).save(folder / f"{i:03d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_splits_labels_and_standardised_batches(tmp_path):
    data = FolderData(write_folder(tmp_path), image_size=8, valid_fraction=0.25, workers=0)
    assert data.classes == list(CLASSES)
    assert data.sizes() == {"train": 14, "valid": 4, "test": 9}  # 18 training files, 4 held out
    train_files = set(data.splits["train"].files.tolist())
    assert not train_files & set(data.splits["valid"].files.tolist())
    x, y = next(iter(data.batches("test", 9)))
    assert x.shape == (9, 3, 8, 8) and x.dtype == torch.float32
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # sorted class folders, files in order
    per_class = torch.stack([x[y == c].mean() for c in range(3)])
    assert bool((per_class.diff() > 0).all())  # brighter classes stay brighter after standardising
    xs = torch.cat([b[0] for b in data.batches("train", 5)])
    assert abs(float(xs.mean())) < 0.3 and 0.7 < float(xs.std()) < 1.3  # the training statistics


def test_val_folder_is_the_validation_split(tmp_path):
    data = FolderData(write_folder(tmp_path, val=2), image_size=8, workers=0)
    assert data.sizes() == {"train": 18, "valid": 6, "test": 9}
    assert all(f.startswith(b"val/") for f in data.splits["valid"].files)


def test_augmented_batches_do_not_depend_on_the_workers(tmp_path):
    write_folder(tmp_path, size=(40, 36))
    batches = []
    for workers in (0, 2):
        data = FolderData(tmp_path, image_size=32, resize=36, augment=True, workers=workers)
        gen = torch.Generator().manual_seed(3)
        batches.append([b for b in data.batches("train", 4, shuffle=True, generator=gen)])
    for (xa, ya), (xb, yb) in zip(*batches, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = FolderData(tmp_path, image_size=32, resize=36, workers=0)
    x_plain = torch.cat([b[0] for b in plain.batches("train", 18)])
    assert not torch.equal(torch.cat([b[0] for b in batches[0]]).sort(0).values, x_plain.sort(0).values)


def test_random_resized_crop_for_large_images(tmp_path):
    write_folder(tmp_path, n_train=2, n_test=1, size=(90, 80))
    data = FolderData(tmp_path, image_size=72, resize=80, augment=True, workers=0)
    x, _ = next(iter(data.batches("train", 6, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert x.shape == (5, 3, 72, 72) and torch.isfinite(x).all()  # 6 files, 1 held out


def test_unreadable_and_truncated_files_are_skipped_and_counted(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / "dog" / "zz_not_an_image.jpg").write_bytes(b"plain text, not a JPEG")
    noise = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    good = tmp_path / "good.jpg"
    Image.fromarray(noise).save(good)
    cut = tmp_path / "test" / "eel" / "zz_truncated.jpg"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) * 3 // 4])  # the header reads, pixels do not
    task = ImageTask(ImageConfig(dataset="folder", data=str(tmp_path), image_size=8, workers=0))
    assert task.split_sizes()["test"] == 10  # the truncated file is only found when decoded
    seen = sum(len(y) for _, y in task.test_batches(4))
    assert seen == 9
    report = task.data_report()["skipped_images"]
    assert report["train"] == {"count": 1, "files": ["train/dog/zz_not_an_image.jpg"]}
    assert report["test"] == {"count": 1, "files": ["test/eel/zz_truncated.jpg"]}


def test_bad_images_error_names_the_file(tmp_path):
    write_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "zz.png"
    bad.write_bytes(b"\x89PNG but not really")
    with pytest.raises(DataError, match="zz.png is not a readable image"):
        FolderData(tmp_path, bad_images="error", workers=0)


def test_cli_runs_an_image_folder_and_reports_what_it_skipped(tmp_path, capsys):
    write_folder(tmp_path / "data", n_train=8)
    (tmp_path / "data" / "train" / "cat" / "broken.jpg").write_bytes(b"")
    out = tmp_path / "run"
    assert main(["run", "images", "--quick", "--data", str(tmp_path / "data"), "--out", str(out),
                 "--set", "task_config.image_size=8", "task_config.workers=0", "baselines.enabled=false",
                 "plus.enabled=false"]) == 0
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["data"]["skipped_images"]["train"]["files"] == ["train/cat/broken.jpg"]
    assert report["splits"]["test"] == 9
    assert "skipped 1 unreadable file(s)" in capsys.readouterr().err  # the log names it too


@pytest.mark.parametrize("damage", ["bad_file", "unknown_class", "no_test", "empty_class"])
def test_bad_folders_give_rc_2_naming_the_file_and_write_nothing(tmp_path, capsys, damage):
    root = write_folder(tmp_path / "data")
    if damage == "bad_file":
        name = root / "test" / "cat" / "zz.jpg"
        name.write_bytes(b"not an image")
        extra = ["task_config.bad_images=error"]
    elif damage == "unknown_class":
        name = root / "test" / "yak"
        name.mkdir()
        extra = []
    elif damage == "no_test":
        import shutil

        shutil.rmtree(root / "test")
        name, extra = root, []
    else:
        name = root / "train"
        for p in (root / "train").rglob("*.*"):
            p.unlink()
        extra = []
    out = tmp_path / "run"
    assert main(["run", "images", "--quick", "--data", str(root), "--out", str(out),
                 "--set", "task_config.workers=0", *extra]) == 2
    err = capsys.readouterr().err
    assert str(name) in err and "Traceback" not in err
    assert not out.exists()


def test_images_task_resolves_an_image_folder(tmp_path):
    write_folder(tmp_path, n_train=1, n_test=1)
    assert ImageTask.resolve_user_config({}, str(tmp_path)) == {"task_config": {"dataset": "folder"}}
