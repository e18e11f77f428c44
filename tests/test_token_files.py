"""Token files: text prepared once into memory-mapped id arrays (the same ids as reading the whole
text), folders of ``.bin`` token ids read as they are, and bad token files refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdeq.cli import main
from cdeq.run.config import build_config
from cdeq.tasks.text import TextConfig, TextTask, load_corpus
from cdeq.tasks.text.tokens import id_dtype, prepare_corpus

WORDS = "the cat sat on the mat\nA dog . = head =\n\n<unk> ran far\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CDEQ_CACHE", str(tmp_path / "cache"))


def expected_char_ids(text: str, train: str) -> list[int]:
    codes = sorted(set(train))
    return [1 + codes.index(c) if c in codes else 0 for c in text]


def test_a_text_file_is_prepared_once_into_memory_mapped_ids(tmp_path):
    text = "abcdefghij\n" * 40 + "XYZ xyz\n" * 10
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    corpus = load_corpus(path, level="char", valid_fraction=0.1, test_fraction=0.1)
    n = len(text)
    cut0, cut1 = int(n * 0.8), int(n * 0.9)
    train = text[:cut0]
    assert corpus.splits["train"].tolist() == expected_char_ids(train, train)
    assert corpus.splits["test"].tolist() == expected_char_ids(text[cut1:], train)  # X, Y, Z -> <unk>
    assert corpus.splits["train"].dtype == torch.uint8  # 10 letters + newline + <unk>
    prepared = list((tmp_path / "cache" / "tokens").iterdir())
    assert len(prepared) == 1 and (prepared[0] / "train.bin").stat().st_size == cut0
    meta = json.loads((prepared[0] / "meta.json").read_text())
    assert meta["tokens"] == {"train": cut0, "valid": cut1 - cut0, "test": n - cut1}
    stamp = (prepared[0] / "train.bin").stat().st_mtime_ns
    again = prepare_corpus(path, "char", 0.1, 0.1, {"train": 0, "valid": 0, "test": 0}, 0)
    assert again == prepared[0] and (again / "train.bin").stat().st_mtime_ns == stamp  # reused
    path.write_text(text + "more\n")  # a changed file is prepared again
    load_corpus(path, level="char", valid_fraction=0.1, test_fraction=0.1)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2


def test_words_cut_at_line_ends_with_eos(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text(WORDS * 20)
    corpus = load_corpus(path, level="word", valid_fraction=0.2, test_fraction=0.2)
    text = WORDS * 20
    cut = text.rfind("\n", 0, int(len(text) * 0.6)) + 1
    train_words = [w for line in text[:cut].splitlines() for w in (*line.split(), "<eos>")]
    assert corpus.decode(corpus.splits["train"].tolist()).split() == [
        w for w in train_words if w != "<eos>"]
    assert corpus.splits["train"].numel() == len(train_words)
    assert corpus.vocab[0] == "<unk>" and corpus.vocab[1] == "<eos>"  # the most frequent word next


def test_a_folder_of_token_files_is_read_as_it_is(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 5000), ("val.bin", 600), ("test.bin", 600)):
        rng.integers(0, 300, n, dtype=np.uint16).tofile(tmp_path / name)
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 300}))
    task = TextTask(TextConfig(data=str(tmp_path), seq_len=16, d_model=16, n_heads=2, eval_windows=4,
                               epoch_windows=8, record_windows=4))
    assert task.vocab_size == 300 and task.metric == "nats_per_token"
    assert task.split_sizes() == {"train": 5000, "valid": 600, "test": 600}
    x, y = next(iter(task.train_batches(4, generator=torch.Generator().manual_seed(0))))
    assert x.shape == (4, 16) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    train = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    start = int(np.flatnonzero(np.lib.stride_tricks.sliding_window_view(train, 16)
                               .__eq__(x[0].numpy()).all(1))[0])
    assert y[0].tolist() == train[start + 1 : start + 17].tolist()  # windows read the file's ids
    logits, _ = task.build_model()(x)
    assert logits.shape == (4, 16, 300)
    assert task.corpus.decode([3, 7]) == "3 7" and task.corpus.encode("3 7") == [3, 7]


def test_id_dtype_is_the_narrowest():
    assert [id_dtype(n).name for n in (2, 256, 257, 65536, 65537)] == [
        "uint8", "uint8", "uint16", "uint16", "int32"]


@pytest.mark.parametrize("damage", ["odd_bytes", "id_beyond_vocab", "missing_test"])
def test_bad_token_files_give_rc_2_naming_the_file_and_write_nothing(tmp_path, capsys, damage):
    data = tmp_path / "tokens"
    data.mkdir()
    for name in ("train.bin", "val.bin", "test.bin"):
        np.arange(400, dtype=np.uint16).tofile(data / name)
    (data / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 400}))
    if damage == "odd_bytes":
        (data / "val.bin").write_bytes((data / "val.bin").read_bytes() + b"\x01")
        name = data / "val.bin"
    elif damage == "id_beyond_vocab":
        np.array([5, 9000], dtype=np.uint16).tofile(data / "test.bin")
        name = data
    else:
        (data / "test.bin").unlink()
        name = data
    out = tmp_path / "run"
    assert main(["run", "text", "--quick", "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(name) in err and "Traceback" not in err
    assert not out.exists()


def test_text_that_fails_to_prepare_leaves_no_cache(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine text\n" * 50 + b"\xff\xfe broken utf-8\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(path, level="char")
    cache = tmp_path / "cache" / "tokens"
    assert not cache.exists() or not any(cache.iterdir())


def test_a_quick_run_on_a_token_folder(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train.bin", 4000), ("val.bin", 800), ("test.bin", 800)):
        (rng.integers(0, 50, n) // 2 * 2).astype(np.uint8).tofile(tmp_path / name)  # even ids only
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint8", "vocab_size": 50}))
    out = tmp_path / "run"
    assert main(["run", "text", "--quick", "--data", str(tmp_path), "--out", str(out),
                 "--set", "baselines.enabled=false", "plus.enabled=false"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "nats_per_token"
    assert report["teacher"]["metric"] < np.log(50)  # learnt that odd ids never occur


def test_the_paper_size_is_one_key(tmp_path):
    for name in ("train.bin", "val.bin", "test.bin"):
        np.random.default_rng(0).integers(0, 100, 400, dtype=np.uint16).tofile(tmp_path / name)
    cfg = TextConfig(data=str(tmp_path), size="paper", seq_len=12)  # a given value wins
    assert (cfg.d_model, cfg.n_heads, cfg.seq_len) == (410, 10, 12)
    task = TextTask(cfg)
    model = task.build_model()
    assert tuple(model.cell.fc1.weight.shape) == (2100, 410) and model.cell.n_heads == 10
    assert type(model.deq.solver).__name__.lower().startswith("broyden")
    assert model.deq.solver.options.max_iter == 30
    logits, _ = model(next(iter(task.train_batches(2, generator=torch.Generator().manual_seed(0))))[0])
    assert logits.shape == (2, 12, task.vocab_size)
    user = TextTask.resolve_user_config({"task_config": {"size": "paper"}}, str(tmp_path))
    assert user["teacher"]["train_solver"] == {"name": "broyden", "max_iter": 30, "tol": 1e-3}
    assert TextTask.resolve_user_config({}, str(tmp_path)) == {}
    # in a run the paper's sizes replace the text preset's (64 wide), a user's value still wins
    run = build_config("text", TextTask.resolve_user_config(
        {"task_config": {"size": "paper", "seq_len": 12}}, str(tmp_path)))
    paper = TextConfig.from_dict(run.task_config)
    assert (paper.d_model, paper.n_heads, paper.seq_len) == (410, 10, 12)
