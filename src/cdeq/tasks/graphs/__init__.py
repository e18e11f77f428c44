"""Graph node classification with implicit GNNs (IGNN): tasks ``cora``, ``facebook``, ``planetoid``.

- :mod:`.data`: the :class:`Graph`, its batches, splits and perturbations.
- :mod:`.readers`: Planetoid pickles, Facebook Page-Page, saved graphs.
- :mod:`.model`: the IGNN injection, equilibrium cell (``||W||_inf <= kappa``) and node head.
- :mod:`.task`: the :class:`~cdeq.tasks.base.Task` subclasses, registered by name.
- :mod:`.ogb`, :mod:`.store`, :mod:`.sampler`, :mod:`.full`, :mod:`.ogbn`: large graphs (OGB's
  layout parsed once into memory-mapped arrays, trained on sampled subgraphs; task ``ogbn``).
- :mod:`.presets`: each task's run defaults, as data.
"""

from .data import Graph, GraphDataError, graph_batch, normalized_adjacency, perturb_graph, random_split
from .model import GraphInjection, IGNNCell, NodeHead, constrain_inf_norm
from .ogb import load_ogb
from .ogbn import OgbnConfig, OgbnTask
from .readers import load_facebook, load_planetoid, load_saved_graph
from .sampler import NeighbourSampler
from .store import GraphStore
from .task import CoraTask, FacebookTask, GraphConfig, GraphTask, PlanetoidConfig, PlanetoidTask, SplitConfig

__all__ = [
    "CoraTask",
    "FacebookTask",
    "Graph",
    "GraphConfig",
    "GraphDataError",
    "GraphInjection",
    "GraphStore",
    "GraphTask",
    "IGNNCell",
    "NeighbourSampler",
    "NodeHead",
    "OgbnConfig",
    "OgbnTask",
    "PlanetoidConfig",
    "PlanetoidTask",
    "SplitConfig",
    "constrain_inf_norm",
    "graph_batch",
    "load_facebook",
    "load_ogb",
    "load_planetoid",
    "load_saved_graph",
    "normalized_adjacency",
    "perturb_graph",
    "random_split",
]
