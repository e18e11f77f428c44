"""Large graphs: OGB's node-property layout parsed once into a memory-mapped store (bad files named),
the CSR neighbour sampler, the full-graph fixed point in node chunks, and the ``ogbn`` task run on
sampled subgraphs."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from cdeq.cli import main
from cdeq.solvers import get_solver
from cdeq.tasks.graphs import NeighbourSampler, OgbnConfig, OgbnTask, load_ogb
from cdeq.tasks.graphs.data import clean_edges, normalized_adjacency
from cdeq.tasks.graphs.full import full_fixed_point
from cdeq.tasks.graphs.store import StoreWriter, build_csr


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CDEQ_CACHE", str(tmp_path / "cache"))


def toy_graph(n=120, classes=3, features=6, seed=0):
    """A planted-partition graph: 80% of edges inside a class, features = class signal + noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    src = rng.integers(0, n, 4 * n)
    same = rng.random(4 * n) < 0.8
    dst = np.where(same, -1, rng.integers(0, n, 4 * n))
    for i in np.flatnonzero(same):
        dst[i] = rng.choice(np.flatnonzero(labels == labels[src[i]]))
    feats = rng.normal(size=(n, features)).astype(np.float32) + np.eye(classes, features)[labels]
    perm = rng.permutation(n)
    splits = {"train": perm[: n // 2], "valid": perm[n // 2 : 3 * n // 4], "test": perm[3 * n // 4 :]}
    return np.stack([src, dst], 1), feats, labels, splits


def write_ogb(root, edges, feats, labels, splits, gz=True, split_name="random"):
    ext = ".csv.gz" if gz else ".csv"
    opener = gzip.open if gz else open

    def write(path, lines):
        path.parent.mkdir(parents=True, exist_ok=True)
        with opener(path, "wt") as fh:
            fh.write("".join(line + "\n" for line in lines))

    raw = root / "raw"
    write(raw / f"num-node-list{ext}", [str(len(feats))])
    write(raw / f"num-edge-list{ext}", [str(len(edges))])
    write(raw / f"edge{ext}", [f"{a},{b}" for a, b in edges])
    write(raw / f"node-feat{ext}", [",".join(f"{v:.6f}" for v in row) for row in feats])
    write(raw / f"node-label{ext}", [str(v) for v in labels])
    for name, ids in splits.items():
        write(root / "split" / split_name / f"{name}{ext}", [str(i) for i in ids])
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_the_store_holds_the_graph_as_read(tmp_path, gz):
    edges, feats, labels, splits = toy_graph()
    edges = np.concatenate([edges, [[5, 5], [7, 9], [9, 7]]])  # a self loop and a duplicate pair
    store = load_ogb(write_ogb(tmp_path / "g", edges, feats, labels, splits, gz=gz))
    n = len(labels)
    clean = clean_edges(torch.from_numpy(edges.T.copy()), n)  # the in-memory reader's symmetrised edges
    rows = np.repeat(np.arange(n), np.diff(store.indptr))
    assert np.array_equal(np.stack([rows, np.asarray(store.indices)]), clean.numpy())
    assert np.allclose(store.features, feats, atol=1e-6) and np.array_equal(store.labels, labels)
    for s in ("train", "valid", "test"):
        assert np.array_equal(store.splits[s], splits[s])
    assert store.num_classes == 3 and store.nnz == clean.shape[1]
    assert isinstance(store.features, np.memmap)
    again = load_ogb(tmp_path / "g")  # parsed once: the second load opens the same store
    assert again.folder == store.folder and len(list((tmp_path / "cache" / "graphs").iterdir())) == 1


def test_csr_in_small_blocks_equals_one_block(tmp_path):
    rng = np.random.default_rng(1)
    edges = rng.integers(0, 50, (400, 2))
    out = {}
    for block in (7, 10**6):
        with StoreWriter(tmp_path / f"b{block}") as w:
            chunks = lambda: iter(np.array_split(edges, 9))  # noqa: E731
            nnz = build_csr(chunks, 50, w, block=block)
            out[block] = (np.fromfile(w.path("indptr"), np.int64), np.fromfile(w.path("indices"), np.int32),
                          nnz)
            w.abort()
    assert all(np.array_equal(a, b) for a, b in zip(out[7][:2], out[10**6][:2], strict=True))
    assert out[7][2] == clean_edges(torch.from_numpy(edges.T.copy()), 50).shape[1]


BAD = {
    "edge_out_of_range": ("raw/edge.csv.gz", "outside [0, 120)"),
    "edge_count": ("raw/edge.csv.gz", "edges but"),
    "label_length": ("raw/node-label.csv.gz", "same length"),
    "split_out_of_range": ("split/random/test.csv.gz", "outside [0, 120)"),
    "not_numbers": ("raw/node-feat.csv.gz", "not rows of numbers"),
    "overlapping_splits": ("split/random/valid.csv.gz", "disjoint"),
}


@pytest.mark.parametrize("damage", sorted(BAD))
def test_bad_ogb_files_give_rc_2_naming_the_file_and_write_nothing(tmp_path, capsys, damage):
    edges, feats, labels, splits = toy_graph()
    if damage == "edge_out_of_range":
        edges[17, 1] = 120
    elif damage == "label_length":
        labels = labels[:-1]
    elif damage == "split_out_of_range":
        splits["test"] = np.r_[splits["test"], 500]
    elif damage == "overlapping_splits":
        splits["valid"] = np.r_[splits["valid"], splits["train"][0]]
    root = write_ogb(tmp_path / "g", edges, feats, labels, splits)
    if damage == "edge_count":
        with gzip.open(root / "raw" / "num-edge-list.csv.gz", "wt") as fh:
            fh.write("9999\n")
    elif damage == "not_numbers":
        with gzip.open(root / "raw" / "node-feat.csv.gz", "rt") as fh:
            text = fh.read().replace("0.", "x.", 1)
        with gzip.open(root / "raw" / "node-feat.csv.gz", "wt") as fh:
            fh.write(text)
    if damage == "label_length":  # the node count and the features stay at 120
        pass
    out = tmp_path / "run"
    assert main(["run", "ogbn", "--quick", "--data", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    name, message = BAD[damage]
    assert str(root / name) in err and message in err and "Traceback" not in err
    assert not out.exists()
    cache = tmp_path / "cache" / "graphs"
    assert not cache.exists() or not any(cache.iterdir())  # no half-written store


def test_several_split_folders_need_a_name(tmp_path, capsys):
    edges, feats, labels, splits = toy_graph()
    root = write_ogb(tmp_path / "g", edges, feats, labels, splits)
    write_ogb(tmp_path / "g", edges, feats, labels, splits, split_name="time")
    assert main(["run", "ogbn", "--quick", "--data", str(root), "--out", str(tmp_path / "run")]) == 2
    assert "several splits ['random', 'time']" in capsys.readouterr().err
    store = load_ogb(root, split="time")
    assert np.array_equal(store.splits["train"], splits["train"])


def test_the_sampler_draws_from_the_neighbourhood_and_induces_the_subgraph(tmp_path):
    edges, feats, labels, splits = toy_graph()
    store = load_ogb(write_ogb(tmp_path / "g", edges, feats, labels, splits))
    seeds = np.array([3, 50, 77])
    sampler = NeighbourSampler(store, (4, 3), norm="full")
    nodes = sampler.sample_nodes(seeds, np.random.default_rng(0))
    assert np.array_equal(nodes[:3], seeds) and len(np.unique(nodes)) == len(nodes)
    hop1 = set(np.concatenate([store.neighbours(s) for s in seeds]).tolist())
    hop2 = set(np.concatenate([store.neighbours(v) for v in hop1]).tolist()) | hop1
    assert set(nodes[3:].tolist()) <= hop2  # nothing beyond two hops
    (x, adj), (y, mask) = sampler.build(nodes, 3)
    assert torch.equal(x, torch.from_numpy(np.asarray(store.features)[nodes]))
    assert torch.equal(y, torch.from_numpy(labels[nodes]))
    assert mask.tolist() == [True] * 3 + [False] * (len(nodes) - 3)
    dense = adj.to_dense()
    assert torch.allclose(dense, dense.t())
    full = normalized_adjacency(torch.from_numpy(np.stack([np.repeat(np.arange(120), np.diff(store.indptr)),
                                                           np.asarray(store.indices)])).long(), 120)
    block = full.to_dense()[nodes][:, nodes]
    assert torch.allclose(dense, block)  # norm="full": the batch's block of the full adjacency
    sub = NeighbourSampler(store, (4, 3), norm="sub").build(nodes, 3)[0][1].to_dense()
    assert torch.allclose(sub.sum(1) > 0, torch.ones(len(nodes), dtype=torch.bool))
    assert not torch.allclose(sub, dense)


def test_full_fixed_point_in_chunks_equals_the_dense_solve(tmp_path):
    edges, feats, labels, splits = toy_graph()
    root = write_ogb(tmp_path / "g", edges, feats, labels, splits)
    task = OgbnTask(OgbnConfig(data=str(root), hidden=8, gap_chunk=17))
    model = task.build_model().eval()
    z, info = full_fixed_point(model, task.store, chunk=17, tol=1e-6)
    store = task.store
    everything = NeighbourSampler(store, ())  # the whole graph as one batch: its degrees are the full ones
    x, _ = everything.build(np.arange(120), 120)
    u = model.inject(x)
    ref = get_solver("anderson", max_iter=200, tol=1e-8).solve(model.cell, model.initial_state(u), u).z[0]
    assert info["residual"] < 1e-6
    assert torch.allclose(z, ref, atol=1e-4)


def test_a_quick_ogbn_run_reports_the_distance_to_the_full_graph(tmp_path):
    edges, feats, labels, splits = toy_graph(n=300)
    root = write_ogb(tmp_path / "g", edges, feats, labels, splits)
    out = tmp_path / "run"
    assert main(["run", "ogbn", "--quick", "--data", str(root), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    gap = report["data"]["subgraph_gap"]
    assert gap["valid"]["seeds"] == 64 and 0 <= gap["valid"]["relative_error"] < 1
    assert gap["full_solve"]["residual"] < 1e-4
    assert report["splits"] == {"train": 150, "valid": 75, "test": 75}
    assert set(report["methods"]) >= {"cdeq", "picard"}


def test_fixed_batches_repeat_and_training_batches_follow_the_generator(tmp_path):
    edges, feats, labels, splits = toy_graph()
    task = OgbnTask(OgbnConfig(data=str(write_ogb(tmp_path / "g", edges, feats, labels, splits)),
                               batch_nodes=16, eval_nodes=20))
    first, again = list(task.validation_batches(1)), list(task.validation_batches(1))
    assert len(first) == 2  # 30 validation nodes, 20 seeds a batch
    for (xa, ya), (xb, yb) in zip(first, again, strict=True):
        assert torch.equal(xa[0], xb[0]) and torch.equal(ya[1], yb[1])
    a = list(task.train_batches(1, generator=torch.Generator().manual_seed(1)))
    b = list(task.train_batches(1, generator=torch.Generator().manual_seed(1)))
    assert len(a) == 4 and all(torch.equal(p[0][0], q[0][0]) for p, q in zip(a, b, strict=True))
    seeds = torch.cat([y[0][y[1]] for _, y in a])
    assert len(seeds) == 60  # every training node once an epoch


def test_paper_size_is_one_key(tmp_path):
    edges, feats, labels, splits = toy_graph()
    root = str(write_ogb(tmp_path / "g", edges, feats, labels, splits))
    cfg = OgbnConfig(data=root, size="paper")
    assert cfg.hidden == 128 and cfg.fanouts == (15, 10)
    assert OgbnConfig(data=root, size="paper", hidden=32).hidden == 32  # a given value wins
    user = OgbnTask.resolve_user_config({"task_config": {"size": "paper"}}, root)
    assert user["teacher"]["epochs"] == 20
    assert user["task_config"]["batch_nodes"] == 4096  # over the task preset's, in a run too
    task = OgbnTask(cfg)
    assert task.build_model().deq.solver.options.max_iter == 30  # the paper's training solver
    (x, y) = next(iter(task.train_batches(1, generator=torch.Generator().manual_seed(0))))
    logits, _ = task.build_model()(x)
    assert logits.shape == (1, x[0].shape[0], 3)


def test_a_store_folder_is_read_directly(tmp_path):
    edges, feats, labels, splits = toy_graph()
    store = load_ogb(write_ogb(tmp_path / "g", edges, feats, labels, splits))
    task = OgbnTask(OgbnConfig(data=str(store.folder)))
    assert task.store.folder == store.folder and task.split_sizes() == {"train": 60, "valid": 30, "test": 30}
