"""The shared machinery of all fixed-point solvers: options, the result type and the loop.

A solver finds ``z`` with ``z = f(z, x)`` for a batch ``z`` of shape ``(B, ...)``. Every sample
stops on its own: once its residual is under the tolerance (or its iterate is not finite) it is
frozen, ``f`` is no longer evaluated on it and it stops counting function evaluations (NFE).

Subclasses implement only the update rule (:meth:`Solver.init_state`, :meth:`Solver.step`);
the loop, stopping, best-iterate tracking and trajectory recording live in :mod:`.loop`. An update
rule should not synchronise with the host (no ``bool(tensor)``, ``.item()`` or ``nonzero``), so
that with ``check_every > 1`` a GPU can run ahead.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..engine.config import Config, ConfigError, check_choice, check_int, check_positive
from ..engine.tree import check_tensors, part_names
from . import loop
from .loop import NonFiniteError, SolverResult, take_rows  # noqa: F401  (re-exported)

FixedPointFn = Callable[..., Any]
"""``f(z, x) -> z'`` with ``z`` of shape ``(B, ...)`` (or a structure of such tensors, returned in
the same structure); ``x`` may be omitted (``None``)."""

Record = str | Sequence[int] | None


@dataclasses.dataclass
class SolverOptions(Config):
    """Options common to every solver.

    Attributes:
        max_iter: the most evaluations of ``f`` per sample (the NFE budget).
        tol: stop a sample once its residual is at most this.
        stop_mode: ``"rel"`` (``|f(z)-z| / |f(z)|``) or ``"abs"`` (``|f(z)-z|``).
        compact: evaluate ``f`` only on the samples still running (saves time; needs a
            layer without cross-sample interaction, true of every per-sample layer), which
            changes the shapes ``f`` sees whenever samples stop. ``False``: per-sample stopping
            by masking alone: ``f`` always sees the whole batch (fixed shapes: CUDA graphs,
            ``torch.compile``), a stopped sample's row is computed and discarded, and the loop
            never asks which samples run (no ``nonzero``).
        check_every: look whether any sample still runs (a host synchronisation) only every
            this many iterations. Results and NFE do not depend on it; a larger value lets a GPU
            run ahead, at the cost of evaluating ``f`` on stopped samples until the next check
            (those evaluations are not counted) and up to ``check_every - 1`` extra iterations.
            With ``compact=False`` and ``check_every >= max_iter`` a solve reads the device once,
            at its end.
        on_nonfinite: when a sample's iterate or value becomes NaN/inf: ``"warn"`` (once per
            solve, naming the samples), ``"raise"`` (:class:`NonFiniteError`) or ``"ignore"``.
            The sample is flagged ``diverged`` in every case.
    """

    max_iter: int = 50
    tol: float = 1e-4
    stop_mode: str = "rel"
    compact: bool = True
    check_every: int = 1
    on_nonfinite: str = "warn"

    def validate(self) -> None:
        check_int("max_iter", self.max_iter, minimum=1)
        check_positive("tol", self.tol, allow_zero=True)
        check_choice("stop_mode", self.stop_mode, ["rel", "abs"])
        if not isinstance(self.compact, bool):
            raise ConfigError(f"compact={self.compact!r} is not valid; it must be true or false")
        check_int("check_every", self.check_every, minimum=1)
        check_choice("on_nonfinite", self.on_nonfinite, ["warn", "raise", "ignore"])


def _record_indices(record: Record, max_iter: int) -> list[int] | None:
    if record is None:
        return None
    if isinstance(record, str):
        if record != "all":
            raise ConfigError(f"record={record!r} is not valid; use 'all', a list of ints or None")
        return list(range(max_iter + 1))
    indices = [int(i) for i in record]
    bad = [i for i in indices if not 0 <= i <= max_iter]
    if bad or not indices:
        raise ConfigError(
            f"record indices {bad or indices} are not valid; each must lie in [0, {max_iter}]"
        )
    return sorted(set(indices))


class Solver:
    """Base class. Subclasses set ``name``, ``Options`` and the update rule.

    Examples:
        >>> import torch
        >>> solver = get_solver("picard", max_iter=100, tol=1e-8)
        >>> res = solver.solve(lambda z, x: 0.5 * z + x, torch.zeros(2, 3), torch.ones(2, 3))
        >>> torch.allclose(res.z, torch.full((2, 3), 2.0))
        True
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SolverOptions]] = SolverOptions

    def __init__(self, options: SolverOptions | dict | None = None, **overrides: Any) -> None:
        if isinstance(options, SolverOptions):
            if not isinstance(options, self.Options):
                raise ConfigError(
                    f"solver {self.name!r} takes {self.Options.__name__}, "
                    f"not {type(options).__name__}"
                )
            options = options.replace(**overrides) if overrides else options
        else:
            options = self.Options.from_dict(options, **overrides)
        self.options = options

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # --- the update rule -------------------------------------------------------------------
    def init_state(self, z0: Tensor) -> dict[str, Any]:
        """Per-solve state, given the flattened start ``(B, n)``."""
        return {}

    def step(self, state: dict[str, Any], it: int, z: Tensor, fz: Tensor, active: Tensor) -> Tensor:
        """Next iterate ``(B, n)`` from the current iterate ``z`` and its image ``fz``.

        ``active`` is the ``(B,)`` mask of samples still running; the loop keeps the iterate of
        every other sample as it is, so what the step returns (or stores) for them is ignored.
        Before the call the loop puts the residual ``fz - z`` in ``state["g"]``. Neither ``z`` nor
        ``fz`` may be modified in place (the loop keeps references to both).
        """
        raise NotImplementedError

    # --- the loop ----------------------------------------------------------------------------
    @torch.no_grad()
    def solve(
        self,
        f: FixedPointFn,
        z0: Any,
        x: Any = None,
        *,
        record: Record = None,
        max_iter: int | None = None,
    ) -> SolverResult:
        """Solve ``z = f(z, x)`` from ``z0`` of shape ``(B, ...)``, or from a tuple / list / dict of
        such tensors (a structured state: one residual per sample over all its parts).

        Args:
            f: the map; called as ``f(z, x)`` on the running samples only (rows of every
                tensor in ``x`` with leading dimension ``B`` are selected to match). It must not
                modify ``z`` in place, and must return a tensor it does not modify later.
            z0: ``(B, ...)`` start, or a structure of such tensors sharing ``B``; the result has
                its structure, devices and dtypes (a half-precision part is solved in float32).
            x: the input the map is conditioned on (tensor, tuple, dict or ``None``).
            record: ``None``, ``"all"`` or iterate indices to keep (see :class:`SolverResult`).
            max_iter: override the NFE limit for this call.

        Under autocast only ``f`` runs in low precision; the residuals and the update rule run
        in float32. The loop itself is :func:`cdeq.solvers.loop.run`.
        """
        limit = self.options.max_iter if max_iter is None else max_iter
        check_int("max_iter", limit, minimum=1)
        _check_start(z0)
        return loop.run(self, f, z0, x, _record_indices(record, limit), limit)

    __call__ = solve


