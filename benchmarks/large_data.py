"""Data at the paper's scale: peak memory of the image-folder and token-file paths at two data sizes,
and graphs of ogbn-arxiv's and ogbn-products' size through record, distillation and evaluation on
sampled subgraphs.

Every data set is synthetic, generated here (nothing is shipped or downloaded):

- **images**: folders of ``--images`` and 10x as many 32x32 JPEGs (10 classes, ImageFolder's
  layout). Measured: ``cdeq train images --quick`` on the whole folder (every image decoded once
  per epoch by 2 DataLoader workers, one teacher epoch, the test split evaluated).
- **text**: folders of uint16 token files (``train.bin`` ...) of ``--tokens`` and 10x as many ids
  (Zipf-distributed over 8192 symbols). Measured: ``cdeq train text --quick`` with the whole corpus
  (the same number of training windows at both sizes).
- **graphs**: a planted-partition graph with heavy-tailed degrees and noisy class-mean features
  (edge homophily 0.65, OGB's split ratios): ``arxiv`` (169,343 nodes, 1,166,243 edges, 128
  features, 40 classes) written in OGB's layout (CSV, gzipped) and parsed by the reader;
  ``products`` (2,449,029 nodes, 61,859,140 edges, 100 features, 47 classes) written in chunks
  straight into a store (its CSV would be about 5 GB). Measured: ``cdeq run ogbn`` with the
  preset's settings but ``--limit`` training batches an epoch, recorded batches and evaluation
  batches (one teacher epoch, two distillation epochs); time per full epoch is projected from the
  time per batch; the report's ``data.subgraph_gap`` is the sampled-versus-full-graph distance.

Each measurement runs in a fresh subprocess; its peak resident set is the child's ``ru_maxrss``
(which counts the pages of memory-mapped files it touched as well as its own memory).

Usage::

    python benchmarks/large_data.py images text         # a few minutes
    python benchmarks/large_data.py graph --size arxiv  # about 15 minutes on 2 cores
    python benchmarks/large_data.py graph --size products --limit 8
    python benchmarks/large_data.py sampler --size arxiv --limit 30    # the sampler's defaults
    python benchmarks/large_data.py generate --size arxiv --out DIR   # the OGB folder alone
    python benchmarks/large_data.py arxiv-run           # cdeq run ogbn, default settings (an hour)
    python benchmarks/large_data.py --table             # the tables of docs/how-to/large-data.md

Writes ``benchmarks/results/large_data_<part>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
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

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {
    "arxiv": {"nodes": 169_343, "edges": 1_166_243, "features": 128, "classes": 40,
              "splits": (90_941, 29_799, 48_603)},
    "products": {"nodes": 2_449_029, "edges": 61_859_140, "features": 100, "classes": 47,
                 "splits": (196_615, 39_323, 2_213_091)},
}
CHUNK = 1 << 22


# --- synthetic data -------------------------------------------------------------------------------
class Planted:
    """A planted-partition graph: edge ``i`` of chunk ``c`` is drawn from ``SeedSequence([seed, c])``,
    so any chunk can be drawn again (the CSR builder reads the edges twice)."""

    def __init__(self, nodes: int, edges: int, features: int, classes: int, seed: int = 0,
                 homophily: float = 0.65) -> None:
        self.n, self.e, self.f, self.c, self.seed, self.h = nodes, edges, features, classes, seed, homophily
        rng = np.random.default_rng([seed, 10**6])
        self.labels = rng.integers(0, classes, nodes)
        weight = rng.pareto(2.0, nodes) + 1.0  # heavy-tailed activity: a few hubs
        self.cdf = np.cumsum(weight) / weight.sum()
        self.members = np.argsort(self.labels, kind="stable")
        self.starts = np.r_[0, np.cumsum(np.bincount(self.labels, minlength=classes))]
        self.centroids = rng.normal(size=(classes, features)).astype(np.float32)

    def edge_chunk(self, c: int) -> np.ndarray:
        size = min(CHUNK, self.e - c * CHUNK)
        rng = np.random.default_rng([self.seed, c])
        src = np.minimum(np.searchsorted(self.cdf, rng.random(size)), self.n - 1)
        lab = self.labels[src]
        inside = self.members[self.starts[lab] + (rng.random(size) * (self.starts[lab + 1] - self.starts[lab])
                                                  ).astype(np.int64)]
        anywhere = np.minimum(np.searchsorted(self.cdf, rng.random(size)), self.n - 1)
        dst = np.where(rng.random(size) < self.h, inside, anywhere)
        return np.stack([src, dst], 1)

    def edge_chunks(self):
        return (self.edge_chunk(c) for c in range(-(-self.e // CHUNK)))

    def feature_rows(self, a: int, b: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2 * 10**6, a])
        noise = rng.normal(size=(b - a, self.f)).astype(np.float32)
        return 0.15 * self.centroids[self.labels[a:b]] + noise

    def splits(self, sizes: tuple[int, int, int]) -> dict[str, np.ndarray]:
        perm = np.random.default_rng([self.seed, 3 * 10**6]).permutation(self.n)
        a, b, c = sizes
        return {"train": np.sort(perm[:a]), "valid": np.sort(perm[a : a + b]),
                "test": np.sort(perm[a + b : a + b + c])}


def write_ogb_folder(graph: Planted, sizes: tuple[int, int, int], out: Path) -> None:
    """``graph`` in OGB's node-property layout (gzip level 1), written chunk by chunk."""
    raw, split = out / "raw", out / "split" / "random"
    raw.mkdir(parents=True, exist_ok=True)
    split.mkdir(parents=True, exist_ok=True)

    def gz(path: Path):
        return gzip.open(path, "wt", compresslevel=1)

    with gz(raw / "num-node-list.csv.gz") as fh:
        fh.write(f"{graph.n}\n")
    with gz(raw / "num-edge-list.csv.gz") as fh:
        fh.write(f"{graph.e}\n")
    with gz(raw / "edge.csv.gz") as fh:
        for chunk in graph.edge_chunks():
            np.savetxt(fh, chunk, fmt="%d", delimiter=",")
    with gz(raw / "node-feat.csv.gz") as fh:
        for a in range(0, graph.n, 65536):
            np.savetxt(fh, graph.feature_rows(a, min(a + 65536, graph.n)), fmt="%.4f", delimiter=",")
    with gz(raw / "node-label.csv.gz") as fh:
        np.savetxt(fh, graph.labels[:, None], fmt="%d")
    for name, ids in graph.splits(sizes).items():
        with gz(split / f"{name}.csv.gz") as fh:
            np.savetxt(fh, ids[:, None], fmt="%d")


