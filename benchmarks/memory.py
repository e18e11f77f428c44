"""Peak memory of recording and distillation on MNIST: float32 vs float16 trajectories, in-memory vs
streamed distillation.

Setup: ``MnistTask`` with ``ImageConfig(dataset="mnist", stride=4, channels=32, train_subset=N)`` (the
MNIST preset's model: a 32 x 7 x 7 state), the default ``RecordConfig`` (Anderson, ``max_iter`` 40,
12 recorded iterates + ``z*``, 256 samples per shard) and the default ``DistillConfig`` run for one
epoch (minibatch 64). The teacher is the task's *untrained* model (seeded): memory depends on the
shapes of the recorded states and the number of samples, not on how well the teacher is trained
(an untrained teacher may take more solver steps, which costs time, not memory).

Each configuration runs in a fresh subprocess (the driver itself imports neither torch nor cdeq, so
its small footprint is all a child can inherit in ``ru_maxrss``):

- ``record/<dtype>``: record the N training samples into a ``TrajectoryStore`` in ``<dtype>``.
- ``distill/memory/<dtype>``: ``list(store)`` (every shard loaded; ``TrajectoryStore.read`` converts the
  states to float32) then one distillation epoch on the list.
- ``distill/stream/<dtype>``: one distillation epoch on the store itself (one shard read at a time).

Reported per configuration: ``peak`` = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end,
``base`` = the resident set (``VmRSS``) after imports, data loading and model building, and the
increment ``peak - base``. Loading the MNIST file (all 60000 images, converted, then cut to N) peaks
higher than some stages, so after loading the worker resets the kernel's peak-RSS mark to the current
RSS (``5`` to ``/proc/self/clear_refs``, Linux >= 4.0; ``ru_maxrss`` then follows the new mark);
``load_peak`` (``ru_maxrss`` before the reset) is kept in the JSON. Where the reset is not possible
the row is flagged when the loading peak may hide the stage's. Also reported: the bytes of the
trajectory shards on disk and the stage's wall time.

Full MNIST has 60000 training images. The in-memory distillation increment at 60000 is an
*extrapolation*, not a measurement: the streamed increment (which does not grow with N) plus the
in-memory minus streamed difference scaled linearly by ``60000 / N``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/memory.py                 # N = 10000, writes results/memory.json
    OMP_NUM_THREADS=1 python benchmarks/memory.py --samples 1000  # quicker smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MNIST_TRAIN = 60000
MIB = 1 << 20


def _rss_bytes() -> int:
    """The current resident set size (``VmRSS``) of this process."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: ``5`` to ``clear_refs``), so
    that the loading of the whole MNIST file does not hide the stage's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# --- worker (runs in a fresh subprocess) --------------------------------------------------------
def worker(stage: str, mode: str, dtype: str, samples: int, workdir: Path) -> dict:
    import torch

    from cdeq.consistency import (
        ConsistencyStudent,
        DistillConfig,
        RecordConfig,
        ScheduleConfig,
        StudentConfig,
        TimeSchedule,
        TrajectoryStore,
        distill,
        record,
    )
    from cdeq.tasks.images import ImageConfig, MnistTask

    torch.set_num_threads(1)
    task = MnistTask(ImageConfig(dataset="mnist", stride=4, channels=32, train_subset=samples))
    teacher = task.build_model()  # untrained (seeded): memory does not depend on training
    teacher.eval()
    store = TrajectoryStore(workdir / dtype)
    gc.collect()
    load_peak = _maxrss_bytes()
    reset = _reset_peak()
    base = _rss_bytes()
    t0 = time.perf_counter()
    if stage == "record":
        if store.root.exists():
            shutil.rmtree(store.root)
        store.root.mkdir(parents=True)
        cfg = RecordConfig(dtype=dtype)
        record(teacher, task.record_batches(cfg.batch_size), cfg, store=store)
    else:
        trajectories = list(store) if mode == "memory" else store
        torch.manual_seed(0)
        student = ConsistencyStudent(teacher, TimeSchedule(ScheduleConfig()), StudentConfig())
        distill(student, trajectories, DistillConfig(epochs=1), task_loss=task.loss, seed=0)
    elapsed = time.perf_counter() - t0
    peak = _maxrss_bytes()
    shards = sorted(store.root.glob("shard_*.safetensors"))
    return {"stage": stage, "mode": mode, "dtype": dtype, "samples": samples,
            "recorded_samples": int(store.manifest()["samples"]), "shards": len(shards),
            "disk_bytes": sum(p.stat().st_size for p in shards),
            "base_rss_bytes": base, "load_peak_bytes": load_peak, "peak_bytes": peak,
            "increment_bytes": peak - base, "peak_reset_after_loading": reset,
            "peak_hidden_by_loading": not reset and load_peak >= peak,
            "seconds": elapsed}


