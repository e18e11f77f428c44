"""The DEQ layer, its backward strategies and regularisers."""

from .backward import (
    BACKWARDS,
    BackwardStrategy,
    ImplicitBackward,
    JacobianFreeBackward,
    PhantomBackward,
    get_backward,
    register_backward,
)
from .layer import DEQ, SolverSpec
from .regularizers import apply_weight_norm, jacobian_frobenius, spectral_radius

__all__ = [
    "BACKWARDS",
    "DEQ",
    "BackwardStrategy",
    "ImplicitBackward",
    "JacobianFreeBackward",
    "PhantomBackward",
    "SolverSpec",
    "apply_weight_norm",
    "get_backward",
    "register_backward",
    "jacobian_frobenius",
    "spectral_radius",
]

from .model import DEQModel  # noqa: E402

__all__ += ["DEQModel"]
