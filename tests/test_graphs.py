"""Graph tasks: readers, normalisation, the IGNN cell's contraction, splits, perturbations, training."""

from __future__ import annotations

import pickle

import pytest
import torch

import cdeq
from cdeq.engine.config import ConfigError
from cdeq.run.teacher import TeacherConfig, train_teacher
from cdeq.solvers.base import take_rows
from cdeq.tasks.base import TASKS
from cdeq.tasks.datadir import data_dir
from cdeq.tasks.graphs import (
    CoraTask,
    FacebookTask,
    Graph,
    GraphDataError,
    IGNNCell,
    PlanetoidTask,
    constrain_inf_norm,
    graph_batch,
    load_planetoid,
    load_saved_graph,
    normalized_adjacency,
    perturb_graph,
    random_split,
)

PLANETOID = data_dir() / "planetoid"
FACEBOOK = data_dir() / "facebook"
needs_cora = pytest.mark.skipif(not (PLANETOID / "Cora" / "raw" / "ind.cora.x").is_file(),
                                reason="shared Cora files not found")


def small_graph(n: int = 12, seed: int = 0) -> Graph:
    """A random graph whose features are the one-hot node ids (so subgraphs can be traced)."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (3 * n,), generator=gen)
    dst = torch.randint(0, n, (3 * n,), generator=gen)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    key = torch.unique(torch.cat([src * n + dst, dst * n + src]))
    edge_index = torch.stack([key // n, key % n])
    ids = torch.arange(n)
    test = ids % 3 == 0
    return Graph(features=torch.eye(n).to_sparse(), edge_index=edge_index,
                 labels=ids % 2, train_mask=ids % 3 == 1, val_mask=ids % 3 == 2, test_mask=test,
                 num_classes=2, name="toy")


@pytest.fixture(scope="module")
def cora() -> Graph:
    return load_planetoid(PLANETOID, "cora")


@pytest.fixture
def one_thread():
    """Sparse products on a shared 2-core machine run several times faster on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- data ------------------------------------------------------------------------------------
@needs_cora
def test_cora_reader_matches_planetoid(cora):
    assert (cora.num_nodes, cora.num_features, cora.num_classes) == (2708, 1433, 7)
    sizes = (int(cora.train_mask.sum()), int(cora.val_mask.sum()), int(cora.test_mask.sum()))
    assert sizes == (140, 500, 1000)
    assert cora.train_mask[:140].all() and cora.val_mask[140:640].all()
    assert not (cora.train_mask & cora.test_mask).any() and not (cora.val_mask & cora.test_mask).any()
    assert cora.num_edges == 10556  # torch_geometric's count (both directions)
    assert cora.features._nnz() == 49216
    assert torch.bincount(cora.labels).tolist() == [351, 217, 418, 818, 426, 298, 180]


def test_adjacency_is_symmetric_normalised_with_self_loops():
    g = small_graph()
    adj = normalized_adjacency(g.edge_index, g.num_nodes).to_dense()
    dense = torch.zeros(g.num_nodes, g.num_nodes)
    dense[g.edge_index[0], g.edge_index[1]] = 1.0
    dense += torch.eye(g.num_nodes)
    deg = dense.sum(1)
    expected = dense / deg.sqrt()[:, None] / deg.sqrt()[None, :]
    torch.testing.assert_close(adj, expected)
    torch.testing.assert_close(adj, adj.t())
    assert (adj.diagonal() > 0).all()
    assert abs(torch.linalg.eigvalsh(adj).max().item() - 1.0) < 1e-5  # lambda_pf(A) = 1


def test_features_row_normalised_and_batch_layout():
    g = small_graph()
    (feats, adj), (labels, mask) = graph_batch(g, g.train_mask)
    assert feats.layout == torch.sparse_coo and adj.layout == torch.sparse_coo
    torch.testing.assert_close(feats.to_dense().sum(1), torch.ones(g.num_nodes))
    assert torch.equal(mask, g.train_mask) and torch.equal(labels, g.labels)


def test_batches_survive_trajectory_storage():
    from cdeq.engine.io import flatten, unflatten

    torch.manual_seed(0)
    g = small_graph(25)
    x, y = graph_batch(g, g.train_mask)
    tensors: dict = {}
    spec = flatten((x, y), "b", tensors)
    x2, y2 = unflatten(spec, tensors)
    task = CoraTask(CoraTask.Config(hidden=8))
    task._graph = g
    model = task.build_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(x2)[0])
    assert torch.equal(y2[1], y[1])


