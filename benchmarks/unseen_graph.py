"""A citation-like graph that cdeq was never tuned on, to check the graph defaults on new data.

Usage::

    python benchmarks/unseen_graph.py --out runs/unseen/csbm.pt \
        --difficulty benchmarks/results/unseen_graph.json
    cdeq run planetoid --data runs/unseen/csbm.pt --seeds 3 --out runs/unseen/csbm --set threads=1

The graph is a contextual stochastic block model drawn from a fixed seed: ``--nodes`` nodes in
``--classes`` classes of uneven size; each node has a few undirected edges, a share
``--homophily`` of them inside its class; its features are a sparse bag of ``--words``-word
vocabulary drawn from a mixture of its class's topic and a shared background, so neither the
features nor the edges alone give the label. The masks follow the Planetoid recipe: 20 labelled
training nodes per class, 500 validation nodes and 1,000 test nodes. It is written as a ``.pt``
dict of tensors (``x`` sparse, ``edge_index``, ``y`` and the three masks), the format the
``planetoid`` task reads. ``--difficulty`` adds a logistic regression on the features alone
and on twice-propagated features (no cdeq in it), the check its difficulty was set by.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cdeq.tasks.graphs.data import normalized_adjacency, normalized_features


def make_graph(nodes: int, classes: int, words: int, degree: float, homophily: float,
               topic_share: float, seed: int) -> dict[str, torch.Tensor]:
    """The graph as a dict of tensors: ``x`` ``(N, words)`` sparse binary, ``edge_index``
    ``(2, E)`` both directions, ``y`` ``(N,)``, boolean masks ``(N,)``."""
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(classes, 4.0))
    y = rng.choice(classes, size=nodes, p=sizes)
    inside = [np.flatnonzero(y == c) for c in range(classes)]
    outside = [np.flatnonzero(y != c) for c in range(classes)]
    src = rng.integers(0, nodes, size=int(nodes * degree / 2))
    same = rng.random(src.size) < homophily
    dst = np.empty_like(src)
    for i, (s, within) in enumerate(zip(src, same, strict=True)):
        dst[i] = rng.choice(inside[y[s]] if within else outside[y[s]])
    keep = src != dst
    edges = np.stack([src[keep], dst[keep]])
    edges = np.concatenate([edges, edges[::-1]], axis=1)
    topics = rng.dirichlet(np.full(words, 0.05), size=classes)
    background = rng.dirichlet(np.full(words, 1.0))
    rows, cols = [], []
    for v in range(nodes):
        n_words = max(1, rng.poisson(18))
        from_topic = rng.random(n_words) < topic_share
        picks = np.where(from_topic, rng.choice(words, n_words, p=topics[y[v]]),
                         rng.choice(words, n_words, p=background))
        picks = np.unique(picks)
        rows.extend([v] * picks.size)
        cols.extend(picks.tolist())
    x = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.ones(len(rows)), (nodes, words)).coalesce()
    order = rng.permutation(nodes)
    train = np.concatenate([order[y[order] == c][:20] for c in range(classes)])
    rest = np.setdiff1d(order, train, assume_unique=True)
    rest = rest[rng.permutation(rest.size)]
    masks = {}
    for name, idx in (("train_mask", train), ("val_mask", rest[:500]), ("test_mask", rest[500:1500])):
        m = torch.zeros(nodes, dtype=torch.bool)
        m[torch.as_tensor(idx)] = True
        masks[name] = m
    return {"x": x, "edge_index": torch.as_tensor(edges, dtype=torch.long),
            "y": torch.as_tensor(y, dtype=torch.long), **masks}


def difficulty(graph: dict[str, torch.Tensor], steps: int = 300) -> dict[str, dict[str, float]]:
    """Test accuracy of a logistic regression on the row-normalised features ``X`` and on
    ``A^2 X`` (``A``: the symmetric-normalised adjacency with self-loops), each at the step with
    the best validation accuracy: how much the features and the edges tell, without cdeq."""
    torch.manual_seed(0)
    y = graph["y"]
    x = normalized_features(graph["x"]).to_dense()
    adj = normalized_adjacency(graph["edge_index"], y.numel())
    train, valid, test = graph["train_mask"], graph["val_mask"], graph["test_mask"]
    out = {}
    for name, feats in (("features", x), ("propagated_twice", adj @ (adj @ x))):
        w = torch.zeros(feats.shape[1], int(y.max()) + 1, requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.05, weight_decay=5e-4)
        best = (-1.0, 0.0)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(feats[train] @ w, y[train]).backward()
            opt.step()
            with torch.no_grad():
                hit = (feats @ w).argmax(1) == y
            score = (float(hit[valid].float().mean()), float(hit[test].float().mean()))
            best = max(best, score, key=lambda v: v[0])
        out[name] = {"valid": best[0], "test": best[1]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/unseen/csbm.pt")
    parser.add_argument("--nodes", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--words", type=int, default=800)
    parser.add_argument("--degree", type=float, default=4.0, help="mean degree")
    parser.add_argument("--homophily", type=float, default=0.75)
    parser.add_argument("--topic-share", type=float, default=0.15,
                        help="share of a node's words drawn from its class's topic")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--difficulty", default="",
                        help="also write the logistic-regression accuracies to this JSON file")
    args = parser.parse_args()
    if args.nodes < 1500 + 20 * args.classes:
        parser.error(f"--nodes {args.nodes} is too few for 20 per class + 500 + 1000 labelled nodes")
    graph = make_graph(args.nodes, args.classes, args.words, args.degree, args.homophily,
                       args.topic_share, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(graph, tmp)
    tmp.replace(out)
    same = (graph["y"][graph["edge_index"][0]] == graph["y"][graph["edge_index"][1]]).float().mean()
    print(f"wrote {out}: {args.nodes} nodes, {graph['edge_index'].shape[1] // 2} edges (homophily "
          f"{same:.2f}), {graph['x']._nnz()} feature entries, {args.classes} classes")
    if args.difficulty:
        result = {"graph": {k: v for k, v in vars(args).items() if k not in ("out", "difficulty")},
                  "homophily_measured": float(same), "logistic_regression": difficulty(graph)}
        Path(args.difficulty).write_text(json.dumps(result, indent=1) + "\n")
        for name, acc in result["logistic_regression"].items():
            print(f"logistic regression on {name}: valid {acc['valid']:.3f}, test {acc['test']:.3f}")


if __name__ == "__main__":
    main()
