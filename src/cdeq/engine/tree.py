"""Structured states: a state ``z`` (or an injection ``u``) is a tensor or any nested tuple / list /
dict of tensors (a pytree, as ``torch.utils._pytree`` defines it), each part ``(B, ...)`` with the
same batch size ``B``.

What the rest of cdeq needs of such a state lives here, on top of PyTorch's pytree utilities:

- :class:`Layout`: the parts' names, per-sample shapes and dtypes, and the map between the state
  and one ``(B, N)`` working matrix (the parts flattened and concatenated, in pytree order), which
  the solvers iterate on. For a single tensor it is ``z.reshape(B, -1)`` and back, the same
  operations as before states could be structured, so a tensor state gives bit-identical results;
  unpacking a working matrix gives views, not copies.
- :meth:`Layout.check`: a map's output against the state it was given, with an error naming the
  part, what was expected and what came back.
- :func:`squared_norms`, :func:`relative_error`: per-sample sums over all parts, so a structured
  state has one residual and one error to ``z*``:
  ``error = sqrt(sum_parts |z_p - ref_p|^2) / sqrt(sum_parts |ref_p|^2)`` per sample.

Examples:
    >>> import torch
    >>> z = (torch.ones(2, 3), {"c": torch.zeros(2, 4, 5)})
    >>> layout = Layout.of(z)
    >>> layout.names, layout.shapes
    (['[0]', "[1]['c']"], [(3,), (4, 5)])
    >>> flat = layout.pack(z)
    >>> flat.shape, layout.unpack(flat)[1]["c"].shape
    (torch.Size([2, 23]), torch.Size([2, 4, 5]))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

__all__ = ["Layout", "batch_size", "is_structured", "leaves", "part_names", "relative_error",
           "squared_norms", "tree_map", "zeros_like"]

tree_map = pytree.tree_map
leaves = pytree.tree_leaves


def is_structured(z: Any) -> bool:
    """Whether ``z`` is a structure of tensors rather than one tensor."""
    return not isinstance(z, Tensor)


def part_names(tree: Any) -> list[str]:
    """The name of each leaf of ``tree`` in pytree order: ``"[0]"``, ``"['fine']"``, ``"[1]['c']"``
    (``""`` for a lone tensor)."""
    return [pytree.keystr(path) for path, _ in pytree.tree_flatten_with_path(tree)[0]]


def _named(name: str, what: str) -> str:
    return f"{what}{name}" if name else what


def check_tensors(tree: Any, what: str = "state") -> list[Tensor]:
    """The leaves of ``tree``; ``TypeError`` naming a leaf that is not a tensor, ``ValueError`` for
    an empty structure or parts of different batch sizes."""
    flat = pytree.tree_flatten_with_path(tree)[0]
    if not flat:
        raise ValueError(f"the {what} {tree!r} holds no tensor")
    for path, leaf in flat:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{_named(pytree.keystr(path), what)} is a {type(leaf).__name__}, not a "
                            "tensor: every part of a state must be a tensor (B, ...)")
    out = [leaf for _, leaf in flat]
    sizes = {int(t.shape[0]) if t.dim() else None for t in out}
    if len(out) > 1 and (None in sizes or len(sizes) > 1):
        shown = ", ".join(f"{_named(pytree.keystr(p), what)}: {tuple(t.shape)}" for p, t in flat)
        raise ValueError(f"the parts of the {what} must share their leading (batch) dimension; got "
                         f"{shown}")
    return out


def batch_size(tree: Any) -> int:
    """The leading dimension of the first tensor of ``tree``."""
    return int(leaves(tree)[0].shape[0])


def zeros_like(tree: Any) -> Any:
    """Zeros shaped like every part of ``tree``."""
    return tree_map(torch.zeros_like, tree)


def squared_norms(tree: Any) -> Tensor:
    """Per-sample squared norm ``(B,)`` summed over every part of ``tree``."""
    parts = leaves(tree)
    b = parts[0].shape[0]
    total = parts[0].reshape(b, -1).pow(2).sum(1)
    for p in parts[1:]:
        total = total + p.reshape(b, -1).pow(2).sum(1)
    return total


def relative(distance: Tensor, size: Tensor) -> Tensor:
    """The one relative-error formula of cdeq: ``distance / (size + 1e-12)`` per sample ``(B,)``
    (the norms of a difference and of its reference). The solvers' relative residual
    (``|f(z) - z| / |f(z)|``, :func:`cdeq.solvers.loop.residuals`) and :func:`relative_error` use
    it."""
    return distance / (size + 1e-12)


def relative_error(z: Any, ref: Any) -> Tensor:
    """Per-sample relative error ``(B,)`` of states ``(B, ...)`` (tensors or structures):
    ``sqrt(sum_parts |z_p - ref_p|^2) / sqrt(sum_parts |ref_p|^2)``; with ``ref = f(z)`` it is the
    relative residual of ``z`` (as the solvers compute it)."""
    if isinstance(z, Tensor):
        b = z.shape[0]
        return relative(torch.linalg.vector_norm((z - ref).reshape(b, -1), dim=1),
                        torch.linalg.vector_norm(ref.reshape(b, -1), dim=1))
    diff = tree_map(torch.sub, z, ref)
    return relative(squared_norms(diff).sqrt(), squared_norms(ref).sqrt())


@dataclasses.dataclass(frozen=True)
class Layout:
    """The structure of a state: its pytree spec and, per part, name, per-sample shape and dtype.

    Build it with :meth:`of`. ``single``: the state is one tensor (the fast path: packing is a
    reshape)."""

    spec: Any
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]

    @classmethod
    def of(cls, z: Any, what: str = "state") -> Layout:
        """The layout of the state ``z`` (checked: tensors sharing a batch size)."""
        if isinstance(z, Tensor):
            return cls(None, [""], [tuple(z.shape[1:])], [z.dtype])
        parts = check_tensors(z, what)
        spec = pytree.tree_structure(z)
        return cls(spec, part_names(z), [tuple(p.shape[1:]) for p in parts], [p.dtype for p in parts])

    def __deepcopy__(self, memo: dict) -> Layout:
        return self  # immutable (a module holding one, such as a DEQModel, may be deep-copied)

    @property
    def single(self) -> bool:
        return self.spec is None

    @property
    def sizes(self) -> list[int]:
        """Elements per sample of each part."""
        return [int(torch.Size(s).numel()) for s in self.shapes]

    def describe(self) -> list[dict[str, Any]]:
        """The parts as JSON data: name, per-sample shape and dtype."""
        return [{"name": n, "shape": list(s), "dtype": str(d).removeprefix("torch.")}
                for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)]

    def leaves(self, z: Any) -> list[Tensor]:
        return [z] if self.single else pytree.tree_leaves(z)

    def unflatten(self, parts: Sequence[Any]) -> Any:
        """The state (or any values laid out like it) from one value per part."""
        return parts[0] if self.single else pytree.tree_unflatten(list(parts), self.spec)

    def map(self, fn: Callable[..., Any], *trees: Any) -> Any:
        """``fn`` applied part by part to states of this layout (``tree_map``)."""
        if self.single:
            return fn(*trees)
        return pytree.tree_unflatten([fn(*xs) for xs in zip(*(self.leaves(t) for t in trees),
                                                           strict=True)], self.spec)

    def pack(self, z: Any) -> Tensor:
        """``(B, N)``: every part flattened per sample and concatenated (a view for one tensor)."""
        if self.single:
            return z.reshape(z.shape[0], -1)
        parts = self.leaves(z)
        b = parts[0].shape[0]
        dtype = self.working_dtype(parts)
        return torch.cat([p.reshape(b, -1).to(dtype) for p in parts], dim=1)

    @staticmethod
    def working_dtype(parts: Sequence[Tensor]) -> torch.dtype:
        dtype = parts[0].dtype
        for p in parts[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def unpack(self, flat: Tensor, dtypes: bool = False) -> Any:
        """The state from a ``(B, N)`` working matrix: views of it (``dtypes``: each part cast
        back to its own dtype, a copy only where the dtype differs)."""
        b = flat.shape[0]
        if self.single:
            out = flat.reshape(b, *self.shapes[0])
            return out.to(self.dtypes[0]) if dtypes else out
        chunks = torch.split(flat, self.sizes, dim=1)
        parts = [c.reshape(b, *s) for c, s in zip(chunks, self.shapes, strict=True)]
        if dtypes:
            parts = [p.to(d) for p, d in zip(parts, self.dtypes, strict=True)]
        return pytree.tree_unflatten(parts, self.spec)

    def check(self, out: Any, batch: int, what: str = "the fixed-point map",
              autocast: bool = False) -> None:
        """``out`` must be a state of this layout with batch size ``batch``: the same structure,
        each part of the same shape and (unless ``autocast``, or for a lone tensor) dtype;
        ``ValueError``/``TypeError`` naming the part otherwise."""
        if self.single:
            if not isinstance(out, Tensor) or tuple(out.shape) != (batch, *self.shapes[0]):
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"{what} must return a tensor shaped like its input z "
                                 f"{(batch, *self.shapes[0])}, got {got}")
            return
        try:
            flat = pytree.tree_flatten_with_path(out)[0]
            spec = pytree.tree_structure(out)
        except Exception as err:  # noqa: BLE001 - reported below
            raise ValueError(f"{what} returned a {type(out).__name__} that is not a structure of "
                             f"tensors ({err})") from err
        if spec != self.spec:
            raise ValueError(f"{what} must return a state of the structure it was given, "
                             f"{pytree.treespec_pprint(self.spec)} (parts {self.names}), got "
                             f"{pytree.treespec_pprint(spec)} (parts "
                             f"{[pytree.keystr(p) for p, _ in flat]})")
        for (path, leaf), shape, dtype in zip(flat, self.shapes, self.dtypes, strict=True):
            name = _named(pytree.keystr(path), "z")
            if not isinstance(leaf, Tensor):
                raise TypeError(f"{what} returned a {type(leaf).__name__} as the part {name}; every "
                                "part of a state must be a tensor")
            if tuple(leaf.shape) != (batch, *shape):
                raise ValueError(f"{what} returned the part {name} of shape {tuple(leaf.shape)}; "
                                 f"the state's part {name} has shape {(batch, *shape)}")
            if not (leaf.is_floating_point() or leaf.is_complex()) or (
                    not autocast and leaf.dtype != dtype):
                raise ValueError(f"{what} returned the part {name} as {leaf.dtype}; the state's "
                                 f"part {name} is {dtype}")
