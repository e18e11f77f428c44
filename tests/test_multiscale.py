"""The multiscale image model (``task_config.scales``): MDEQ's tuple of resolutions, fused at every
layer call, through the whole run."""

from __future__ import annotations

import json

import pytest
import torch

from cdeq.cli import main
from cdeq.engine.config import ConfigError
from cdeq.tasks.images import DigitsTask, ImageConfig
from cdeq.tasks.images.model import ConvDEQCell, MultiscaleCell


def test_one_scale_is_the_default_single_map_model():
    task = DigitsTask(ImageConfig(channels=8))
    assert isinstance(task.build_model().cell, ConvDEQCell)
    with pytest.raises(ConfigError, match="scales"):
        ImageConfig(scales=0)


def test_the_state_is_a_tuple_of_halving_maps_and_every_scale_reads_every_other():
    task = DigitsTask(ImageConfig(channels=8, scales=3))
    model = task.build_model().eval()
    x = task.x_test[:4]
    u = model.inject(x)
    z = model.initial_state(u)
    assert isinstance(model.cell, MultiscaleCell)
    assert [tuple(p.shape) for p in z] == [(4, 8, 8, 8), (4, 8, 4, 4), (4, 8, 2, 2)]
    z = tuple(torch.randn_like(p).requires_grad_() for p in z)
    out = model.cell(z, u)
    for j in range(3):  # each output scale depends on every input scale (MDEQ's fusion)
        grads = torch.autograd.grad(out[j].sum(), z, retain_graph=True)
        assert all(float(g.abs().sum()) > 0 for g in grads), j
    assert model.head(out).shape == (4, 10)


@pytest.mark.slow
def test_a_quick_run_with_three_scales(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "digits", "--quick", "--out", str(out), "--set", "threads=1",
                 "--set", "task_config.scales=3"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["cost"]["layer_calls"]["cdeq"]["1"] <= 1.10
    assert set(report["relative_error"]["cdeq"]) == {"1", "2", "4"}
    manifest = json.loads((out / "trajectories" / "manifest.json").read_text())
    assert [p["shape"] for p in manifest["state"]] == [[8, 8, 8], [8, 4, 4], [8, 2, 2]]