# --- the cell ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["scale", "project"])
def test_w_constraint_bounds_the_inf_norm(mode):
    torch.manual_seed(0)
    v = 10 * torch.randn(16, 16)
    w = constrain_inf_norm(v, 0.8, mode)
    assert w.abs().sum(1).max() <= 0.8 + 1e-5
    small = 0.01 * torch.randn(16, 16)
    torch.testing.assert_close(constrain_inf_norm(small, 0.8, mode), small)  # inside: unchanged
    if mode == "project":  # the Euclidean projection: rows land on the l1 sphere, no closer point
        torch.testing.assert_close(w.abs().sum(1), torch.full((16,), 0.8))
        other = constrain_inf_norm(v, 0.8, "scale")
        assert ((w - v).norm(dim=1) <= (other - v).norm(dim=1) + 1e-5).all()
    with pytest.raises(ValueError, match="w_constraint"):
        constrain_inf_norm(v, 0.8, "clip")


@pytest.mark.parametrize("mode", ["scale", "project"])
def test_cell_is_contractive_and_picard_converges(mode):
    torch.manual_seed(0)
    g = small_graph(40)
    (_, adj), _ = graph_batch(g, g.train_mask)
    cell = IGNNCell(8, kappa=0.9, constraint=mode, activation="relu")
    with torch.no_grad():
        cell.weight_raw.mul_(50)  # far outside the ball: the parametrisation must pull it in
    assert cell.weight.abs().sum(1).max() <= 0.9 + 1e-5
    u = (torch.randn(1, 40, 8), adj)
    # Lipschitz bound in the max-norm: |f(z1) - f(z2)|_max <= kappa |z1 - z2|_max
    for _ in range(5):
        z1, z2 = torch.randn(1, 40, 8), torch.randn(1, 40, 8)
        ratio = (cell(z1, u) - cell(z2, u)).abs().max() / (z1 - z2).abs().max()
        assert ratio <= 0.9 + 1e-5
    res = cdeq.get_solver("picard", max_iter=300, tol=1e-6).solve(cell, torch.zeros(1, 40, 8), u)
    assert bool(res.converged.all())
    torch.testing.assert_close(cell(res.z, u), res.z, atol=1e-4, rtol=1e-4)


def test_batch_of_one_graph_survives_row_selection():
    g = small_graph()
    task_u = (torch.randn(1, g.num_nodes, 4), normalized_adjacency(g.edge_index, g.num_nodes))
    picked = take_rows(task_u, torch.tensor([0]), 1)
    assert picked[1] is task_u[1] and torch.equal(picked[0], task_u[0])
    with pytest.raises(GraphDataError, match="at least 2"):
        Graph(torch.ones(1, 3).to_sparse(), torch.zeros(2, 0, dtype=torch.long),
              torch.zeros(1, dtype=torch.long), *(torch.ones(1, dtype=torch.bool),) * 3, num_classes=1)


def test_injection_dropout_only_while_trainable():
    from cdeq.tasks.graphs import GraphInjection

    g = small_graph(20)
    x, _ = graph_batch(g, g.train_mask)
    inj = GraphInjection(g.num_features, 8, dropout=0.5).train()
    assert not torch.equal(inj(x)[0], inj(x)[0])  # dropout on the features
    inj.weight.requires_grad_(False)  # frozen (a student reusing the teacher's injection)
    ref = inj.eval()(x)[0]
    assert torch.equal(inj.train()(x)[0], ref)


def test_implicit_gradient_matches_unrolled(one_thread):
    torch.manual_seed(0)
    g = small_graph(30)
    (feats, adj), _ = graph_batch(g, g.train_mask)
    cell = IGNNCell(6, kappa=0.7)
    inj = torch.randn(1, 30, 6)
    target = torch.randn(1, 30, 6)
    deq = cdeq.DEQ(cell, solver={"name": "anderson", "max_iter": 60, "tol": 1e-8},
                   backward={"name": "implicit", "max_iter": 100, "tol": 1e-9})
    z, _ = deq((inj, adj))
    ((z - target) ** 2).sum().backward()
    implicit = cell.weight_raw.grad.clone()
    cell.weight_raw.grad = None
    z = torch.zeros(1, 30, 6)
    for _ in range(120):
        z = cell(z, (inj, adj))
    ((z - target) ** 2).sum().backward()
    torch.testing.assert_close(implicit, cell.weight_raw.grad, atol=1e-4, rtol=1e-3)


# --- splits and record batches ----------------------------------------------------------------
def test_subgraph_keeps_only_chosen_nodes_and_their_edges():
    g = small_graph(20)
    sub = g.subgraph(~g.test_mask)
    original = sub.features.to_dense().argmax(1)  # one-hot features trace the original ids
    assert not g.test_mask[original].any() and not sub.test_mask.any()
    src, dst = original[sub.edge_index[0]], original[sub.edge_index[1]]
    full = set(zip(g.edge_index[0].tolist(), g.edge_index[1].tolist(), strict=True))
    assert set(zip(src.tolist(), dst.tolist(), strict=True)) == {
        (a, b) for a, b in full if not g.test_mask[a] and not g.test_mask[b]}


