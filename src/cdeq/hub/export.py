"""Deployment: the one-step student as one static graph (``torch.export``, TorchScript).

:class:`OneStepStudent` wraps a student as ``x -> logits`` with exactly one layer call (the 1-NFE
plan) and no data-dependent control flow, so ``torch.export`` and ``torch.compile`` handle it;
:func:`export_one_step` writes it with ``torch.export`` (``.pt2``), falling back to TorchScript
tracing, together with the input shape it was exported for; :func:`load_exported` checks inputs
against that shape and names it when they differ.

Examples:
    >>> path, method = export_one_step(student, example_x, "student.pt2")   # doctest: +SKIP
    >>> load_exported(path)(x)                                               # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..consistency.plans import plan_body, reads_teacher
from ..consistency.student import ConsistencyStudent, frozen_call
from ..engine.io import CorruptFileError
from ..engine.tree import leaves, tree_map

SPEC = "cdeq_input.json"


class OneStepStudent(nn.Module):
    """``x -> logits`` with one layer call: the student's 1-NFE plan, export-friendly.

    Equal to ``student.predict(x, nfe=1)[0]`` (the 1-NFE plan is a single jump from ``z_0``),
    written without the data-dependent branches of :meth:`ConsistencyStudent.F` so that
    ``torch.export``, TorchScript tracing and ``torch.compile`` see one static graph.
    """

    def __init__(self, student: ConsistencyStudent) -> None:
        super().__init__()
        plan = student.plans.get(1, [("jump", student.schedule.t_min)])
        body = plan_body(plan)
        if len(body) != 1 or body[0][0] != "jump":
            raise ValueError(f"the student's 1-NFE plan {plan!r} is not a single jump")
        self.student, self.plan = student, list(plan)
        t = float(body[0][1])
        c_skip, c_out = student.schedule.scalings(torch.tensor([t], dtype=torch.float64, device="cpu"))
        self.t, self.c_skip, self.c_out = t, float(c_skip), float(c_out)

    def forward(self, x: Tensor) -> Tensor:
        s = self.student
        u = s.inject(x)
        z = s.initial_state(u)  # a tensor, or a structure of tensors (each part jumps alike)
        if self.c_out != 0.0:
            ref = leaves(z)[0]
            t = torch.full((ref.shape[0],), self.t, dtype=ref.dtype, device=ref.device)
            z = tree_map(lambda a, g: self.c_skip * a + self.c_out * g, z, s.G(z, t, u))
        return frozen_call(s.teacher.head, z) if reads_teacher(self.plan) else s.head(z)


def _input_spec(x: Tensor, dynamic: bool) -> dict[str, Any]:
    return {"shape": [None if dynamic else x.shape[0], *x.shape[1:]], "dtype": str(x.dtype).split(".")[-1]}


def export_one_step(student: ConsistencyStudent, example_x: Tensor, path: str | os.PathLike
                    ) -> tuple[Path, str]:
    """Export :class:`OneStepStudent` to ``path``; returns ``(path, method)``.

    ``method`` is ``"torch.export"`` (a ``torch.export.save`` archive, load it with
    ``torch.export.load(path).module()``; the batch dimension is dynamic where the model allows)
    or ``"torchscript"`` (``torch.jit.load``) when export fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = OneStepStudent(student).eval()
    tmp = path.with_name(f".tmp-{path.name}")  # same suffix (.pt2) as the target
    errors = []
    with torch.no_grad():
        for dynamic in (True, False):
            try:
                shapes = None
                if dynamic:
                    shapes = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)
                program = torch.export.export(module, (example_x,), dynamic_shapes=shapes)
                spec = json.dumps(_input_spec(example_x, dynamic))
                torch.export.save(program, tmp, extra_files={SPEC: spec})
                os.replace(tmp, path)
                return path, "torch.export"
            except Exception as err:  # noqa: BLE001 - try the next way, report all if none works
                errors.append(f"torch.export (dynamic={dynamic}): {type(err).__name__}: {err}")
        warnings.warn("torch.export failed (" + "; ".join(e[:200] for e in errors)
                      + "); falling back to TorchScript tracing", stacklevel=2)
        traced = torch.jit.trace(module, (example_x,), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={SPEC: json.dumps(_input_spec(example_x, False))})
        os.replace(tmp, path)
    return path, "torchscript"


class ExportedStudent(nn.Module):
    """A loaded export that checks its input against the shape it was exported for.

    ``input_shape``: ``[None, C, H, W]`` (``None``: the dynamic batch) or all dims fixed."""

    def __init__(self, module: Any, input_shape: list | None, dtype: str | None = None) -> None:
        super().__init__()
        self.module = module
        self.input_shape = input_shape
        self.dtype = dtype

    def expected(self) -> str:
        dims = ["B" if d is None else str(d) for d in self.input_shape or []]
        return f"({', '.join(dims)})" + (f" {self.dtype}" if self.dtype else "")

    def forward(self, x: Tensor) -> Tensor:
        if self.input_shape is not None:
            ok = isinstance(x, Tensor) and x.dim() == len(self.input_shape) and all(
                e is None or e == d for e, d in zip(self.input_shape, x.shape, strict=True))
            if not ok:
                got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"the exported model takes inputs of shape {self.expected()}, got "
                                 f"{got}; reshape the input or export again with an example of "
                                 "the shape you need")
            if self.dtype and str(x.dtype).split(".")[-1] != self.dtype:
                raise ValueError(f"the exported model takes {self.dtype} inputs, got {x.dtype}")
        try:
            return self.module(x)
        except AssertionError as err:  # a shape guard of the exported program
            raise ValueError(f"the exported model rejected an input of shape {tuple(x.shape)} "
                             f"(exported for {self.expected()}): {err}") from err


def load_exported(path: str | os.PathLike) -> ExportedStudent:
    """Load a file written by :func:`export_one_step` as a callable ``x -> logits`` module."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    extra = {SPEC: ""}
    try:
        module = torch.export.load(path, extra_files=extra).module()
    except Exception:  # noqa: BLE001 - not an export archive: try TorchScript
        try:
            module = torch.jit.load(str(path), _extra_files=extra)
        except Exception as err:  # noqa: BLE001
            raise CorruptFileError(f"{path} is neither a torch.export archive nor a TorchScript "
                                   f"file ({err})") from err
    spec = json.loads(extra[SPEC]) if extra[SPEC] else {}  # files from before the spec: no check
    return ExportedStudent(module, spec.get("shape"), spec.get("dtype"))
