"""Trajectory sources beyond the shards: per-sample arrays on disk (the lean stored mode), the
online source (``z*`` once, iterates regenerated), a user's dict batches, and resumed recordings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_consistency import tiny_problem
from torch.utils import _pytree as pytree

import cdeq
from cdeq.consistency import ConsistencyStudent, DistillConfig, RecordConfig, distill, record
from cdeq.consistency.arrays import TrajectoryArrays
from cdeq.consistency.online import record_arrays, regenerate
from cdeq.engine.batches import TensorItems, pairs
from cdeq.engine.fit import LayerCalls


def _config(**kw):
    return RecordConfig.from_dict({"solver": {"max_iter": 12, "tol": 0.0}, "batch_size": 16, **kw})


def test_dict_batches_are_read_through_an_explicit_key_map():
    """A Hugging Face style loader of dicts records like (x, y) pairs once its keys are named;
    unnamed, the error lists the batch's keys and the way to name them."""
    model, x, y = tiny_problem(n=32)
    loader = [{"features": x[i : i + 16], "label": y[i : i + 16]} for i in (0, 16)]
    cfg = _config()
    want = record(model, [(x[i : i + 16], y[i : i + 16]) for i in (0, 16)], cfg)
    got = record(model, pairs(loader, inputs="features", targets="label"), cfg)
    assert all(torch.equal(a.z_star, b.z_star) and torch.equal(a.y, b.y)
               for a, b in zip(want, got, strict=True))
    with pytest.raises(TypeError, match=r"dict batch \(keys \['features', 'label'\]\).*cdeq.pairs"):
        record(model, loader, cfg)
    with pytest.raises(KeyError, match="its keys are"):
        list(pairs(loader, inputs="pixels", targets="label"))
    assert cdeq.pairs is pairs and cdeq.TrajectoryArrays is TrajectoryArrays


def test_stored_arrays_hold_the_recorded_iterates_and_their_checksums(tmp_path):
    """Every iterate kept (float32) equals the shards' recording; the inputs are kept by index;
    a flipped byte is found by verify(); minibatches mix shards and cover every sample once."""
    model, x, y = tiny_problem(n=64)
    cfg = _config()
    shards = record(model, [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)], cfg)
    store = record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(tmp_path / "t"))
    again = TrajectoryArrays(tmp_path / "t", items=TensorItems(x, y))
    assert again.samples == 64 and len(again) == 4 and again.keep == len(cfg.iterate_indices())
    for i, want in enumerate(shards):
        got = again[i]
        assert torch.allclose(got.iterates, want.iterates) and torch.equal(got.x, want.x)
        assert torch.equal(got.points[0], torch.tensor(want.index))
    assert not (tmp_path / "t" / "shard_00000" / "x.npy").exists()  # indices, not copies
    seen, mixed = [], False
    for mb in again.loader(16, seed=0, epoch=0):
        seen += mb.y.tolist()
        ids = [int(np.flatnonzero((x == row).all(1).numpy())[0]) for row in mb.x]
        mixed |= len({i // 16 for i in ids}) > 1
    assert sorted(seen) == sorted(y.tolist()) and mixed
    assert store.verify() == []
    path = tmp_path / "t" / "shard_00002" / "z_star.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert [(p.name, why) for p, why in again.verify()] == [("z_star.npy", "checksum mismatch")]


def test_kept_iterates_are_a_per_sample_subset_in_bfloat16(tmp_path):
    model, x, y = tiny_problem(n=32)
    cfg = _config(keep=3, dtype="bfloat16")
    full = record(model, [(x[i : i + 16], y[i : i + 16]) for i in (0, 16)], _config())
    store = record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(tmp_path / "t"))
    batch = TrajectoryArrays(tmp_path / "t", items=TensorItems(x, y))[0]
    assert batch.points.shape == (16, 3) and bool((batch.points[:, 0] == 0).all())
    assert len({tuple(p) for p in batch.points.tolist()}) > 1  # drawn per sample
    index = full[0].index
    for row in range(16):
        for j, k in enumerate(batch.points[row].tolist()):
            want = full[0].iterates[row, index.index(k)]
            assert torch.allclose(batch.iterates[row, j], want, rtol=1e-2, atol=1e-2)  # bfloat16
    assert store.keep == 3


def test_a_resumed_recording_records_the_same_samples(tmp_path):
    """Recording a data set in a seeded random order, killed after two shards and resumed, keeps
    the samples of an uninterrupted recording; a loader that reorders its batches is refused."""
    model, x, y = tiny_problem(n=64)
    cfg = _config(shuffle=True, max_samples=48)
    whole = record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(tmp_path / "a"), seed=3)

    def killed(i):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(tmp_path / "b"), seed=3,
                      on_recorded=killed)
    resumed = record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(tmp_path / "b"), seed=3)
    ids = [np.asarray(s.shard(i).arrays["ids"]).tolist() for s in (whole, resumed) for i in range(3)]
    assert ids[:3] == ids[3:] and sorted(sum(ids[:3], [])) != list(range(48))  # a random subset
    assert whole.manifest()["order"] == {"n": 64, "shuffle": True, "seed": 3, "max_samples": 48,
                                         "batch_size": 16}
    with pytest.raises(ValueError, match="drew its samples"):
        record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(tmp_path / "b"), seed=4)
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    record_arrays(model, loader[:2], _config(), TrajectoryArrays(tmp_path / "c"))
    with pytest.raises(ValueError, match="another order"):
        record_arrays(model, loader[::-1], _config(), TrajectoryArrays(tmp_path / "c"))