@needs_cora
def test_inductive_training_graph_has_no_test_node(cora):
    task = CoraTask(CoraTask.Config(setting="inductive", steps_per_epoch=2, record_copies=3))
    task._graph = cora
    tg = task.train_graph
    assert tg.num_nodes == 2708 - 1000 and not tg.test_mask.any()
    assert int(tg.train_mask.sum()) == 140 and int(tg.val_mask.sum()) == 500
    non_test = ~cora.test_mask
    kept_edges = int((non_test[cora.edge_index[0]] & non_test[cora.edge_index[1]]).sum())
    assert tg.num_edges == kept_edges
    for batches in (task.train_batches(1), task.record_batches(1), task.selection_batches(1)):
        for (feats, adj), (labels, _) in batches:
            assert adj.shape[0] <= 1708 and feats.shape[0] == adj.shape[0] == labels.shape[0]
    (feats, adj), (labels, mask) = next(iter(task.test_batches(1)))
    assert adj.shape == (2708, 2708) and torch.equal(mask, cora.test_mask)
    assert len(list(task.train_batches(1))) == 2


@needs_cora
def test_transductive_batches_and_selection_never_use_test_mask(cora):
    task = CoraTask(CoraTask.Config(steps_per_epoch=1, record_copies=2))
    task._graph = cora
    (_, adj), (_, mask) = next(iter(task.train_batches(1)))
    assert adj.shape == (2708, 2708) and torch.equal(mask, cora.train_mask)
    (_, _), (_, sel) = next(iter(task.selection_batches(1)))
    assert torch.equal(sel, cora.val_mask)
    (_, _), (_, val) = next(iter(task.validation_batches(1)))
    assert torch.equal(val, cora.val_mask)


@needs_cora
@pytest.mark.parametrize("setting", ["transductive", "inductive"])
def test_split_sizes_are_the_disjoint_masks(cora, setting):
    task = CoraTask(CoraTask.Config(setting=setting))
    task._graph = cora
    assert task.split_sizes() == {"train": 140, "valid": 500, "test": 1000}
    masks = [cora.train_mask, cora.val_mask, cora.test_mask]
    assert all(not (a & b).any() for i, a in enumerate(masks) for b in masks[i + 1:])


def test_random_split_is_seeded_disjoint_and_sized():
    masks = random_split(200, seed=3, train_frac=0.1, val_frac=0.2)
    assert [int(m.sum()) for m in masks] == [20, 40, 140]
    assert int(sum(m.long() for m in masks).max()) == 1  # every node in exactly one split
    assert all(torch.equal(a, b) for a, b in zip(masks, random_split(200, seed=3, train_frac=0.1,
                                                                     val_frac=0.2), strict=True))
    assert not torch.equal(masks[2], random_split(200, seed=4, train_frac=0.1, val_frac=0.2)[2])


def test_graph_runs_both_settings_unless_one_is_given():
    assert [name for name, _ in CoraTask.variants({})] == ["transductive", "inductive"]
    (_, user), = [v for v in FacebookTask.variants({"teacher": {"epochs": 1}}) if v[0] == "inductive"]
    assert user == {"teacher": {"epochs": 1}, "task_config": {"setting": "inductive"}}
    given = {"task_config": {"setting": "inductive", "hidden": 8}}
    assert CoraTask.variants(given) == [(None, given)]


@needs_cora
def test_planetoid_reader_matches_torch_geometric(cora, tmp_path):
    """Optional parity check: the same arrays as torch_geometric's Planetoid on Cora."""
    datasets = pytest.importorskip("torch_geometric.datasets")
    import shutil

    shutil.copytree(PLANETOID / "Cora" / "raw", tmp_path / "Cora" / "raw")  # PyG writes processed/
    data = datasets.Planetoid(str(tmp_path), "Cora")[0]
    assert torch.equal(cora.features.to_dense(), data.x)
    assert torch.equal(cora.labels, data.y)
    for ours, theirs in ((cora.train_mask, data.train_mask), (cora.val_mask, data.val_mask),
                         (cora.test_mask, data.test_mask)):
        assert torch.equal(ours, theirs)
    pairs = set(zip(*data.edge_index.tolist(), strict=True))
    assert set(zip(*cora.edge_index.tolist(), strict=True)) == {(a, b) for a, b in pairs if a != b}


