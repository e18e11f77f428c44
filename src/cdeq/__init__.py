"""cdeq: deep equilibrium models and their consistency-distilled (C-DEQ) students."""

from .config import Config, ConfigError
from .deq import DEQ, DEQModel, ImplicitBackward, JacobianFreeBackward, PhantomBackward, SolverSpec
from .solvers import Solver, SolverResult, get_solver, register_solver

__version__ = "0.1.0"

__all__ = [
    "DEQ",
    "DEQModel",
    "Config",
    "ConfigError",
    "ImplicitBackward",
    "JacobianFreeBackward",
    "PhantomBackward",
    "Solver",
    "SolverResult",
    "SolverSpec",
    "get_solver",
    "register_solver",
]