def test_regenerated_iterates_equal_the_recorded_ones_and_stop_at_each_sample_depth():
    """The online source's iterates: the teacher's own, each sample solved only as far as the
    latest iterate it needs (the layer's rows count one call per sample and iterate, plus the
    evaluation at its last)."""
    model, x, y = tiny_problem(n=16)
    cfg = _config()
    rec = record(model, [(x, y)], cfg)[0]
    index = rec.index
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, len(index), (16, 2), generator=gen)
    points = torch.tensor(index)[pos]
    with torch.no_grad(), LayerCalls(model.cell) as calls:
        got = regenerate(model, points, model.inject(x), cfg.solver.build())
    want = rec.iterates[torch.arange(16)[:, None], pos]
    assert torch.allclose(got, want, atol=1e-6)
    depth = points.max(dim=1).values
    assert calls.rows == int((depth + 1)[depth > 0].sum())


def test_regenerated_iterates_equal_the_recorded_ones_when_samples_stop_early():
    """With a tolerance, samples stop at different iterations (a stopped sample's later recorded
    iterates repeat its last): the regenerated iterates are still the recorded ones, at points
    before and after each sample's stop."""
    model, x, y = tiny_problem(n=16)
    cfg = _config(solver={"max_iter": 12, "tol": 1e-2})
    rec = record(model, [(x, y)], cfg)[0]
    u = model.inject(x)
    with torch.no_grad():
        stops = cfg.solver.build().solve(model.cell, model.initial_state(u), u).nfe
    index = rec.index
    pos = torch.randint(0, len(index), (16, 2), generator=torch.Generator().manual_seed(0))
    pos[:, 1] = len(index) - 1  # every sample's last recorded point: after the early stops
    points = torch.tensor(index)[pos]
    assert bool((stops < max(index)).any()) and len(set(stops.tolist())) > 2  # stopped early, apart
    with torch.no_grad():
        got = regenerate(model, points, u, cfg.solver.build())
    want = rec.iterates[torch.arange(16)[:, None], pos]
    assert torch.allclose(got, want, atol=1e-6)


