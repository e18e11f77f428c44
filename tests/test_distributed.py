"""Two processes (torchrun, gloo on CPU, DistributedDataParallel) train the same teacher, and distil the
same student, as one process with the same global batch and seed: weights equal within 1e-5 (max abs
difference).

Run as a script under torchrun, this file trains a toy DEQ teacher, records its trajectories, distils a
student with each rank computing its half of every minibatch, and (rank 0) saves both.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toys import ToyTask

TOL = 1e-5


def train(out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from cdeq.engine import distributed

    distributed.init()
    wrapped = []  # the modules DistributedDataParallel was built for (none in one process)
    real_init = DistributedDataParallel.__init__

    def spy(self, module, *args, **kwargs):
        wrapped.append(type(module.model).__name__)
        real_init(self, module, *args, **kwargs)

    DistributedDataParallel.__init__ = spy
    try:
        model, student = _train_both()
    finally:
        DistributedDataParallel.__init__ = real_init
    if distributed.is_main():
        torch.save({"teacher": model.state_dict(), "student": student.state_dict(), "ddp": wrapped}, out)
    distributed.barrier()


def _train_both():
    from cdeq.consistency import ConsistencyStudent, DistillConfig, RecordConfig, distill, record
    from cdeq.run.teacher import TeacherConfig, train_teacher

    torch.set_num_threads(1)
    task = ToyTask()
    model = task.build_model()
    train_teacher(task, model, TeacherConfig.from_dict(
        {"epochs": 2, "batch_size": 16, "optim": {"lr": 1e-2}}), seed=0)
    trajectories = record(model, task.train_batches(32, shuffle=False),
                          RecordConfig.from_dict({"solver": {"max_iter": 12}}))
    student = ConsistencyStudent(model)
    distill(student, trajectories, DistillConfig.from_dict(
        {"epochs": 2, "batch_size": 16, "optim": {"lr": 3e-3}}), task_loss=task.loss,
            seed=0)
    return model, student


def test_two_processes_match_one(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", __file__, str(tmp_path / "two.pt")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    before = torch.get_num_threads()
    try:
        train(str(tmp_path / "one.pt"))
    finally:
        torch.set_num_threads(before)
    both_one, both_two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # teacher training and distillation ran under DistributedDataParallel in the two processes
    assert both_two["ddp"] == ["DEQModel", "ConsistencyStudent"] and both_one["ddp"] == []
    for part in ("teacher", "student"):  # the same weights as one process
        one, two = both_one[part], both_two[part]
        assert one.keys() == two.keys()
        diff = max(float((one[k] - two[k]).abs().max()) for k in one)
        assert diff <= TOL, (part, diff)
    one = both_one["teacher"]
    assert max(float((one[k] - ToyTask().build_model().state_dict()[k]).abs().max()) for k in one) > 1e-3
    # distillation moved the student's own layer away from the teacher's
    moved = [k for k in both_one["student"] if k.startswith("cell.")]
    assert max(float((both_one["student"][k] - one["deq." + k]).abs().max()) for k in moved) > 1e-4


def test_a_batch_is_split_by_rows_or_owned_by_one_rank(monkeypatch):
    """Without a process group a part is the whole batch; with N ranks a tensor batch (or a
    structure of dense tensors) is split into contiguous rows whose shares sum to 1, and a batch
    that cannot be split (a graph: features and a sparse adjacency) is computed whole by rank
    ``index % N`` alone."""
    from cdeq.engine import distributed

    x, y = torch.randn(5, 2), torch.arange(5)
    assert distributed.world_size() == 1 and distributed.is_main()
    p = distributed.part(x, y, 3)
    assert p.x is x and p.y is y and p.share == 1.0 and not p.empty
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    rows, shares, owners = [], [], []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        p = distributed.part(x, y, 3)
        rows.append(p.y)
        shares.append(p.share)
        adjacency = torch.eye(5).to_sparse()
        graph = distributed.part((x, adjacency), (y, y), 3)  # a sparse part: not split
        owners.append(not graph.empty)
    assert torch.equal(torch.cat(rows), y) and sum(shares) == 1.0
    nested = distributed.part({"a": x, "b": (x, x)}, y, 0)  # rank 1: the second rows of each part
    assert torch.equal(nested.x["b"][1], x[2:]) and torch.equal(nested.y, y[2:])
    assert owners == [False, True]  # batch 3 belongs to rank 1


def test_every_row_of_a_recorded_minibatch_is_read_by_exactly_one_rank(monkeypatch):
    """Recorded arrays read under N = 1, 2, 3 ranks, in minibatches of 1, 2 or 5 of 7 samples (so
    minibatches with fewer rows than ranks, the last one included): every row of a global minibatch
    is on exactly one rank, in rank order, the shares sum to 1, and the ranks' parts of the
    distillation loss and their rows add up to one process's (a rank without rows computes
    nothing), rather than each rank counting a short minibatch whole."""
    import torch.nn.functional as F
    from test_consistency import tiny_problem

    from cdeq.consistency import ConsistencyStudent, DistillConfig, RecordConfig
    from cdeq.consistency.arrays import TrajectoryArrays
    from cdeq.consistency.distill import _loss
    from cdeq.consistency.ema import EMA
    from cdeq.consistency.online import record_arrays
    from cdeq.consistency.pairs import get_pair_sampler
    from cdeq.engine import distributed
    from cdeq.engine.batches import TensorItems

    model, x, y = tiny_problem(n=7)
    cfg = RecordConfig.from_dict({"solver": {"max_iter": 12, "tol": 0.0}, "batch_size": 4})
    store = record_arrays(model, TensorItems(x, y), cfg, TrajectoryArrays(None, TensorItems(x, y)))
    torch.manual_seed(0)
    student = ConsistencyStudent(model)
    ema, config, sampler = EMA(student, decay=0.9), DistillConfig(), get_pair_sampler("uniform")

    def loss(mb, index):
        gen = torch.Generator().manual_seed(index)  # the same draws on every rank
        out = _loss(student, ema, mb, config, sampler, 0.5, gen, F.cross_entropy, (), index)
        return (0.0, 0) if out is None else (float(out[0]["loss"]), out[1])

    for batch_size in (1, 2, 5):
        alone = list(store.loader(batch_size, seed=0, epoch=0))
        for world in (1, 2, 3):
            monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
            by_rank = []
            for r in range(world):
                monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                by_rank.append(list(store.loader(batch_size, seed=0, epoch=0)))
            for j, whole in enumerate(alone):
                parts = [mbs[j] for mbs in by_rank]
                n = whole.batch_size
                assert all(p.part[2] == n for p in parts)
                rows = [i for p in parts for i in range(p.part[0], p.part[1])]
                assert rows == list(range(n)), (batch_size, world, j, rows)  # each row once
                assert sum((p.part[1] - p.part[0]) / n for p in parts) == pytest.approx(1.0)
                assert torch.equal(torch.cat([p.z_star for p in parts]), whole.z_star)
                assert torch.equal(torch.cat([p.y for p in parts]), whole.y)
                monkeypatch.setattr(distributed, "world_size", lambda: 1)
                monkeypatch.setattr(distributed, "rank", lambda: 0)
                want, want_rows = loss(whole, j)
                monkeypatch.setattr(distributed, "world_size", lambda w=world: w)
                got = []
                for r, p in enumerate(parts):
                    monkeypatch.setattr(distributed, "rank", lambda r=r: r)
                    got.append(loss(p, j))
                assert sum(g[1] for g in got) == want_rows == n
                assert sum(g[0] for g in got) == pytest.approx(want, rel=1e-5, abs=1e-7)
        monkeypatch.setattr(distributed, "world_size", lambda: 1)
        monkeypatch.setattr(distributed, "rank", lambda: 0)


if __name__ == "__main__":
    train(sys.argv[1])


def test_whole_pipeline_under_torchrun(tmp_path):
    """`torchrun -m cdeq.cli run ...` needs no change from the user: one log, one report written by
    rank 0, the metrics of one process (within float tolerance), and each rank computed its part
    of every stage (the report's ``distributed`` section)."""
    import json

    from cdeq.cli import main
    from cdeq.run.report import without_timing

    env = dict(os.environ, OMP_NUM_THREADS="1", CDEQ_PROGRESS="0")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    settings = ["--set", "threads=1", "teacher.epochs=1", "task_config.train_subset=256",
                "task_config.test_subset=64", "distill.epochs=1", "evaluate.budgets=[1,2]",
                "plans.max_nfe=2", "baselines.enabled=false", "plus.enabled=false",
                "record.batch_size=64"]
    out = tmp_path / "ddp"
    res = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         "-m", "cdeq.cli", "run", "digits", "--quick", "--out", str(out), *settings],
        env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("run digits in") == 1  # only rank 0 logs
    assert (out / "log.txt").read_text().count("teacher: held-out") == 1
    two = json.loads((out / "report.json").read_text())
    assert main(["run", "digits", "--quick", "--out", str(tmp_path / "one"), *settings]) == 0
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    # every stage split its samples: the ranks' counts add up to the one process's, about half each
    spread = two.pop("distributed")
    assert spread["world_size"] == 2
    assert set(spread["stages"]) == {"train", "record", "distill", "plan_search", "evaluate"}
    for stage, entry in spread["stages"].items():
        alone = one["distributed"]["stages"][stage]["samples_per_rank"]
        counts = entry["samples_per_rank"]
        assert entry["world_size"] == 2 and sum(counts) == alone[0], (stage, counts, alone)
        assert min(counts) >= 0.3 * sum(counts), (stage, counts)
    one.pop("distributed")
    _close(without_timing(one), without_timing(two), "")


def _close(a, b, where: str) -> None:
    """``a`` and ``b`` equal, numbers within float tolerance, the stages' spread left out. Rows
    solved in another batch differ by rounding: a sample may stop one solver iteration sooner or
    later (mean NFE within 2%), and errors to ``z*`` within 1e-3 (relative); metrics within 1e-4."""
    if isinstance(a, dict):
        keys = {k for k in a if k != "distributed"}
        assert keys == {k for k in b if k != "distributed"}, where
        for k in keys:
            _close(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        tol = 2e-2 if "nfe" in where else 1e-3 if "error" in where or "residual" in where else 1e-4
        assert abs(a - b) <= tol * max(1.0, abs(a)), (where, a, b)
    else:
        assert a == b, (where, a, b)
