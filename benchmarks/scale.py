"""Distillation at scale: bytes on disk, peak memory and time per epoch of each trajectory source on
MNIST, and the projected bytes of the paper's three large cases.

Part 1 (measured). Setup of ``benchmarks/memory.py``: ``MnistTask`` with the MNIST preset's model
(``stride=4, channels=32``: a 32 x 7 x 7 state), ``train_subset=N`` (N - 10% training images),
the default ``RecordConfig`` (Anderson, ``max_iter`` 40, 12 recorded iterates + ``z*``, 256 samples
per recorded batch), the task's *untrained* teacher (seeded: sizes, memory and time per epoch do
not depend on training), one distillation epoch of the default ``DistillConfig`` (minibatch 64).
Each source runs in a fresh subprocess, one thread:

- ``shards``: today's stored format (one safetensors file per recorded batch, float32, inputs
  copied) read by the streamed path (``distill`` on the ``TrajectoryStore``: a shard at a time);
- ``arrays``: the per-sample arrays with every iterate in float32 (the shards' iterates, inputs
  by index): the same store size; ``--cache-mib`` bounds the memory its memory maps hold;
- ``lean``: the arrays with ``keep=4`` iterates per sample in bfloat16;
- ``online``: ``z*`` and residuals in memory, nothing on disk; the iterates each minibatch's pairs
  need are regenerated (its "record" time is the one pass solving ``z*``).

Reported: bytes on disk, the recording's seconds; reading one epoch's minibatches as distillation
reads them, without training (its seconds and peak memory: the read path alone); one distillation
epoch's seconds and peak memory. Peak memory is the resident set above the process's base after
loading (``/proc/self/clear_refs`` resets the peak after the MNIST file is read, as in
``memory.py``).

Part 2 (projected, not measured). :func:`cdeq.consistency.online.projected_bytes`, the sizing the
``auto`` mode decides with, for states built as the paper's models have them (the assumptions are
written in the JSON): the DEQ-Transformer on WikiText-103 (100,000 sequences of 150 tokens,
d = 700), MDEQ-small on ImageNet (1,281,167 images; four branches of 32, 64, 128, 256 channels at
56, 28, 14, 7 pixels: ``cls_mdeq_SMALL.yaml`` of the MDEQ code) and an IGNN on ogbn-products
(2,449,029 nodes, hidden 128, 32 recorded perturbed copies of the graph; its inputs, 100 float32
features per node and the symmetric adjacency with self-loops, are stored with each copy).

    OMP_NUM_THREADS=1 python benchmarks/scale.py --samples 10000 --out benchmarks/results/scale.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from memory import _maxrss_bytes, _reset_peak, _rss_bytes  # noqa: E402  (one way to read memory)

MIB = 1 << 20
SOURCES = ("shards", "arrays", "lean", "online")


def _disk(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def worker(source: str, stage: str, samples: int, workdir: Path, cache_mib: int) -> dict:
    import torch

    from cdeq.consistency import (
        ConsistencyStudent,
        DistillConfig,
        RecordConfig,
        TrajectoryArrays,
        TrajectoryStore,
        distill,
        record,
        record_arrays,
    )
    from cdeq.tasks.images import ImageConfig, MnistTask

    torch.set_num_threads(1)
    task = MnistTask(ImageConfig(dataset="mnist", stride=4, channels=32, train_subset=samples))
    teacher = task.build_model()
    teacher.eval()
    items = task.train_items()
    root = workdir / source
    options = {"shards": {"format": "shards"}, "arrays": {}, "lean": {"keep": 4, "dtype": "bfloat16"},
               "online": {}}[source]
    cfg = RecordConfig.from_dict({**options, "cache_bytes": cache_mib * MIB})
    gc.collect()
    _reset_peak()
    base = _rss_bytes()
    out = {"source": source, "stage": stage, "samples": len(items), "cache_mib": cache_mib}
    t0 = time.perf_counter()
    if stage == "record":
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if source == "shards":
            record(teacher, task.record_batches(cfg.batch_size), cfg, store=TrajectoryStore(root))
        else:
            record_arrays(teacher, items, cfg, TrajectoryArrays(root))
        out["seconds"] = time.perf_counter() - t0
        out["disk_bytes"] = _disk(root)
        return out
    if stage == "read":  # one epoch's minibatches read as distillation reads them, no training
        if source == "shards":
            from cdeq.consistency.distill import _minibatches

            store = TrajectoryStore(root)
            gen = torch.Generator().manual_seed(0)
            for i in torch.randperm(len(store), generator=gen).tolist():
                for _ in _minibatches(store[i], 64, gen):
                    pass
        else:
            for _ in TrajectoryArrays(root, items=items, cache_bytes=cfg.cache_bytes).loader(64, 0, 0):
                pass
        out["seconds"] = time.perf_counter() - t0
        out["increment_bytes"] = _maxrss_bytes() - base
        return out
    if source == "online":
        trajectories = record_arrays(teacher, items, cfg, TrajectoryArrays(None, items), keep=0)
        out["record_seconds"] = time.perf_counter() - t0
        out["disk_bytes"] = 0
        t0 = time.perf_counter()
    elif source == "shards":
        trajectories = TrajectoryStore(root)
    else:
        trajectories = TrajectoryArrays(root, items=items, cache_bytes=cfg.cache_bytes)
    torch.manual_seed(0)
    student = ConsistencyStudent(teacher)
    distill(student, trajectories, DistillConfig(epochs=1), task_loss=task.loss, seed=0)
    out["seconds"] = time.perf_counter() - t0
    out["base_rss_bytes"] = base
    out["increment_bytes"] = _maxrss_bytes() - base
    return out


def run_one(source: str, stage: str, samples: int, workdir: Path, cache_mib: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", source, stage, "--samples", str(samples),
           "--workdir", str(workdir), "--cache-mib", str(cache_mib)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CDEQ_PROGRESS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{source}/{stage} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def projections() -> list[dict]:
    """The paper's three cases, sized by the code's own formula (assumptions alongside)."""
    import torch

    from cdeq.consistency import RecordConfig
    from cdeq.consistency.online import projected_bytes
    from cdeq.engine.tree import Layout

    def numel(state) -> int:
        layout = Layout.of(state)
        return sum(layout.sizes)

    nodes, edges = 2_449_029, 61_859_140
    nnz = 2 * edges + nodes  # symmetric, with self-loops
    cases = [
        {"case": "WikiText-103, DEQ-Transformer", "samples": 100_000,
         "state": torch.zeros(1, 150, 700), "input_bytes": 150 * 8,
         "assumed": "100,000 sequences of 150 tokens, d = 700; int64 tokens"},
        {"case": "ImageNet, MDEQ-small", "samples": 1_281_167,
         "state": (torch.zeros(1, 32, 56, 56), torch.zeros(1, 64, 28, 28), torch.zeros(1, 128, 14, 14),
                   torch.zeros(1, 256, 7, 7)),
         "input_bytes": 3 * 224 * 224 * 4,
         "assumed": "four branches 32/64/128/256 channels at 56/28/14/7 pixels (cls_mdeq_SMALL.yaml); "
                    "float32 224 x 224 x 3 inputs"},
        {"case": "ogbn-products, IGNN", "samples": 32,
         "state": torch.zeros(1, nodes, 128),
         "input_bytes": nodes * 100 * 4 + nnz * (2 * 8 + 4),
         "assumed": "the full graph per sample, hidden 128, 32 recorded copies (record_copies); "
                    "100 float32 features per node and a COO adjacency (int64 indices, float32 "
                    "values) stored with each copy"},
    ]
    out = []
    for case in cases:
        entries = numel(case.pop("state"))
        row = {**case, "state_entries": entries}
        for label, cfg in (("float32", RecordConfig()), ("bfloat16", RecordConfig(dtype="bfloat16")),
                           ("bfloat16_keep4", RecordConfig(dtype="bfloat16", keep=4))):
            row[label] = projected_bytes(entries, case["samples"], cfg, case["input_bytes"])
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--cache-mib", type=int, nargs="+", default=[64, 1024],
                        help="the arrays source's reader cache, one run per value")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale.json")
    parser.add_argument("--worker", nargs=2, metavar=("SOURCE", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, samples=args.samples, workdir=args.workdir,
                                cache_mib=args.cache_mib[0])))
        return
    tmp = tempfile.mkdtemp(prefix="cdeq_scale_") if args.workdir is None else None
    workdir = args.workdir or Path(tmp)
    rows = []
    try:
        for source in args.sources:
            rec = run_one(source, "record", args.samples, workdir, args.cache_mib[0]) \
                if source != "online" else None
            caches = args.cache_mib if source == "arrays" else args.cache_mib[:1]
            for cache in caches:
                read = run_one(source, "read", args.samples, workdir, cache) if rec else None
                dist = run_one(source, "distill", args.samples, workdir, cache)
                rows.append({"source": source, "cache_mib": cache if source in ("arrays", "lean") else None,
                             "disk_bytes": rec["disk_bytes"] if rec else 0,
                             "record_seconds": rec["seconds"] if rec else dist["record_seconds"],
                             "read_seconds": read["seconds"] if read else None,
                             "read_increment_bytes": read["increment_bytes"] if read else None,
                             "epoch_seconds": dist["seconds"],
                             "peak_increment_bytes": dist["increment_bytes"],
                             "samples": dist["samples"]})
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    projected = projections()
    lines = ["| source | reader cache (MiB) | on disk (MiB) | record (s) | reading an epoch (s) | "
             "peak RSS reading (MiB) | distillation epoch (s) | peak RSS distilling (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cache = "-" if r["cache_mib"] is None else str(r["cache_mib"])
        read = "-" if r["read_seconds"] is None else f"{r['read_seconds']:.1f}"
        read_mem = "-" if r["read_increment_bytes"] is None else f"{r['read_increment_bytes'] / MIB:.0f}"
        lines.append(f"| {r['source']} | {cache} | {r['disk_bytes'] / MIB:.1f} | {r['record_seconds']:.1f} "
                     f"| {read} | {read_mem} | {r['epoch_seconds']:.1f} "
                     f"| {r['peak_increment_bytes'] / MIB:.0f} |")
    lines += ["", "| projected (not measured) | samples | state entries | shards, float32 | "
              "shards, bfloat16 | arrays, bfloat16, 4 iterates | online (z*, in memory) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for p in projected:
        lines.append(f"| {p['case']} | {p['samples']:,} | {p['state_entries']:,} "
                     f"| {p['float32']['shards'] / 1e12:.3g} TB | {p['bfloat16']['shards'] / 1e12:.3g} TB "
                     f"| {p['bfloat16_keep4']['arrays'] / 1e12:.3g} TB "
                     f"| {p['float32']['online'] / 1e12:.3g} TB |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"samples_arg": args.samples, "measured": rows,
                                    "projected": projected, "table": table,
                                    "omp_num_threads": "1"}, indent=2))


if __name__ == "__main__":
    main()
