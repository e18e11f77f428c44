"""The consistency student ``F(z, t, x) = c_skip(t) z + c_out(t) G(z, t, x)``.

``G`` is one call of ``f_phi`` (a copy of the teacher's layer) under a FiLM time conditioning:
``G = scale_out(t) f_phi(scale_in(t) z + shift_in(t) + mix(t) u, u) + shift_out(t)``, all
per-channel. A call is one layer call plus two fused multiply-adds per state element from the zero
start (the input mix; the output FiLM, ``c_out`` folded in), four elsewhere. A plan's jump has one
time for the whole batch, so its coefficients are computed once and then read from a table
(``benchmarks/student_cost.py`` counts and times it on every task's cell). An optional
channel-wise correction MLP (``correction_hidden``, off by default) adds to ``G``. At ``t = T`` the
scalings are ``(1, 0)`` and ``F(z*, T, x) = z*`` holds exactly (the boundary condition).

A structured state (a tuple, list or dict of tensors: :mod:`cdeq.engine.tree`) is conditioned part
by part: each part has its own channels (read off the part, or given per part) and its own rows
of the time embedding's output, and mixes in the injection's part at the same place when the
injection has the state's structure (:func:`~cdeq.consistency.conditioning.injected_parts`). The
cost per state element is the same as for one tensor.

Inference runs a *plan* (:mod:`cdeq.consistency.plans`): jumps ``("jump", t)``, teacher steps
``("step",)``, residual-timed jumps ``("jump_auto",)``, ``n`` steps of the teacher's solver
``("solve", n)``, and optionally a last ``("teacher_head",)`` that reads the state out with the
teacher's head. :meth:`ConsistencyStudent.predict` is the one way to run one on inputs (users
call it through ``cdeq.Pipeline``: ``pipe(x, nfe=k)``).

A plan starts from :meth:`ConsistencyStudent.initial_state` (zeros) at the time
:attr:`ConsistencyStudent.start_time` (``t_min``). A subclass may start elsewhere by overriding
the two (C-DEQ+, :class:`cdeq.consistency.plus.PlusStudent`, starts from a learned ``h(u)`` at a
time matched to its residual); whatever the start computes runs inside every prediction and
counts in the student's cost.

Plans for more than one call are chosen on data (``cdeq.Pipeline(student).select_plans(batches,
loss=...)``, :mod:`cdeq.consistency.search`); until then ``predict`` refuses ``nfe > 1``.

Examples:
    >>> student = ConsistencyStudent(teacher)                                 # doctest: +SKIP
    >>> logits, z = student.predict(x, nfe=1)                                 # doctest: +SKIP
    >>> pipe = cdeq.Pipeline(student).select_plans(val_batches, loss=F.cross_entropy)  # doctest: +SKIP
    >>> logits = pipe(x, nfe=4)                  # student.predict(x, nfe=4)[0]  # doctest: +SKIP
    >>> student.predict(x, plan=[("jump", student.start_time), ("step",), ("jump", 3.5)])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..deq.model import DEQModel
from ..engine.config import Config, check_bool, check_int
from ..engine.tree import leaves, relative_error
from ..solvers import get_solver
from .conditioning import ChannelMLP, TimeEmbedding, _broadcast, _per_sample, injected_parts
from .plans import Plan, check_plan, plan_body, plan_nfe, reads_teacher
from .schedule import ScheduleConfig, TimeSchedule

__all__ = ["ChannelMLP", "ConsistencyStudent", "StudentConfig", "TimeEmbedding", "frozen_call",
           "plan_nfe"]

log = logging.getLogger(__name__)


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated; use {new} (the old name goes in the next release)",
                  DeprecationWarning, stacklevel=3)


def frozen_call(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` building a graph for the inputs but none for ``fn``'s parameters.

    The teacher's modules keep their ``requires_grad`` flags: the call runs on detached copies
    of the parameters, so no gradient can reach (or be accumulated on) them."""
    if not isinstance(fn, nn.Module) or not torch.is_grad_enabled():
        return fn(*args)
    params = {name: p.detach() for name, p in fn.named_parameters()}
    if not params:
        return fn(*args)
    return torch.func.functional_call(fn, params, args)


