"""Graph node classification with implicit GNNs (IGNN): tasks ``cora``, ``facebook``, ``planetoid``.

- :mod:`.data`: the :class:`Graph`, its batches, splits and perturbations.
- :mod:`.readers`: Planetoid pickles, Facebook Page-Page, saved graphs.
- :mod:`.model`: the IGNN injection, equilibrium cell (``||W||_inf <= kappa``) and node head.
- :mod:`.task`: the :class:`~cdeq.tasks.base.Task` subclasses, registered by name.
- :mod:`.presets`: each task's run defaults, as data.
"""

from .data import Graph, GraphDataError, graph_batch, normalized_adjacency, perturb_graph, random_split
from .model import GraphInjection, IGNNCell, NodeHead, constrain_inf_norm
from .readers import load_facebook, load_planetoid, load_saved_graph
from .task import CoraTask, FacebookTask, GraphConfig, GraphTask, PlanetoidConfig, PlanetoidTask, SplitConfig

__all__ = [
    "CoraTask",
    "FacebookTask",
    "Graph",
    "GraphConfig",
    "GraphDataError",
    "GraphInjection",
    "GraphTask",
    "IGNNCell",
    "NodeHead",
    "PlanetoidConfig",
    "PlanetoidTask",
    "SplitConfig",
    "constrain_inf_norm",
    "graph_batch",
    "load_facebook",
    "load_planetoid",
    "load_saved_graph",
    "normalized_adjacency",
    "perturb_graph",
    "random_split",
]
