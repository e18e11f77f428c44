"""The language-modelling task: data loading, the causal DEQ-Transformer, training and sampling."""

from __future__ import annotations

import pytest
import torch

from cdeq.engine.config import ConfigError
from cdeq.tasks.base import TASKS
from cdeq.tasks.text import (
    UNK,
    CausalTransformerCell,
    ShakespeareConfig,
    ShakespeareTask,
    TextConfig,
    TextTask,
    find_shakespeare,
    generate,
    load_corpus,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = {"d_model": 16, "n_heads": 2, "mlp_ratio": 2.0, "seq_len": 8, "eval_windows": 4,
        "record_windows": 4, "epoch_windows": 16}


@pytest.fixture
def char_file(tmp_path):
    text = "abcabc abc\nhello world\n" * 40 + "xyz zyx\n" * 3  # x, y, z only in the last 5% (test)
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def wiki_dir(tmp_path):
    folder = tmp_path / "wikitext"
    folder.mkdir()
    train = " = Title = \n\n the cat sat on the mat . \n the dog sat on the log . \n" * 5
    (folder / "wiki.train.tokens").write_text(train, encoding="utf-8")
    (folder / "wiki.valid.tokens").write_text(" the bird sat on the <unk> . \n" * 4, encoding="utf-8")
    (folder / "wiki.test.tokens").write_text(" the cat flew . \n" * 6, encoding="utf-8")
    return folder


def test_registered():
    assert TASKS["text"] is TextTask
    assert TASKS["shakespeare"] is ShakespeareTask
    assert TextTask.metric == "nats_per_char" and TextTask.higher_is_better is False


def test_char_vocabulary_from_train_only(char_file):
    corpus = load_corpus(char_file, level="char")
    assert corpus.vocab[0] == UNK
    for c in "xyz":
        assert c not in corpus.vocab
    test = corpus.splits["test"]
    assert (test == 0).any()  # x, y, z map to <unk>
    assert set(corpus.vocab[1:]) == set(corpus.decode(corpus.splits["train"].tolist()))
    assert corpus.decode(corpus.encode("hello")) == "hello"
    assert corpus.encode("q")[0] == corpus.unk_id


@pytest.mark.parametrize("names", [("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
                                   ("train.txt", "valid.txt", "test.txt")])
def test_word_level_wikitext_layout(tmp_path, wiki_dir, names):
    folder = tmp_path / "layout"
    folder.mkdir()
    for src, dst in zip(("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"), names, strict=True):
        (folder / dst).write_text((wiki_dir / src).read_text())
    corpus = load_corpus(folder, level="word")
    assert set(corpus.splits) == {"train", "valid", "test"}
    assert corpus.vocab[0] == UNK and "<eos>" in corpus.vocab
    assert "bird" not in corpus.vocab and "flew" not in corpus.vocab
    valid = corpus.decode(corpus.splits["valid"].tolist()).split("\n")[0]
    assert valid == "the <unk> sat on the <unk> ."  # unseen "bird" and WikiText's own <unk>
    assert corpus.splits["train"][0].item() == corpus.stoi["="]


def test_word_task_batches_and_test_split(wiki_dir):
    task = TextTask(TextConfig(data=str(wiki_dir), level="word", **TINY))
    assert task.metric == "nats_per_token" and TextTask.metric == "nats_per_char"
    x, y = next(iter(task.test_batches(2)))
    assert x.dtype == torch.long and x.shape == (2, 8) and y.shape == (2, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert task.decode(x[0].tolist()).startswith("the cat <unk> .\nthe cat")


def test_batches_are_windows_of_the_text(char_file):
    task = TextTask(TextConfig(data=str(char_file), **TINY))
    train = task.corpus.splits["train"]
    gen = torch.Generator().manual_seed(3)
    batches = list(task.train_batches(5, generator=gen))
    assert sum(len(x) for x, _ in batches) == 16
    x, y = batches[0]
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = next(iter(task.train_batches(5, generator=torch.Generator().manual_seed(3))))
    assert torch.equal(again[0], x)  # seeded
    # fixed evaluation windows: same every call, contiguous slices of the split
    a = [x for x, _ in task.test_batches(3)]
    b = [x for x, _ in task.test_batches(3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert sum(len(t) for t in a) == 4
    # unshuffled: non-overlapping aligned windows, in order
    xs = torch.cat([x for x, _ in task.train_batches(4, shuffle=False)])
    assert len(xs) == 16
    chunks = train[: (train.numel() - 1) // 8 * 8].long().view(-1, 8)
    assert torch.equal(xs[0], chunks[0])
    assert all(any(torch.equal(c, row) for c in chunks) for row in xs)
    full = TextTask(TextConfig(data=str(char_file), **{**TINY, "eval_windows": 0}))
    n_test = full.corpus.splits["test"].numel()
    assert sum(len(x) for x, _ in full.test_batches(100)) == (n_test - 1) // 8


def test_errors(tmp_path, char_file):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(empty)
    folder = tmp_path / "nofiles"
    folder.mkdir()
    (folder / "train.txt").write_text("a b c\n")
    with pytest.raises(FileNotFoundError, match="valid"):
        load_corpus(folder, level="word")
    (folder / "valid.txt").write_text("a b\n")
    with pytest.raises(FileNotFoundError, match="test"):
        load_corpus(folder, level="word")
    (folder / "test.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(folder, level="word")
    with pytest.raises(ConfigError, match="needs data"):
        TextTask(TextConfig())
    with pytest.raises(ConfigError, match="level"):
        TextConfig(level="byte")
    with pytest.raises(ConfigError, match="unknown key"):
        TextConfig.from_dict({"d_modle": 8})
    with pytest.raises(ConfigError, match="multiple of"):
        TextConfig(d_model=10, n_heads=3)
    with pytest.raises(ConfigError, match="shakespeare"):
        ShakespeareConfig(level="word")
    with pytest.raises(ValueError, match="seq_len"):
        TextTask(TextConfig(data=str(char_file), seq_len=4096))
    with pytest.raises(ConfigError, match="unknown key"):
        TextConfig.from_dict({"eval_split": "valid"})  # the test split is always the test file/part
    with pytest.raises(ConfigError, match="at most 0.9"):
        TextConfig(valid_fraction=0.5, test_fraction=0.45)
    with pytest.raises(ConfigError, match="test_fraction"):
        TextConfig(test_fraction=0.0)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(ValueError, match="UTF-8"):
        load_corpus(latin)


def test_cell_is_causal():
    torch.manual_seed(0)
    task_cfg = dict(TINY)
    cell = CausalTransformerCell(task_cfg["d_model"], task_cfg["n_heads"], 2.0)
    assert cell.channels == 16 and cell.channel_dim == -1
    u = torch.randn(2, 8, 16)
    z = torch.randn(2, 8, 16)
    out = cell(z, u)
    assert out.shape == cell.state_shape(u) == u.shape
    z2, u2 = z.clone(), u.clone()
    z2[:, 5:] += torch.randn(2, 3, 16)
    u2[:, 6] -= torch.randn(2, 16)
    out2 = cell(z2, u2)
    assert torch.allclose(out[:, :5], out2[:, :5], atol=1e-6)
    assert not torch.allclose(out[:, 5:], out2[:, 5:])


def test_fixed_point_is_causal(char_file):
    torch.manual_seed(0)
    task = TextTask(TextConfig(data=str(char_file), **TINY))
    model = task.build_model().eval()
    x, _ = next(iter(task.test_batches(2)))
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % task.vocab_size
    with torch.no_grad():
        z1 = model.deq(model.inject(x))[0]
        z2 = model.deq(model.inject(x2))[0]
    assert torch.allclose(z1[:, :5], z2[:, :5], atol=1e-3)
    assert not torch.allclose(z1[:, 5:], z2[:, 5:], atol=1e-3)


def test_variational_dropout_mask_is_shared(char_file):
    task = TextTask(TextConfig(data=str(char_file), **{**TINY, "dropout": 0.5}))
    model = task.build_model().train()
    x = torch.zeros(3, 8, dtype=torch.long)
    u = model.inject(x)
    dropped = u == 0
    assert dropped.any()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # same mask at every position
    model.eval()
    assert not (model.inject(x) == 0).any()


def test_training_reduces_loss(char_file):
    from cdeq.run.teacher import TeacherConfig, evaluate_model, train_teacher

    torch.manual_seed(0)
    task = TextTask(TextConfig(data=str(char_file), **{**TINY, "epoch_windows": 64}))
    model = task.build_model()

    def valid_nll() -> float:
        with torch.no_grad():
            sums = [task.metric_sum(model(x)[0], y) for x, y in task.selection_batches(8)]
        return sum(s for s, _ in sums) / sum(c for _, c in sums)

    before = valid_nll()
    train_teacher(task, model, TeacherConfig.from_dict(
        {"epochs": 3, "batch_size": 16, "optim": {"lr": 1e-2}, "backward": "jacobian_free"}))
    after = valid_nll()
    assert after < before - 0.5
    result = evaluate_model(task, model)
    assert result["nfe"] >= 1 and result["metric"] > 0
    x, y = next(iter(task.test_batches(4)))
    total, count = task.metric_sum(model(x)[0], y)
    assert count == 4 * 8 and total > 0


def test_generate(char_file):
    torch.manual_seed(0)
    task = TextTask(TextConfig(data=str(char_file), **TINY))
    model = task.build_model().eval()
    prompt = task.encode("hello wor")  # longer than seq_len: only the last 8 are seen
    out = generate(model, prompt, 12, seq_len=8, temperature=0.8, generator=torch.Generator().manual_seed(1))
    assert out.ids.shape == (1, 12) and out.tokens_per_second > 0
    assert out.nfe_per_token is not None and out.nfe_per_token >= 1
    again = generate(model, prompt, 12, seq_len=8, temperature=0.8,
                     generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.ids, again.ids)
    assert isinstance(task.decode(out.ids[0].tolist()), str)
    greedy = generate(lambda ids: model(ids)[0], torch.tensor([prompt[:3]] * 2), 5, seq_len=8,
                      temperature=0)
    assert greedy.ids.shape == (2, 5) and greedy.nfe_per_token is None
    assert torch.equal(greedy.ids[0], greedy.ids[1])
    with pytest.raises(ValueError, match="at least one"):
        generate(model, [], 3, seq_len=8)


def test_quick_preset_and_shakespeare():
    try:
        find_shakespeare()
    except FileNotFoundError:
        pytest.skip("Tiny Shakespeare is not available")
    task = ShakespeareTask(ShakespeareConfig(quick=True))
    assert task.config.d_model == 32 and task.config.seq_len == 32
    assert task.corpus.splits["train"].numel() == 4000
    assert ShakespeareConfig(quick=True, d_model=48).d_model == 48  # explicit values win
    model = task.build_model()
    x, y = next(iter(task.train_batches(4, generator=torch.Generator().manual_seed(0))))
    logits, _ = model(x)
    assert logits.shape == (4, 32, task.vocab_size)
    assert task.describe()["vocab_size"] == task.vocab_size


@pytest.mark.parametrize("quick", [False, True])
def test_run_defaults_are_valid(quick):
    pipeline = pytest.importorskip("cdeq.run.stages")
    config = pipeline.build_config("shakespeare", {}, quick=quick)
    assert config.teacher.backward == "jacobian_free"
    assert config.teacher.train_solver.name == "anderson"
    task_config = ShakespeareConfig.from_dict(config.task_config)
    assert task_config.quick is quick
    if not quick:  # the documented teacher: at most 60 epochs of 4,000 windows (125 steps of 32),
        # stopped at its validation plateau (gains below 0.005 nats/char do not count); 64 wide
        assert config.teacher.epochs == 60 and config.teacher.patience > 0
        assert config.teacher.min_delta == 0.005
        assert task_config.epoch_windows // config.teacher.batch_size == 125
        assert task_config.d_model == 64


def test_single_file_splits_in_three(char_file):
    """One file: train / valid / test by position (90% / 5% / 5%), disjoint, nothing lost."""
    text = char_file.read_text(encoding="utf-8")
    task = TextTask(TextConfig(data=str(char_file), **TINY))
    sizes = task.split_sizes()
    cut1, cut2 = int(len(text) * 0.9), int(len(text) * 0.95)
    assert sizes == {"train": cut1, "valid": cut2 - cut1, "test": len(text) - cut2}
    corpus = task.corpus
    for name, part in (("train", text[:cut1]), ("valid", text[cut1:cut2]), ("test", text[cut2:])):
        assert corpus.splits[name].tolist() == corpus.encode(part)
    other = TextTask(TextConfig(data=str(char_file), valid_fraction=0.1, test_fraction=0.2, **TINY))
    assert other.split_sizes()["test"] == len(text) - int(len(text) * 0.8)


def test_single_file_word_cuts_at_lines(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("".join(f"line {i} of words\n" for i in range(100)), encoding="utf-8")
    corpus = load_corpus(path, level="word")
    for name in ("train", "valid", "test"):
        decoded = corpus.decode(corpus.splits[name].tolist())
        assert decoded.startswith("line ") and decoded.endswith("words\n")  # whole lines only
    total = sum(int(v.numel()) for v in corpus.splits.values())
    assert total == 100 * 5  # 4 words and <eos> per line


def test_folder_splits_are_kept_apart(wiki_dir, monkeypatch):
    task = TextTask(TextConfig(data=str(wiki_dir), level="word", **TINY))
    corpus = task.corpus
    for name, file in (("valid", "wiki.valid.tokens"), ("test", "wiki.test.tokens")):
        lines = (wiki_dir / file).read_text().splitlines()
        expected = [corpus.stoi.get(w, 0) for line in lines for w in (*line.split(), "<eos>")]
        assert corpus.splits[name].tolist() == expected  # exactly that file's words
    assert task.split_sizes() == {k: int(v.numel()) for k, v in corpus.splits.items()}
    x_test, _ = next(iter(task.test_batches(1)))
    x_valid, _ = next(iter(task.validation_batches(1)))
    assert task.decode(x_test[0].tolist()).startswith("the cat <unk> .")  # the test file
    assert task.decode(x_valid[0].tolist()).startswith("the <unk> sat on")  # the valid file

    def no_test(*args, **kwargs):
        raise AssertionError("selection touched the test split")

    monkeypatch.setattr(task, "test_batches", no_test)
    selected = [x for x, _ in task.selection_batches(2)]
    assert selected and all(torch.equal(a, b) for a, b in zip(
        selected, [x for x, _ in task.validation_batches(2)], strict=True))


def test_model_solvers_come_from_the_configuration(char_file):
    """The built model's solvers are the run configuration's (quick: eval max_iter 30, not 60)."""
    pipeline = pytest.importorskip("cdeq.run.stages")
    for quick in (True, False):
        config = pipeline.build_config("text", {"task_config": {"data": str(char_file), **TINY}},
                                       quick=quick)
        task = TextTask(TextConfig.from_dict(config.task_config))
        deq = task.build_model().deq
        for solver, spec in ((deq.solver, config.teacher.train_solver),
                             (deq.eval_solver, config.teacher.eval_solver)):
            assert type(solver).__name__.lower() == spec.name
            assert (solver.options.max_iter, solver.options.tol) == (spec.max_iter, spec.tol)
    quick_task = TextTask(TextConfig(data=str(char_file), quick=True))
    assert quick_task.build_model().deq.eval_solver.options.max_iter == 30
