"""The README's quick start with a structured state: a two-part tuple cell and a dict cell of
unequal widths run record -> distill -> select_plans -> pipe(x, nfe=k) -> save/load, on the 8x8
digits that ship with cdeq, and C-DEQ at one layer call beats the teacher cut to one call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cdeq
from cdeq.consistency.initialiser import LearnedInit, train_learned_init
from cdeq.consistency.plus import PlusConfig, train_plus
from cdeq.hub.compile import compile_plan
from cdeq.hub.export import export_one_step, load_exported
from cdeq.run.baselines import UnrolledNet, learned_init_method
from cdeq.run.cost import count_flops
from cdeq.tasks.images.data import load_digits_split

SCALE = 1.2  # the cells' coupling: strong enough that one call from zeros falls short


class TwoScaleCell(nn.Module):
    """``(fine (B, W), coarse (B, W/2))``: two resolutions fused at every call (MDEQ's pattern)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.fine = nn.Linear(width, width)
        self.coarse = nn.Linear(width // 2, width // 2)
        self.down = nn.Linear(width, width // 2)
        self.up = nn.Linear(width // 2, width)

    def forward(self, z, u):
        fine, coarse = z
        return (torch.tanh(SCALE * (self.fine(fine) + self.up(coarse)) + u[0]),
                torch.tanh(SCALE * (self.coarse(coarse) + self.down(fine)) + u[1]))


class TwoScaleInjection(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.fine, self.coarse = nn.Linear(64, width), nn.Linear(64, width // 2)

    def forward(self, x):
        return self.fine(x), self.coarse(x)


class TwoScaleHead(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width + width // 2, 10)

    def forward(self, z):
        return self.fc(torch.cat(z, dim=1))


class FlowHiddenCell(nn.Module):
    """``{"flow": (B, 12), "hidden": (B, 40)}``: DEQ-Flow's pair of unequal widths."""

    def __init__(self, flow: int = 12, hidden: int = 40) -> None:
        super().__init__()
        self.flow, self.hidden = flow, hidden
        self.h = nn.Linear(hidden + flow, hidden)
        self.f = nn.Linear(hidden, flow)

    def forward(self, z, u):
        h = torch.tanh(SCALE * self.h(torch.cat([z["hidden"], z["flow"]], dim=1)) + u["hidden"])
        return {"flow": torch.tanh(SCALE * self.f(h) + u["flow"]), "hidden": h}


class FlowHiddenInjection(nn.Module):
    def __init__(self, flow: int = 12, hidden: int = 40) -> None:
        super().__init__()
        self.flow, self.hidden = flow, hidden
        self.to_flow, self.to_hidden = nn.Linear(64, flow), nn.Linear(64, hidden)

    def forward(self, x):
        return {"flow": self.to_flow(x), "hidden": self.to_hidden(x)}


class FlowHiddenHead(nn.Module):
    def __init__(self, flow: int = 12, hidden: int = 40) -> None:
        super().__init__()
        self.flow, self.hidden = flow, hidden
        self.fc = nn.Linear(flow + hidden, 10)

    def forward(self, z):
        return self.fc(torch.cat([z["flow"], z["hidden"]], dim=1))


STRUCTURES = {"tuple": (TwoScaleInjection, TwoScaleCell, TwoScaleHead),
              "dict": (FlowHiddenInjection, FlowHiddenCell, FlowHiddenHead)}


def digits():
    x_tr, y_tr, x_te, y_te = load_digits_split(0)
    to = lambda a: torch.from_numpy(a.reshape(len(a), -1)).float() / 16.0  # noqa: E731
    x_tr, x_te = to(x_tr), to(x_te)
    mean, std = x_tr.mean(0), x_tr.std(0) + 0.1
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    y_tr, y_te = torch.as_tensor(y_tr).long(), torch.as_tensor(y_te).long()
    train = [(x_tr[i : i + 128], y_tr[i : i + 128]) for i in range(0, 1152, 128)]
    valid = [(x_tr[1152:], y_tr[1152:])]  # held out from training: plans are chosen here
    return train, valid, x_te, y_te


@pytest.fixture(scope="module", params=sorted(STRUCTURES))
def distilled(request, tmp_path_factory):
    torch.manual_seed(0)
    inj, cell, head = (cls() for cls in STRUCTURES[request.param])
    train, valid, x_te, y_te = digits()
    model = cdeq.DEQModel(inj, cell, head, solver="anderson")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(12):
        for xb, yb in train:
            loss = F.cross_entropy(model(xb)[0], yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    trajectories = cdeq.record(model, train, cdeq.RecordConfig())
    student = cdeq.ConsistencyStudent(model)
    cdeq.distill(student, trajectories, cdeq.DistillConfig(epochs=12), task_loss=F.cross_entropy)
    pipe = cdeq.Pipeline(student).select_plans(valid, loss=F.cross_entropy, max_nfe=3)
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, model, pipe, x_te, y_te, folder, (trajectories, train, valid)


def test_cdeq_at_one_call_beats_the_teacher_cut_to_one_call(distilled):
    name, model, pipe, x, y, *_ = distilled
    with torch.no_grad():
        u = model.inject(x)
        z1 = cdeq.get_solver("picard", max_iter=1, tol=0.0).solve(model.cell, model.initial_state(u), u).z
        z_star = model.deq.solve(u).z
        truncated = (model.head(z1).argmax(-1) == y).float().mean()
        ours = (pipe(x, nfe=1).argmax(-1) == y).float().mean()
        err = cdeq.engine.tree.relative_error
        _, z_ours = pipe.student.predict(x, nfe=1)
    assert float(ours) > float(truncated), name
    assert float(err(z_ours, z_star).mean()) < float(err(z1, z_star).mean()), name  # over all parts


def test_plans_predict_and_save_load_keep_the_structure(distilled):
    name, model, pipe, x, y, folder, _ = distilled
    logits3 = pipe(x, nfe=3)
    _, z = pipe.student.predict(x, nfe=2)
    assert type(z) is type(model.initial_state(model.inject(x)))
    pipe.save_pretrained(folder / "pipe")
    loaded = cdeq.Pipeline.from_pretrained(folder / "pipe")
    assert torch.equal(loaded(x, nfe=3), logits3)
    assert loaded.plans == pipe.plans


def test_export_and_compiled_plan_match_eager(distilled):
    name, model, pipe, x, _, folder, _ = distilled
    path, _ = export_one_step(pipe.student, x[:8], folder / "one.pt2")
    with torch.no_grad():
        assert torch.allclose(load_exported(path)(x[:8]), pipe(x[:8], nfe=1), atol=1e-5)
    fast = compile_plan(pipe.student, nfe=2, example=x[:8], backend="eager")
    assert torch.allclose(fast(x[:8]), pipe(x[:8], nfe=2), atol=1e-5)


def test_a_student_call_costs_at_most_1_10_teacher_layer_calls(distilled):
    name, model, pipe, x, *_ = distilled
    with torch.no_grad():
        u = model.inject(x)
        z0 = model.initial_state(u)
        z = model.deq.solve(u).z  # a state away from zeros: the full call
        layer = count_flops(lambda: model.cell(z0, u)).total
        student = pipe.student
        t = torch.full((x.shape[0],), 0.5)
        call = count_flops(lambda: student.F(z, 0.5, u)).total  # one time for the batch (a plan)
        per_sample = count_flops(lambda: student.F(z, t, u)).total
    assert call <= 1.10 * layer, (name, call / layer)
    assert per_sample > call  # per-sample times pay for the time embedding; plans use one time


def test_cdeq_plus_the_learned_initialiser_and_the_unrolled_networks_take_the_structure(distilled):
    name, model, pipe, x, y, folder, (trajectories, train, valid) = distilled
    structure = type(model.initial_state(model.inject(x)))
    plus, _ = train_plus(pipe.student, trajectories, PlusConfig(init_hidden=16, init_epochs=1, epochs=1),
                         cdeq.DistillConfig(epochs=1), F.cross_entropy)
    with torch.no_grad():
        assert type(plus.initial_state(plus.inject(x))) is structure  # h(u), part by part
    pipe_plus = cdeq.Pipeline(plus).select_plans(valid, loss=F.cross_entropy, max_nfe=2)
    logits = pipe_plus(x, nfe=2)
    pipe_plus.save_pretrained(folder / "plus")
    assert torch.equal(cdeq.Pipeline.from_pretrained(folder / "plus")(x, nfe=2), logits)

    init = LearnedInit.for_teacher(model, hidden=16)
    fitted = train_learned_init(init, model, trajectories, samples=2 * 1152)
    assert fitted["losses"][-1] < fitted["losses"][0]
    logits, z = learned_init_method(init, model, {2: "anderson"})(x, 2)
    assert logits.shape == (len(x), 10) and type(z) is structure

    net = UnrolledNet(model, 2, anytime=True)
    loss = net.training_loss(_Loss(), *train[0])
    loss.backward()
    assert type(net(x)[1]) is structure and net.cell.parameters().__next__().grad is not None


class _Loss:
    """The part of a task the unrolled networks use: its loss."""

    @staticmethod
    def loss(logits, y):
        return F.cross_entropy(logits, y)