def write_store(graph: Planted, sizes: tuple[int, int, int], out: Path) -> None:
    """``graph`` straight into a store folder (:mod:`cdeq.tasks.graphs.store`), chunk by chunk."""
    from cdeq.tasks.graphs.store import StoreWriter, build_csr

    with StoreWriter(out) as writer:
        nnz = build_csr(graph.edge_chunks, graph.n, writer)
        feats = writer.array("features", np.float32, (graph.n, graph.f))
        for a in range(0, graph.n, 65536):
            b = min(a + 65536, graph.n)
            feats[a:b] = graph.feature_rows(a, b)
        feats.flush()
        del feats
        writer.save("labels", graph.labels, np.int64)
        splits = graph.splits(sizes)
        for name, ids in splits.items():
            writer.save(name, ids, np.int64)
        writer.finish({"source": f"synthetic planted partition ({graph.n} nodes)", "num_nodes": graph.n,
                       "input_edges": graph.e, "nnz": nnz, "num_features": graph.f,
                       "num_classes": graph.c, "splits": {k: len(v) for k, v in splits.items()}})


def write_images(out: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", count), ("test", max(10, count // 5))):
        for c in range(10):
            folder = out / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n // 10):
                base = np.full((32, 32, 3), 20 * c, dtype=np.float32)
                img = np.clip(base + rng.normal(0, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=75)


def write_tokens(out: Path, count: int, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train.bin", count), ("val.bin", max(10_000, count // 20)),
                    ("test.bin", max(10_000, count // 20))):
        with open(out / name, "wb") as fh:
            for a in range(0, n, 1 << 24):
                ids = np.minimum(rng.zipf(1.3, min(1 << 24, n - a)) - 1, 8191).astype(np.uint16)
                fh.write(ids.tobytes())
    (out / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 8192}))


# --- measuring ---------------------------------------------------------------------------------------
def run_child(args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``python -m cdeq.cli ARGS`` in a fresh process: wall time and its peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cdeq.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode:
        raise RuntimeError(f"cdeq {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak / 1024, "peak_rss_is_new_max": peak > before,
            "log": proc.stdout[-4000:]}


def module_meta(run: Path, name: str) -> dict:
    """The metadata a stage saved with ``run/NAME.safetensors`` (training time, work)."""
    from cdeq.engine.io import load_tensors

    return load_tensors(run / f"{name}.safetensors", kind=name)[1]


def machine() -> dict:
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}


def bench_images(base: int, work: Path) -> dict:
    rows = []
    for count in (base, 10 * base):
        data = work / f"images{count}"
        t0 = time.perf_counter()
        write_images(data, count)
        gen = time.perf_counter() - t0
        out = work / f"run-images{count}"
        res = run_child(["train", "images", "--quick", "--data", str(data), "--out", str(out), "--set",
                         "threads=1", "task_config.train_subset=0", "task_config.test_subset=0",
                         "task_config.workers=2", "teacher.epochs=1"])
        meta = module_meta(out, "teacher")
        rows.append({"images": count, "generate_s": gen, "train_s": meta["train_time_s"], **res})
        shutil.rmtree(data)
    return {"part": "images", "rows": rows}


def bench_text(base: int, work: Path) -> dict:
    rows = []
    for count in (base, 10 * base):
        data = work / f"tokens{count}"
        write_tokens(data, count)
        out = work / f"run-tokens{count}"
        res = run_child(["train", "text", "--quick", "--data", str(data), "--out", str(out), "--set",
                         "task_config.max_train_tokens=0", "task_config.max_eval_tokens=0",
                         "task_config.epoch_windows=512", "task_config.eval_windows=64",
                         "teacher.epochs=1"])
        meta = module_meta(out, "teacher")
        size = sum(p.stat().st_size for p in data.glob("*.bin"))
        rows.append({"tokens": count, "bytes": size, "train_s": meta["train_time_s"], **res})
        shutil.rmtree(data)
    return {"part": "text", "rows": rows}


def bench_graph(size: str, limit: int, work: Path, keep: Path | None) -> dict:
    spec = SIZES[size]
    graph = Planted(spec["nodes"], spec["edges"], spec["features"], spec["classes"])
    data = keep or work / f"ogb-{size}"
    t0 = time.perf_counter()
    gen_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if size == "arxiv":
        if not (data / "raw").exists():
            write_ogb_folder(graph, spec["splits"], data)
    elif not (data / "meta.json").exists():
        write_store(graph, spec["splits"], data)
    gen = {"generate_s": time.perf_counter() - t0,
           "generate_peak_rss_mb": max(gen_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024}
    out = work / f"run-{size}"
    env = {"CDEQ_CACHE": str(work / "cache")}
    parse = None
    if size == "arxiv":  # the OGB reader alone, so its peak is known apart from training
        code = ("import sys; from cdeq.tasks.graphs import load_ogb; load_ogb(sys.argv[1])")
        t0 = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        subprocess.run([sys.executable, "-c", code, str(data)], check=True, env={**os.environ, **env})
        parse = {"parse_s": time.perf_counter() - t0,
                 "parse_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                 "parse_peak_is_new_max": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss > before}
    sets = [f"task_config.epoch_batches={limit}", f"task_config.record_batches={limit}",
            f"task_config.eval_batches={max(1, limit // 4)}", "task_config.gap_batches=1",
            "teacher.epochs=1", "distill.epochs=2", "threads=2"]
    res = run_child(["run", "ogbn", "--data", str(data), "--out", str(out), "--set", *sets], env=env)
    return {"part": f"graph-{size}", "size": spec, "limit": limit, "settings": sets, **gen,
            **(parse or {}), **res, **summarise(out, spec["splits"][0])}


def summarise(out: Path, train_nodes: int) -> dict:
    """The figures of an ``ogbn`` run directory: stage times, the projected teacher epoch, the
    metric of every method at 1 call, the subgraph gap."""
    from cdeq.tasks.graphs import OgbnConfig

    teacher, student = module_meta(out, "teacher"), module_meta(out, "student")
    report = json.loads((out / "report.json").read_text())
    cfg = OgbnConfig.from_dict(json.loads((out / "config.json").read_text())["task_config"])
    full_batches = -(-train_nodes // cfg.batch_nodes)
    per_batch = teacher["train_time_s"] / max(1, teacher["work"]["steps"])
    return {"teacher_train_s": teacher["train_time_s"], "teacher_epochs": teacher["work"]["epochs"],
            "teacher_s_per_batch": per_batch, "teacher_epoch_s_projected": per_batch * full_batches,
            "batches_per_epoch": full_batches, "distill_s": student["train_time_s"],
            "distill_s_per_batch": student["train_time_s"] / max(1, student["work"]["distill"]["steps"]),
            "subgraph_gap": report["data"]["subgraph_gap"], "store": report["data"]["store"],
            "teacher_metric": report["teacher"]["metric"], "teacher_nfe": report["teacher"]["nfe"],
            "methods_at_1": {k: v.get("1") for k, v in report["methods"].items()},
            "relative_error_at_1": {k: v.get("1") for k, v in report["relative_error"].items()},
            "methods": report["methods"], "splits": report["splits"],
            "task_config": dataclasses.asdict(cfg)}


def arxiv_run(work: Path, keep: Path | None) -> dict:
    """``cdeq run ogbn`` with the default settings on the ogbn-arxiv-sized graph in OGB's layout
    (parsing included: a fresh cache)."""
    spec = SIZES["arxiv"]
    data = keep or work / "ogb-arxiv"
    if not (data / "raw").exists():
        write_ogb_folder(Planted(spec["nodes"], spec["edges"], spec["features"], spec["classes"]),
                         spec["splits"], data)
    out = work / "run-arxiv-defaults"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = run_child(["run", "ogbn", "--data", str(data), "--out", str(out)],
                    env={"CDEQ_CACHE": str(work / "cache-defaults"), "OMP_NUM_THREADS": ""})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"part": "arxiv-run", "command": "cdeq run ogbn --data DIR", **res, "cpu_s": cpu,
            **summarise(out, spec["splits"][0])}


SAMPLERS = [((5, 5), "full"), ((10, 5), "full"), ((10, 5), "sub"), ((15, 10), "full")]


def sampler_child(data: str, fanouts: str, norm: str, batches: int, out: str) -> None:
    """One sampler setting: a teacher trained for ``batches`` batches with it (the preset's other
    settings), then its validation figures on sampled subgraphs against the full graph."""
    import torch

    from cdeq.run.config import build_config
    from cdeq.run.teacher import configure_teacher, train_teacher
    from cdeq.tasks.graphs import OgbnConfig, OgbnTask

    fan = tuple(int(v) for v in fanouts.split(",")) if fanouts else ()
    config = build_config("ogbn", {"task_config": {"data": data, "fanouts": list(fan), "norm": norm,
                                                   "epoch_batches": batches}})
    task = OgbnTask(OgbnConfig.from_dict(config.task_config))
    torch.manual_seed(0)
    model = task.build_model()
    teacher_cfg = config.teacher.replace(epochs=1)
    t0 = time.perf_counter()
    train_teacher(task, model, teacher_cfg, seed=0)
    train_s = time.perf_counter() - t0
    configure_teacher(model, teacher_cfg)
    model.eval()
    gap = task.full_graph_gap(model, model.deq.eval_solver, batches=4)
    nodes = [x[0].shape[0] for x, _ in task.validation_batches(1)][:4]
    Path(out).write_text(json.dumps({"fanouts": list(fan), "norm": norm, "train_batches": batches,
                                     "train_s_per_batch": train_s / batches, "eval_nodes_per_batch":
                                     float(np.mean(nodes)), "valid": gap["valid"],
                                     "full_solve": gap["full_solve"]}))


def bench_sampler(size: str, limit: int, work: Path, keep: Path | None) -> dict:
    """The sampler settings compared on validation data (the defaults' choice)."""
    spec = SIZES[size]
    data = keep or work / f"ogb-{size}"
    if not (data / "raw").exists():
        write_ogb_folder(Planted(spec["nodes"], spec["edges"], spec["features"], spec["classes"]),
                         spec["splits"], data)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CDEQ_CACHE": str(work / "cache")}
    for fanouts, norm in SAMPLERS:
        out = work / f"sampler-{'-'.join(map(str, fanouts))}-{norm}.json"
        subprocess.run([sys.executable, __file__, "_sampler_child", str(data), ",".join(map(str, fanouts)),
                        norm, str(limit), str(out)], check=True, env=env)
        rows.append(json.loads(out.read_text()))
    return {"part": f"sampler-{size}", "rows": rows}


def table(result: dict) -> str:
    if result["part"].startswith("sampler"):
        lines = ["| fanouts | norm | train s/batch | nodes/eval batch | valid acc sampled | valid acc full "
                 "| agreement | rel. error to full z* |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['fanouts']} | {r['norm']} | {r['train_s_per_batch']:.2f} | "
                  f"{r['eval_nodes_per_batch']:.0f} | {r['valid']['accuracy_sampled']:.4f} | "
                  f"{r['valid']['accuracy_full']:.4f} | {r['valid']['agreement']:.4f} | "
                  f"{r['valid']['relative_error']:.4f} |" for r in result["rows"]]
        return "\n".join(lines)
    part = result["part"]
    if part in ("images", "text"):
        key = "images" if part == "images" else "tokens"
        lines = [f"| {key} | peak RSS (MB) | wall (s) |", "|---|---|---|"]
        lines += [f"| {r[key]:,} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.0f} |" for r in result["rows"]]
        return "\n".join(lines)
    gap = result["subgraph_gap"]
    if part == "arxiv-run":
        at1 = result["methods_at_1"]
        return "\n".join([
            "| wall (min) | CPU (min) | peak RSS (MB) | converged teacher | teacher @1 call (Picard/Anderson/"
            "Broyden) | C-DEQ @1 call | C-DEQ @2 | test acc sampled / full (gap batches) |",
            "|---|---|---|---|---|---|---|---|",
            f"| {result['wall_s'] / 60:.0f} | {result['cpu_s'] / 60:.1f} | {result['peak_rss_mb']:.0f} | "
            f"{result['teacher_metric']:.4f} | {at1['picard']:.4f} / {at1['anderson']:.4f} / "
            f"{at1['broyden']:.4f} | {at1['cdeq']:.4f} | {result['methods']['cdeq']['2']:.4f} | "
            f"{gap['test']['accuracy_sampled']:.4f} / {gap['test']['accuracy_full']:.4f} |"])
    rss = "n/a" if result.get("peak_rss_mb") is None else f"{result['peak_rss_mb']:.0f}"
    return "\n".join([
        "| graph | peak RSS (MB) | teacher s/batch | projected teacher epoch (s) | valid acc sampled / full "
        "| rel. error to full z* |", "|---|---|---|---|---|---|",
        f"| {part} | {rss} | {result['teacher_s_per_batch']:.2f} | "
        f"{result['teacher_epoch_s_projected']:.0f} | {gap['valid']['accuracy_sampled']:.3f} / "
        f"{gap['valid']['accuracy_full']:.3f} | {gap['valid']['relative_error']:.3f} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if sys.argv[1:2] == ["--table"]:
        for path in sorted(RESULTS.glob("large_data_*.json")):
            result = json.loads(path.read_text())
            if "part" in result:
                print(f"`{path.relative_to(RESULTS.parent.parent)}`:\n\n{table(result)}\n")
        return
    if sys.argv[1:2] == ["_sampler_child"]:
        sampler_child(*sys.argv[2:5], int(sys.argv[5]), sys.argv[6])
        return
    parser.add_argument("parts", nargs="+",
                        choices=["images", "text", "graph", "sampler", "arxiv-run", "generate"])
    parser.add_argument("--images", type=int, default=2000, help="images of the smaller folder")
    parser.add_argument("--tokens", type=int, default=50_000_000, help="ids of the smaller corpus")
    parser.add_argument("--size", choices=sorted(SIZES), default="arxiv")
    parser.add_argument("--limit", type=int, default=16, help="graph: batches an epoch")
    parser.add_argument("--out", help="generate: the folder; graph: keep the generated data here")
    parser.add_argument("--work", help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="cdeq-large-"))
    try:
        for part in args.parts:
            if part == "generate":
                spec = SIZES[args.size]
                graph = Planted(spec["nodes"], spec["edges"], spec["features"], spec["classes"])
                (write_ogb_folder if args.size == "arxiv" else write_store)(graph, spec["splits"],
                                                                            Path(args.out))
                continue
            if part == "images":
                result = bench_images(args.images, work)
            elif part == "text":
                result = bench_text(args.tokens, work)
            elif part == "arxiv-run":
                result = arxiv_run(work, Path(args.out) if args.out else None)
            elif part == "sampler":
                result = bench_sampler(args.size, args.limit, work, Path(args.out) if args.out else None)
            else:
                result = bench_graph(args.size, args.limit, work, Path(args.out) if args.out else None)
            result["machine"] = machine()
            name = part if part in ("images", "text") else "arxiv_run" if part == "arxiv-run" \
                else f"{part}_{args.size}"
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"large_data_{name}.json").write_text(json.dumps(result, indent=1))
            print(table(result))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