def test_record_batches_are_distinct_perturbations():
    g = small_graph(60)
    task = CoraTask(CoraTask.Config(record_copies=4, record_node_keep=0.8, record_edge_drop=0.2,
                                    record_feature_drop=0.0))
    task._graph = g
    batches = list(task.record_batches(1))
    assert len(batches) == 4
    (f0, a0), _ = batches[0]
    (ft, at), _ = next(iter(task.train_batches(1)))
    assert torch.equal(a0.to_dense(), at.to_dense())  # the first copy is the training graph
    dense = [a.to_dense() for (_, a), _ in batches]
    for i in range(4):
        for j in range(i + 1, 4):
            assert dense[i].shape != dense[j].shape or not torch.equal(dense[i], dense[j])
    again = [a.to_dense() for (_, a), _ in task.record_batches(1)]
    assert all(torch.equal(a, b) for a, b in zip(dense, again, strict=True))  # seeded


def test_feature_and_edge_dropout():
    g = small_graph(50)
    gen = torch.Generator().manual_seed(0)
    p = perturb_graph(g, gen, node_keep=1.0, edge_drop=0.5, feature_drop=0.5)
    assert p.num_nodes == g.num_nodes
    assert 0 < p.num_edges < g.num_edges and p.features._nnz() < g.features._nnz()
    src, dst = p.edge_index  # still undirected
    edges = set(zip(src.tolist(), dst.tolist(), strict=True))
    assert edges == {(b, a) for a, b in edges}


# --- configuration and errors -----------------------------------------------------------------
def test_tasks_are_registered_and_configs_are_strict():
    assert TASKS["cora"] is CoraTask and TASKS["facebook"] is FacebookTask
    assert TASKS["planetoid"] is PlanetoidTask
    with pytest.raises(ConfigError, match="setting"):
        CoraTask.Config.from_dict({"setting": "semi"})
    with pytest.raises(ConfigError, match="unknown key"):
        CoraTask.Config.from_dict({"hiden": 8})
    with pytest.raises(ConfigError, match="kappa"):
        CoraTask.Config.from_dict({"kappa": 1.0})
    with pytest.raises(ConfigError, match="needs data"):
        PlanetoidTask.Config.from_dict({"name": "cora"})
    with pytest.raises(ConfigError, match="train_frac"):
        FacebookTask.Config.from_dict({"train_frac": 0.6, "val_frac": 0.5})


def test_missing_and_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(GraphDataError, match="does not exist"):
        _ = CoraTask(CoraTask.Config(data=str(tmp_path / "nowhere"))).graph
    with pytest.raises(GraphDataError, match="no Planetoid files"):
        load_planetoid(tmp_path, "cora")
    with pytest.raises(GraphDataError, match="edges.csv"):
        _ = FacebookTask(FacebookTask.Config(data=str(tmp_path))).graph
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ind.toy.x").write_bytes(b"not a pickle")
    with pytest.raises(GraphDataError, match="not a readable Planetoid pickle"):
        load_planetoid(tmp_path, "toy")
    (raw / "ind.toy.x").write_bytes(pickle.dumps(print))  # a pickle naming a callable is refused
    with pytest.raises(GraphDataError, match="refusing"):
        load_planetoid(tmp_path, "toy")
    bad = tmp_path / "graph.pt"
    torch.save({"x": torch.ones(3, 2)}, bad)
    with pytest.raises(GraphDataError, match="lacks"):
        load_saved_graph(bad)


def test_saved_graph_round_trip(tmp_path):
    g = small_graph(30)
    path = tmp_path / "mine.pt"
    torch.save({"x": g.features.to_dense(), "edge_index": g.edge_index, "y": g.labels,
                "train_mask": g.train_mask, "val_mask": g.val_mask, "test_mask": g.test_mask}, path)
    task = PlanetoidTask(PlanetoidTask.Config(data=str(path), setting="inductive"))
    loaded = task.graph
    assert loaded.num_nodes == 30 and torch.equal(loaded.test_mask, g.test_mask)
    assert loaded.num_edges == g.num_edges
    assert task.train_graph.num_nodes == int((~g.test_mask).sum())


# --- training ---------------------------------------------------------------------------------
@needs_cora
def test_a_few_steps_raise_cora_training_accuracy(cora, one_thread):
    torch.manual_seed(0)
    task = CoraTask(CoraTask.Config(hidden=16, steps_per_epoch=15, input_dropout=0.2, head_dropout=0.2))
    task._graph = cora
    model = task.build_model()

    def train_accuracy() -> float:
        model.eval()
        with torch.no_grad():
            (x, y), = list(task.train_batches(1))[:1]
            logits, _ = model(x)
        correct, count = task.metric_sum(logits, y)
        return correct / count

    before = train_accuracy()
    config = TeacherConfig.from_dict({"optim": {"lr": 0.02, "weight_decay": 0.0}}, epochs=1,
                                     train_solver=cdeq.SolverSpec(name="anderson", max_iter=15, tol=1e-3))
    history = train_teacher(task, model, config)
    after = train_accuracy()
    assert after > before + 0.3, (before, after)
    assert history["loss"][0] < 2.0