def test_pinning_a_recorded_batch_pins_every_tensor_in_it(monkeypatch):
    """A DataLoader with ``pin_memory=True`` calls a batch's ``pin_memory()``: a TrajectoryBatch
    returns itself with every tensor (structured inputs and states included) pinned. Pinning
    needs CUDA, so ``Tensor.pin_memory`` is replaced by a marker here."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from cdeq.consistency.trajectory import TrajectoryBatch

    pinned = set()

    def fake_pin(self, *args, **kwargs):
        out = self.clone()
        pinned.add(id(out))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    z = {"a": torch.randn(3, 2), "b": (torch.randn(3, 4),)}
    batch = TrajectoryBatch(x=(torch.randn(3, 5), {"mask": torch.ones(3)}), y=torch.arange(3),
                            iterates={"a": torch.randn(3, 2, 2), "b": (torch.randn(3, 2, 4),)},
                            z_star=z, residual=torch.rand(3, 2), star_residual=torch.rand(3),
                            index=[0, 4], last=8, points=torch.zeros(3, 2, dtype=torch.long),
                            part=(0, 3, 3), global_star_residual=torch.rand(3))
    out = pin_memory(batch)  # what the DataLoader's pinning thread does
    assert isinstance(out, TrajectoryBatch)
    tensors = [t for f in dataclasses.fields(out) for t in pytree.tree_leaves(getattr(out, f.name))
               if isinstance(t, torch.Tensor)]
    assert len(tensors) == 11 and all(id(t) in pinned for t in tensors)
    assert out.index == [0, 4] and out.last == 8 and out.part == (0, 3, 3)
    assert torch.equal(out.z_star["b"][0], z["b"][0])


def test_a_resumed_recording_refuses_shards_recorded_with_other_settings(tmp_path):
    """Resuming into a folder whose shards were recorded with another dtype, number of kept
    iterates, solver or recording grid is an error naming the setting (never a store that mixes
    float16 and bfloat16 shards); the same settings resume."""
    model, x, y = tiny_problem(n=32)
    items = TensorItems(x, y)

    def killed(i):
        if i == 1:
            raise KeyboardInterrupt

    base = {"keep": 3, "dtype": "bfloat16"}
    with pytest.raises(KeyboardInterrupt):
        record_arrays(model, items, _config(**base), TrajectoryArrays(tmp_path / "t"), on_recorded=killed)
    changes = {"record.dtype": {"dtype": "float16"}, "record.keep": {"keep": 2},
               "record.solver.max_iter": {"solver": {"max_iter": 10, "tol": 0.0}},
               "record.solver": {"solver": {"max_iter": 12, "tol": 1e-3}},
               "record.indices": {"indices": [0, 1, 2, 11]}}
    for name, change in changes.items():
        with pytest.raises(ValueError, match=rf"shard_00000 was recorded with {name}=.*restore the "
                                             rf"setting.*or delete"):
            record_arrays(model, items, _config(**{**base, **change}), TrajectoryArrays(tmp_path / "t"))
    store = record_arrays(model, items, _config(**base), TrajectoryArrays(tmp_path / "t"))
    assert len(store) == 2 and store.verify() == []


def test_in_memory_trajectories_have_no_files_to_check():
    model, x, y = tiny_problem(n=16)
    store = record_arrays(model, TensorItems(x, y), _config(), TrajectoryArrays(None, TensorItems(x, y)),
                          keep=0)
    for check in (store.verify, store.check):
        with pytest.raises(ValueError, match="held in memory"):
            check()


def test_online_distillation_keeps_no_iterate_and_trains(tmp_path):
    """Online: z* and residuals only (no iterate, nothing on disk); the same pairs regenerated
    give the stored distillation's losses, epoch by epoch."""
    model, x, y = tiny_problem(n=64)
    cfg = _config()
    online = record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(None, TensorItems(x, y)),
                           keep=0)
    record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(tmp_path / "s"))
    stored = TrajectoryArrays(tmp_path / "s", items=TensorItems(x, y))  # read back from disk
    assert online.keep == 0 and "iterates" not in online.shard(0).arrays
    histories = []
    for source in (online, stored):
        torch.manual_seed(0)
        student = ConsistencyStudent(model)
        histories.append(distill(student, source, DistillConfig(epochs=3, batch_size=16),
                                 task_loss=torch.nn.functional.cross_entropy))
    on, st = histories
    for key in ("loss", "global", "local", "task"):
        assert on[key] == pytest.approx(st[key], rel=1e-4), key


def test_an_online_run_leaves_no_trajectory_on_disk_and_matches_the_stored_run(tmp_path):
    """``cdeq run`` with ``record.mode=online``: the trajectories folder holds its manifest and
    work record only (no shard, no array), and the report's metrics are the stored mode's."""
    import json

    from cdeq.cli import main

    settings = ["--set", "threads=1", "teacher.epochs=1", "task_config.train_subset=128",
                "task_config.test_subset=64", "distill.epochs=1", "evaluate.budgets=[1,2]",
                "plans.max_nfe=2", "baselines.enabled=false", "plus.enabled=false"]
    reports = {}
    for mode in ("stored", "online"):
        out = tmp_path / mode
        assert main(["run", "digits", "--quick", "--out", str(out), *settings,
                     f"record.mode={mode}"]) == 0
        reports[mode] = json.loads((out / "report.json").read_text())
    kept = sorted(p.name for p in (tmp_path / "online" / "trajectories").iterdir())
    assert kept == ["manifest.json", "work.json"]
    assert any(p.name.startswith("shard_") for p in (tmp_path / "stored" / "trajectories").iterdir())
    for key in ("methods", "relative_error"):
        for method, per_k in reports["stored"][key].items():
            assert reports["online"][key][method] == pytest.approx(per_k, rel=1e-4), (key, method)