# --- driver -----------------------------------------------------------------------------------
CONFIGS = [("record", "-", "float32"), ("record", "-", "float16"),
           ("distill", "memory", "float32"), ("distill", "stream", "float32"),
           ("distill", "memory", "float16"), ("distill", "stream", "float16")]


def run_one(stage: str, mode: str, dtype: str, samples: int, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", stage, mode, dtype, "--samples", str(samples),
           "--workdir", str(workdir)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), CDEQ_PROGRESS="0")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{stage}/{mode}/{dtype} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - t0
    return result


def extrapolate(results: list[dict]) -> dict[str, dict]:
    """In-memory distillation at full MNIST size: streamed increment + (in-memory - streamed) * 60000/N."""
    out = {}
    for r in results:
        if r["stage"] != "distill" or r["mode"] != "memory":
            continue
        stream = next(s for s in results if s["stage"] == "distill" and s["mode"] == "stream"
                      and s["dtype"] == r["dtype"])
        scale = MNIST_TRAIN / r["recorded_samples"]
        grow = max(0, r["increment_bytes"] - stream["increment_bytes"])
        out[r["dtype"]] = {"in_memory_increment_bytes": stream["increment_bytes"] + grow * scale,
                           "disk_bytes": r["disk_bytes"] * scale, "scale": scale,
                           "note": "linear extrapolation from N samples, not measured"}
    return out


def table(results: list[dict], samples: int) -> str:
    rows = ["| stage | trajectories | peak RSS (MiB) | base RSS (MiB) | increment (MiB) | on disk (MiB) "
            "| time (s) |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        mode = "in memory" if r["mode"] == "memory" else "streamed"
        what = "record" if r["stage"] == "record" else f"distill, {mode}"
        flag = " (*)" if r["peak_hidden_by_loading"] else ""
        rows.append(f"| {what} | {r['dtype']} | {r['peak_bytes'] / MIB:.0f}{flag} "
                    f"| {r['base_rss_bytes'] / MIB:.0f} | {r['increment_bytes'] / MIB:.0f} "
                    f"| {r['disk_bytes'] / MIB:.1f} | {r['seconds']:.1f} |")
    for dtype, extra in extrapolate(results).items():
        rows.append(f"| distill, in memory, **extrapolated** to {MNIST_TRAIN} | {dtype} | - | - "
                    f"| ~{extra['in_memory_increment_bytes'] / MIB:.0f} "
                    f"| ~{extra['disk_bytes'] / MIB:.0f} | - |")
    if any(r["peak_hidden_by_loading"] for r in results):
        rows.append("\n(*) the peak RSS could not be reset after loading and the loading peak is at "
                    "least this: the stage's own peak is at most this")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000, help="N: MNIST training samples recorded")
    parser.add_argument("--workdir", type=Path, default=None, help="shard folder (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory.json")
    parser.add_argument("--worker", nargs=3, metavar=("STAGE", "MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, samples=args.samples, workdir=args.workdir)))
        return
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="cdeq_memory_") if args.workdir is None else None
    workdir = args.workdir or Path(tmp)
    results = []
    try:
        for stage, mode, dtype in CONFIGS:
            r = run_one(stage, mode, dtype, args.samples, workdir)
            print(f"{stage:8s} {mode:7s} {dtype}: peak {r['peak_bytes'] / MIB:.0f} MiB, increment "
                  f"{r['increment_bytes'] / MIB:.0f} MiB, {r['seconds']:.1f}s", flush=True)
            results.append(r)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    text = table(results, args.samples)
    print(f"\nN = {args.samples} MNIST training samples (full MNIST: {MNIST_TRAIN}); total {total:.0f}s\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"samples": args.samples, "mnist_train": MNIST_TRAIN, "total_seconds": total,
               "teacher": "untrained (seeded build_model); memory does not depend on training",
               "task": {"dataset": "mnist", "stride": 4, "channels": 32, "train_subset": args.samples},
               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "python": platform.python_version(),
               "platform": platform.platform(), "results": results,
               "extrapolated_to_full_mnist": extrapolate(results),
               "table": text}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
