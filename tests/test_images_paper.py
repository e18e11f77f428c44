"""The image tasks' paper-size preset (``task_config.size=paper``): MDEQ-small's shape and solver
budgets, per-scale widths in the multiscale model, and a tiny end-to-end run of the preset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cdeq.cli import main
from cdeq.engine.config import ConfigError
from cdeq.hub.describe import build, describe
from cdeq.run.config import build_config
from cdeq.tasks.images import Cifar10Task, DigitsTask, ImageConfig, ImageTask, presets
from cdeq.tasks.images.model import MultiscaleCell
from cdeq.tasks.images.task import image_model


def test_the_paper_size_is_mdeq_small():
    cfg = ImageConfig(size="paper")
    for key, value in presets.PAPER_TASK.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.scales, cfg.widths, cfg.hidden_mult, cfg.stride) == (4, (32, 64, 128, 256), 5, 4)
    model = image_model(cfg, 3, 1000)
    with torch.no_grad():
        z = model.initial_state(model.inject(torch.zeros(1, 3, 224, 224)))
    assert [tuple(p.shape) for p in z] == [(1, 32, 56, 56), (1, 64, 28, 28), (1, 128, 14, 14),
                                           (1, 256, 7, 7)]
    assert model.cell.channels == (32, 64, 128, 256)
    assert tuple(model.cell.conv1[3].weight.shape) == (1280, 256, 3, 3)  # 5 x 256 inside the block
    params = sum(p.numel() for p in model.parameters())
    assert 15e6 <= params <= 20e6, params  # the MDEQ paper reports about 18M for MDEQ-small


def test_a_given_value_wins_and_the_model_takes_mdeq_solvers(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "x.npz", x_train=rng.random((16, 32, 32, 1), dtype=np.float32),
             y_train=np.arange(16) % 4, x_test=rng.random((4, 32, 32, 1), dtype=np.float32),
             y_test=np.arange(4) % 4)
    cfg = ImageConfig(dataset="npz", data=str(tmp_path / "x.npz"), size="paper", widths=[8, 8, 8, 16],
                      hidden_mult=1)
    assert cfg.widths == (8, 8, 8, 16) and (cfg.hidden_mult, cfg.stride, cfg.scales) == (1, 4, 4)
    task = ImageTask(cfg)
    model = task.build_model()
    teacher = presets.PAPER_RUN["teacher"]
    assert type(model.deq.solver).__name__.lower().startswith("broyden")
    assert model.deq.solver.options.max_iter == teacher["train_solver"]["max_iter"] == 26
    assert model.deq.eval_solver.options.max_iter == teacher["eval_solver"]["max_iter"] == 26
    assert teacher["backward_options"]["max_iter"] == 27
    logits, _ = model(task.x_test)  # 32 x 32 pixels: scales of 8, 4, 2 and 1 pixels
    assert logits.shape == (4, 4)


def test_a_run_takes_the_paper_settings_over_the_task_preset_and_under_the_users():
    user = Cifar10Task.resolve_user_config({"task_config": {"size": "paper", "widths": [8, 8, 8, 8]}}, None)
    assert user["teacher"]["train_solver"] == presets.PAPER_RUN["teacher"]["train_solver"]
    assert user["record"] == presets.PAPER_RUN["record"]
    run = build_config("cifar10", user)
    assert run.teacher.train_solver.name == "broyden" and run.teacher.epochs == 100
    cifar = ImageConfig.from_dict(run.task_config)  # CIFAR-10's own preset has stride 2
    assert (cifar.stride, cifar.scales, cifar.hidden_mult, cifar.widths) == (4, 4, 5, (8, 8, 8, 8))
    assert ImageTask.resolve_user_config({}, None) == {}


def test_widths_map_between_scales():
    task = DigitsTask(ImageConfig(scales=2, widths=[8, 16]))
    model = task.build_model().eval()
    u = model.inject(task.x_test[:3])
    assert [tuple(p.shape) for p in u] == [(3, 8, 8, 8), (3, 16, 4, 4)]
    z = tuple(torch.randn_like(p).requires_grad_() for p in model.initial_state(u))
    out = model.cell(z, u)
    assert [tuple(p.shape) for p in out] == [(3, 8, 8, 8), (3, 16, 4, 4)]
    for j in range(2):  # each output scale depends on both input scales through the fusion
        grads = torch.autograd.grad(out[j].sum(), z, retain_graph=True)
        assert all(float(g.abs().sum()) > 0 for g in grads), j
    assert model.head(out).shape == (3, 10)
    for part in (model.injection, model.cell, model.head):  # a saved pipeline's recipe rebuilds it
        rebuilt = build(describe(part))
        assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in part.parameters()]
    # equal widths are the default layout, parameter for parameter
    same = MultiscaleCell((8, 8), 2)
    assert [p.shape for p in same.parameters()] == [p.shape for p in MultiscaleCell(8, 2).parameters()]


@pytest.mark.parametrize("bad, match", [
    ({"size": "large"}, "size"),
    ({"scales": 4, "widths": [8, 8]}, "one width per scale"),
    ({"scales": 2, "widths": [12, 16]}, "multiple of 8"),
    ({"scales": 2, "widths": [8, 2]}, "at least 4"),
    ({"widths": [8]}, "scales=1"),
    ({"scales": 2, "widths": 8}, "list of channels"),
    ({"size": "paper", "widths": [8, 8]}, "one width per scale"),
])
def test_bad_values_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        ImageConfig(**bad)


@pytest.mark.slow
def test_a_quick_run_of_the_paper_preset_on_an_image_folder(tmp_path, capsys):
    pytest.importorskip("PIL")
    from test_image_folder import write_folder

    write_folder(tmp_path / "data", n_train=8, size=(68, 66))
    out = tmp_path / "run"
    assert main(["run", "images", "--quick", "--data", str(tmp_path / "data"), "--out", str(out),
                 "--set", "threads=1", "task_config.size=paper", "task_config.widths=[8,8,16,16]",
                 "task_config.hidden_mult=1", "task_config.image_size=64", "task_config.resize=64",
                 "task_config.workers=0", "teacher.epochs=1", "teacher.batch_size=8",
                 "baselines.enabled=false", "plus.enabled=false"]) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["teacher"]["train_solver"]["name"] == "broyden"
    assert config["teacher"]["backward_options"] == {"max_iter": 27}
    manifest = json.loads((out / "trajectories" / "manifest.json").read_text())
    assert [p["shape"] for p in manifest["state"]] == [[8, 16, 16], [8, 8, 8], [16, 4, 4], [16, 2, 2]]
    report = json.loads((out / "report.json").read_text())
    assert report["cost"]["layer_calls"]["cdeq"]["1"] <= 1.10