@dataclasses.dataclass
class StudentConfig(Config):
    """Architecture of the student.

    Attributes:
        time_features: size of the Fourier embedding of ``log t``.
        time_hidden: width of the time MLP.
        correction_hidden: width of the channel-wise correction MLP (0, the default, disables
            it: on cheap cells it costs several layer calls).
        input_mix: the layer's input gets a per-channel, time-dependent share of the injection,
            ``z_in = scale_in(t) z + shift_in(t) + mix(t) u``, where ``u`` is (or holds) a tensor
            of the state's shape (the built-in cells: images, text, graphs); one multiply-add per
            state element. From the zero start it is what lets the layer's own weights act on
            the input at all.
        train_injection: give the student its own trainable copy of the input injection
            (otherwise it shares the teacher's, frozen).
    """

    time_features: int = 16
    time_hidden: int = 64
    correction_hidden: int = 0
    input_mix: bool = True
    train_injection: bool = False

    def validate(self) -> None:
        check_int("time_features", self.time_features, minimum=2)
        check_int("time_hidden", self.time_hidden, minimum=1)
        check_int("correction_hidden", self.correction_hidden, minimum=0)
        check_bool("input_mix", self.input_mix)
        check_bool("train_injection", self.train_injection)


class ConsistencyStudent(nn.Module):
    """A C-DEQ student built from a trained :class:`DEQModel`.

    The student owns copies of the teacher's injection, layer and head (the trainable ``phi``)
    and keeps the teacher for re-entry steps and the exact mode. The teacher is not modified:
    its calls from the student build no graph for its parameters, and
    :meth:`trainable_parameters` leaves it out.

    Args:
        teacher: the trained DEQ.
        schedule: the time schedule (times and scalings).
        config: architecture of the time conditioning and correction.
        example: an example input ``x``, only needed when the teacher cannot tell the size and
            axis of its state's channels (see :meth:`DEQModel.state_layout`).
    """

    def __init__(self, teacher: DEQModel, schedule: TimeSchedule | None = None,
                 config: StudentConfig | None = None, example: Any = None) -> None:
        super().__init__()
        self.config = config or StudentConfig()
        self.schedule = schedule or TimeSchedule(ScheduleConfig())
        self.teacher = teacher
        self.injection = copy.deepcopy(teacher.injection) if self.config.train_injection else None
        self.cell = copy.deepcopy(teacher.cell)
        self.head = copy.deepcopy(teacher.head)
        for module in (self.injection, self.cell, self.head):
            for p in module.parameters() if isinstance(module, nn.Module) else []:
                p.requires_grad_(True)
        self.channels, self.channel_dim = teacher.state_layout(example)  # ints, or one per part
        c = self.total_channels
        parts = 5 if self.config.input_mix else 4
        self.time_embed = TimeEmbedding(self.config.time_features, self.config.time_hidden, parts * c)
        self._register_load_state_dict_pre_hook(self._without_mix_rows)
        hidden = self.config.correction_hidden
        self.correction: nn.Module | None = None
        if hidden and isinstance(self.channels, int):
            self.correction = ChannelMLP(2 * c, hidden, c, self.channel_dim)
        elif hidden:  # one per part
            self.correction = nn.ModuleList(ChannelMLP(2 * ci, hidden, ci, di) for ci, di in
                                            zip(self.channels, self.channel_dim, strict=True))
        self._plans: dict[int, Plan] = {1: [("jump", self.schedule.t_min)]}
        self.plans_selected = False  # True once plans come from a search or from the caller

    #: whether :meth:`initial_state` is zeros (a plan's first jump then skips the arithmetic on it)
    zero_start: bool = True

    @property
    def start_time(self) -> float:
        """The time of a plan's start state (:meth:`initial_state`): ``t_min`` for zeros."""
        return self.schedule.t_min

    @property
    def trained_times(self) -> tuple[float, ...]:
        """Times, besides the schedule's, that this student was trained to jump from; the plan
        search tries them too (none here)."""
        return ()

    @property
    def total_channels(self) -> int:
        """The state's channels, summed over its parts."""
        return self.channels if isinstance(self.channels, int) else sum(self.channels)

    def _part_layout(self) -> list[tuple[int, int, int]]:
        """``(first column, channels, channel axis)`` of each part in the FiLM coefficients."""
        if isinstance(self.channels, int):
            return [(0, self.channels, self.channel_dim)]
        out, start = [], 0
        for c, d in zip(self.channels, self.channel_dim, strict=True):
            out.append((start, c, d))
            start += c
        return out

    def _without_mix_rows(self, state: dict, prefix: str, *args: Any) -> None:
        """Load a state saved before ``input_mix`` existed (time embedding with 4C outputs): its
        mix rows start at zero, which is the saved student's function exactly."""
        c = self.total_channels
        for name in ("weight", "bias"):
            key = f"{prefix}time_embed.net.2.{name}"
            if self.config.input_mix and key in state and state[key].shape[0] == 4 * c:
                v = state[key]
                state[key] = torch.cat([v, v.new_zeros((c, *v.shape[1:]))])

    @property
    def plans(self) -> dict[int, Plan]:
        """Budget (NFE) -> plan. Assigning plans counts as selecting them."""
        return self._plans

    @plans.setter
    def plans(self, plans: dict[int, Plan]) -> None:
        if 1 not in plans:
            raise ValueError(f"plans must include a 1-NFE plan; got budgets {sorted(plans)}")
        self._plans = {int(k): check_plan(v) for k, v in plans.items()}
        self.plans_selected = True

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's own parameters that require grad (the teacher's are never included)."""
        teacher = {id(p) for p in self.teacher.parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in teacher]

    # --- the consistency function -------------------------------------------------------------
    def inject(self, x: Any) -> Any:
        """The student's injection: its own copy, or the teacher's (without a parameter graph)."""
        return frozen_call(self.teacher.injection, x) if self.injection is None else self.injection(x)

    def _layer(self, z: Any, film: list[tuple], u: Any, zero_state: bool) -> Any:
        """The layer on ``z * scale_in + shift_in [+ mix * u]`` (1 NFE), part by part; ``film``:
        :meth:`film`'s coefficients shaped against each part of ``z`` (:meth:`_shaped`). From a
        zero state the ``z`` term costs nothing."""
        parts, spec = tree_flatten(z)
        injected = injected_parts(u, z) if film[0][2] is not None else [None] * len(parts)
        z_in = []
        for zp, coef, up in zip(parts, film, injected, strict=True):
            scale_in, shift_in, mix = coef[:3]
            zi = shift_in if zero_state else torch.addcmul(shift_in, zp, scale_in)
            if up is not None:
                zi = torch.addcmul(zi, up, mix)
            z_in.append(zi.expand_as(zp))
        return self.cell(tree_unflatten(z_in, spec), u)

    def _shaped(self, film: tuple, z: Any) -> list[tuple]:
        """Coefficients ``(n, C)`` (``C``: all parts' channels) as one tuple per part of ``z``,
        each reshaped to broadcast against its part."""
        parts = leaves(z)
        if len(parts) == 1:
            return [tuple(None if v is None else _broadcast(v, parts[0], self.channel_dim) for v in film)]
        return [tuple(None if v is None else _broadcast(v[:, start : start + c], p, dim) for v in film)
                for p, (start, c, dim) in zip(parts, self._part_layout(), strict=True)]

    def film(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """FiLM parameters ``(scale_in, shift_in, mix, scale_out, shift_out)`` of times ``t``
        ``(n,)``, each ``(n, C)`` (``mix`` ``None`` without ``input_mix``): one row per time, so
        a batch sharing one time needs one row."""
        parts = self.time_embed(t).chunk(5 if self.config.input_mix else 4, dim=1)
        mix = parts[4] if self.config.input_mix else None
        return 1 + parts[0], parts[1], mix, 1 + parts[2], parts[3]

    def G(self, z: Any, t: Tensor, u: Any) -> Any:
        """One conditioned layer call (1 NFE), before the scalings: ``FiLM_out(f(FiLM_in(z)))``
        [+ the correction]. ``z``: state ``(B, ...)`` (or a structure of such parts), ``t``:
        ``(B,)``."""
        film = self._shaped(self.film(t), z)
        h = self._layer(z, film, u, zero_state=False)
        parts, spec = tree_flatten(h)
        out = [torch.addcmul(coef[4], hp, coef[3]) for hp, coef in zip(parts, film, strict=True)]
        if self.correction is not None:
            nets = [self.correction] if isinstance(self.correction, ChannelMLP) else self.correction
            dims = [d for _, _, d in self._part_layout()]
            out = [hp + net(torch.cat([hp, zp], dim=d))
                   for hp, zp, net, d in zip(out, leaves(z), nets, dims, strict=True)]
        return tree_unflatten(out, spec)

    def F(self, z: Any, t: Tensor | float, u: Any, zero_state: bool = False) -> Any:
        """``c_skip(t) z + c_out(t) G(z, t, u)``: the estimate of ``z*`` from ``z`` at time ``t``.

        ``t``: a float or a 0-dim tensor (one time for the whole batch, as in a plan's jump) or
        per-sample times ``(B,)`` (training, ``jump_auto``). Without the correction, ``c_out``
        folds into the output FiLM: one per-channel affine of the layer's output (one fused
        multiply-add per element), plus one for the skip term; ``zero_state`` (``z`` is known to
        be zeros, a plan's start) drops the ``z`` terms. For one time without gradients the
        folded per-channel coefficients come from a table keyed on the time and the time
        embedding's weights, so the time embedding costs nothing per call. At ``t = T`` this
        returns ``z`` itself: the boundary condition is exact (for one time without calling the
        layer, 0 NFE; per-sample times are masked, so no value is read on the host).
        """
        if self.correction is not None:
            return self._corrected(z, t, u)
        ref = leaves(z)[0]
        if not isinstance(t, Tensor) or t.dim() == 0:  # one time for the batch
            c_skip, c_out = self.schedule.scalar_scalings(float(t))
            if c_out == 0.0:
                return z
            coef = self._coefficients(float(t), c_out, z)
            skip: Tensor | float = c_skip
            boundary = None
        else:  # per-sample times: masked at the boundary, never read on the host
            times = t.to(ref.dtype)
            c_skip, c_out = self.schedule.scalings(times)
            boundary = c_out == 0
            coef = self._shaped(self._fold(self.film(times), c_out[:, None]), z)
            skip = c_skip
        h_parts, spec = tree_flatten(self._layer(z, coef, u, zero_state))
        outs = []
        for zp, hp, cp in zip(leaves(z), h_parts, coef, strict=True):
            out = torch.addcmul(cp[4], hp, cp[3])
            if not zero_state:
                out = out.add(zp, alpha=skip) if boundary is None else torch.addcmul(
                    out, zp, _per_sample(skip, zp))
            if boundary is not None:
                out = torch.where(_per_sample(boundary, zp), zp, out)
            outs.append(out)
        return tree_unflatten(outs, spec)

    @staticmethod
    def _fold(film: tuple, c_out: Tensor | float) -> tuple:
        """``film`` with ``c_out`` multiplied into the output scale and shift."""
        return (*film[:3], c_out * film[3], c_out * film[4])

    def _coefficients(self, t: float, c_out: float, z: Any) -> list[tuple]:
        """The folded FiLM coefficients of one time ``t`` (rows ``(1, C)`` shaped against each
        part of ``z``), from the table when gradients are off (keyed on ``t`` and the time
        embedding's weights and their versions, so a training step or a loaded state
        invalidates it). Under ``torch.compile`` they are computed in the graph (the table's
        key reads tensor storage, which would break the graph)."""
        parts = leaves(z)
        ref = parts[0]

        def compute() -> list[tuple]:
            times = torch.full((1,), t, dtype=ref.dtype, device=ref.device)
            return self._shaped(self._fold(self.film(times), c_out), z)

        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()  # compiled: the coefficients are part of the one graph
        key = (t, c_out, ref.dtype, ref.device, tuple(p.dim() for p in parts),
               tuple((p.data_ptr(), p._version) for p in self.time_embed.parameters()))
        table = self.__dict__.setdefault("_film_table", {})
        if key not in table:
            if len(table) >= 64:
                table.clear()
            table[key] = compute()
        return table[key]

    def _corrected(self, z: Any, t: Tensor | float, u: Any) -> Any:
        """``F`` with the correction MLP (``correction_hidden > 0``): per-sample times, unfolded."""
        ref = leaves(z)[0]
        t = torch.as_tensor(t, dtype=ref.dtype, device=ref.device)
        if t.dim() == 0:
            t = t.expand(ref.shape[0])
        c_skip, c_out = self.schedule.scalings(t)
        boundary = c_out == 0  # masked below, never read on the host
        g_parts, spec = tree_flatten(self.G(z, t, u))
        out = []
        for zp, gp in zip(leaves(z), g_parts, strict=True):
            mixed = _per_sample(c_skip, zp) * zp + _per_sample(c_out, zp) * gp
            out.append(torch.where(_per_sample(boundary, zp), zp, mixed))
        return tree_unflatten(out, spec)

    forward = F

    # --- inference ------------------------------------------------------------------------------
    def initial_state(self, u: Any) -> Any:
        """A plan's start state ``(B, ...)`` (or a structure of such parts): the teacher's (zeros)
        for the injection ``u`` (the student's, which is the teacher's unless the student has its
        own copy)."""
        return self.teacher.initial_state(u)

    def teacher_inputs(self, x: Any) -> tuple[Any, Any]:
        """``(u_student, u_teacher)``; the same object when the injection was not fine-tuned."""
        u_t = frozen_call(self.teacher.injection, x)
        return (u_t if self.injection is None else self.injection(x)), u_t

    def _run_plan(self, u: Any, plan: Plan, u_teacher: Any = None, z0: Any = None) -> Any:
        """Run ``plan`` from ``z0`` (by default :meth:`initial_state`: zeros, which a first jump
        uses without arithmetic on it); returns the state ``(B, ...)`` (of the teacher's
        structure)."""
        u_teacher = u if u_teacher is None else u_teacher
        zero_state = z0 is None and self.zero_start
        z = self.initial_state(u) if z0 is None else z0
        last_residual = None
        for op in plan_body(plan):
            if op[0] == "jump":
                z = self.F(z, op[1], u, zero_state=zero_state)
            elif op[0] == "step":
                fz = frozen_call(self.teacher.cell, z, u_teacher)
                last_residual, z = relative_error(z, fz), fz
            elif op[0] == "solve":
                solver = get_solver(self.teacher.deq.eval_solver.name, max_iter=int(op[1]), tol=0.0)
                z = solver.solve(self.teacher.cell, z, u_teacher).z
            elif op[0] == "jump_auto":
                if last_residual is None:
                    raise ValueError("a 'jump_auto' needs a preceding 'step' in the plan")
                z = self.F(z, self.schedule.residual_time(last_residual).to(leaves(z)[0].dtype), u)
            else:
                raise ValueError(f"unknown plan operation {op!r}; use 'jump', 'step', 'jump_auto', "
                                 "'solve' or a last 'teacher_head'")
            zero_state = False
        return z

    def plan_for(self, nfe: int) -> Plan:
        """The selected plan with the most NFE not above ``nfe``.

        Raises ``ValueError`` for ``nfe > 1`` when no plans were selected (rather than answering
        with the 1-call plan)."""
        if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1:
            raise ValueError(f"nfe={nfe!r} is not valid; give a positive int (layer calls)")
        nfe = int(nfe)
        top = max(self.plans)
        if nfe > top and not self.plans_selected:
            raise ValueError(
                f"nfe={nfe}: this student has only its 1-NFE plan, because no multi-step plans were "
                "selected; call cdeq.Pipeline(student).select_plans(val_batches, loss=task_loss) "
                "first, or use nfe=1")
        if nfe > top:
            log.debug("nfe=%d is above the largest selected plan; using the %d-NFE plan", nfe, top)
        fitting = [k for k in self.plans if k <= nfe]
        return self.plans[max(fitting)]

    @torch.no_grad()
    def predict(self, x: Any, nfe: int | None = None, *, plan: Plan | None = None
                ) -> tuple[Tensor, Any]:
        """``(logits, z)`` of the inputs ``x`` (a batch ``(B, ...)``) with at most ``nfe`` layer
        calls (default 1), without gradients: the selected plan for that budget
        (:meth:`plan_for`), or ``plan`` when given (checked; ``nfe``, if given too, must cover
        it).

        Returns the logits ``(B, ...)`` (the student's head, or the teacher's when the plan ends
        with ``("teacher_head",)``) and the state ``z`` ``(B, ...)`` the plan reached (of the
        teacher's structure). The teacher's injection runs only for a plan with teacher steps
        (they alone read it), so an own injection runs alone otherwise."""
        if plan is None:
            return self._apply_plan(x, self.plan_for(1 if nfe is None else nfe))
        plan = check_plan(plan)
        if nfe is not None and plan_nfe(plan) > nfe:
            raise ValueError(f"nfe={nfe!r} is below the {plan_nfe(plan)} layer calls of the plan given")
        return self._apply_plan(x, plan)

    def _apply_plan(self, x: Any, plan: Plan) -> tuple[Tensor, Any]:
        if any(op[0] in ("step", "solve") for op in plan):
            u, u_t = self.teacher_inputs(x)
        else:
            u, u_t = self.inject(x), None
        z = self._run_plan(u, plan, u_t)
        return self._read(z, plan), z

    def _read(self, z: Any, plan: Plan) -> Tensor:
        """The logits of the state ``z`` that ``plan`` reached."""
        return frozen_call(self.teacher.head, z) if reads_teacher(plan) else self.head(z)

    # --- names of cdeq 0.1, kept for one release ---------------------------------------------------
    def apply_plan(self, x: Any, plan: Plan) -> tuple[Tensor, Any]:
        """Deprecated: ``predict(x, plan=plan)`` (which runs without gradients)."""
        _deprecated("ConsistencyStudent.apply_plan(x, plan)", "predict(x, plan=plan)")
        return self._apply_plan(x, plan)

    def run_plan(self, u: Any, plan: Plan, u_teacher: Any = None, z0: Any = None) -> Any:
        """Deprecated: ``predict(x, plan=plan)[1]`` (from the inputs, not the injection)."""
        _deprecated("ConsistencyStudent.run_plan(u, plan)", "predict(x, plan=plan)[1]")
        return self._run_plan(u, plan, u_teacher, z0)

    def read(self, z: Any, plan: Plan) -> Tensor:
        """Deprecated: ``predict(x, plan=plan)[0]``."""
        _deprecated("ConsistencyStudent.read(z, plan)", "predict(x, plan=plan)[0]")
        return self._read(z, plan)

    @torch.no_grad()
    def solve_exact(self, x: Any, solver: Any, plan: Plan | None = None) -> tuple[Tensor, Any, int]:
        """Exact mode: the student's estimate warm-starts the teacher solver, run to tolerance.

        Returns ``(z, solver_result, student_nfe)``; total NFE per sample is
        ``student_nfe + result.nfe``.
        """
        plan = plan or self.plans[1]
        u, u_t = self.teacher_inputs(x)
        z_hat = self._run_plan(u, plan, u_t)
        res = solver.solve(self.teacher.cell, z_hat, u_t)
        return res.z, res, plan_nfe(plan)