def _check_start(z0: Any) -> None:
    if not isinstance(z0, Tensor):
        if isinstance(z0, (tuple, list, dict)) and z0:
            for name, part in zip(part_names(z0), check_tensors(z0, "z0"), strict=True):
                _check_part(part, f"z0{name}")
            return
        raise ValueError(f"z0 must be a tensor of shape (B, ...) with B >= 1, or a tuple, list or "
                         f"dict of such tensors, got {type(z0).__name__}")
    _check_part(z0, "z0")


def _check_part(z0: Tensor, name: str) -> None:
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"{name} must be a tensor of shape (B, ...) with B >= 1, got {tuple(z0.shape)}")
    if not (z0.is_floating_point() or z0.is_complex()):
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {z0.dtype}")


def _old_form(what: str) -> None:
    warnings.warn(f"naming a solver by {what} is deprecated; give its registered name (and options "
                  "as keywords) or a SolverSpec (SolverSpec.from_dict for a mapping read from a "
                  "file); the old form goes in the next release", DeprecationWarning, stacklevel=4)


# --- registry ----------------------------------------------------------------------------------
SOLVERS: dict[str, type[Solver]] = {}


def register_solver(cls: type[Solver]) -> type[Solver]:
    """Class decorator: make a solver available by ``cls.name`` to :func:`get_solver`.

    Raises:
        ValueError: ``cls.name`` is empty.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    SOLVERS[cls.name] = cls
    return cls


@dataclasses.dataclass
class SolverSpec(Config):
    """A solver named with its options: with a registered name (a string and keyword options),
    the one way to name a solver in cdeq's API. A configuration file or the command line writes
    it as a mapping (``{"name": "anderson", "max_iter": 30}``), read by :meth:`from_dict`.

    Attributes:
        name: a registered solver (``picard``, ``anderson``, ``broyden``, or one added with
            :func:`register_solver`).
        max_iter, tol, stop_mode: the common options (:class:`SolverOptions`).
        options: the solver's own options (e.g. Anderson's ``memory``) and the other common ones.
    """

    name: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-4
    stop_mode: str = "rel"
    options: dict = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        if self.name not in SOLVERS:
            raise ConfigError(f"solver name={self.name!r} is not valid; choose from {sorted(SOLVERS)}")
        check_int("max_iter", self.max_iter, minimum=1)
        check_positive("tol", self.tol, allow_zero=True)
        self.build()  # validates the solver-specific options

    def build(self, **overrides: Any) -> Solver:
        """The solver, with ``overrides`` of its options."""
        kwargs = {"max_iter": self.max_iter, "tol": self.tol, "stop_mode": self.stop_mode}
        kwargs.update(self.options)
        kwargs.update(overrides)
        return get_solver(self.name, **kwargs)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SolverSpec:
        """A spec from JSON that lists every option beside the name (as a saved pretrained
        directory does: ``{"name", "max_iter", "tol", ..., "memory"}``) or under ``options``."""
        data = dict(data)
        common = {k: data.pop(k) for k in ("name", "max_iter", "tol", "stop_mode") if k in data}
        return cls.from_dict({**common, "options": {**data.pop("options", {}), **data}})


def get_solver(spec: str | SolverSpec, **options: Any) -> Solver:
    """Build a solver from a registered name (``"anderson"``) and its options, or from a
    :class:`SolverSpec` (``options`` override its own).

    A dict ``{"name": ..., **options}`` or a built :class:`Solver` still work for one release, with
    a ``DeprecationWarning``: give a name or a spec (a mapping from a file: ``SolverSpec.from_dict``)."""
    if isinstance(spec, SolverSpec):
        return spec.build(**options)
    if isinstance(spec, Solver):
        _old_form("a built Solver")
        if options:
            return type(spec)(spec.options, **options)
        return spec
    if isinstance(spec, dict):
        _old_form("a dict")
        spec = dict(spec)
        if "name" not in spec:
            raise ConfigError(f"a solver dict needs a 'name' key; choose from {sorted(SOLVERS)}")
        name = spec.pop("name")
        spec.update(options)
        return get_solver(name, **spec)
    if spec not in SOLVERS:
        raise ConfigError(f"unknown solver {spec!r}; registered solvers: {sorted(SOLVERS)}")
    return SOLVERS[spec](**options)
