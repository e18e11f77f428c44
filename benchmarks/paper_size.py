"""The projected size of the image tasks' paper preset (``task_config.size=paper``, MDEQ-small).

Builds the model the preset gives for ImageNet (3-channel 224x224 images, 1,000 classes; random
weights, nothing trained) and counts, per image:

- **parameters**: of the injection, the layer (the cell the solver iterates) and the head;
- **FLOPs**: of the injection, one layer call and the head, with the project's counter
  (:func:`cdeq.run.cost.count_flops`, the report's ``cost`` section), and a forward pass at the
  preset's budget (26 layer calls, MDEQ's F_THRES; the solver's own updates not counted);
- **state**: the numbers in ``z`` (every scale) and their bytes in float32 and float16 (what a
  recorded trajectory stores per sample and step);
- the C-DEQ student's 1-call plan in layer calls (its FiLM per part), random weights.

Usage::

    python benchmarks/paper_size.py           # writes benchmarks/results/paper_size_images.json
    python benchmarks/paper_size.py --table   # the table of the stored file (docs/how-to/large-data.md)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from cdeq.consistency.student import ConsistencyStudent
from cdeq.run import cost
from cdeq.run.evaluate import EvalConfig, measure_flops, predictors
from cdeq.tasks.images import ImageConfig, presets
from cdeq.tasks.images.task import image_model

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "python benchmarks/paper_size.py"


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(image_size: int = 224, classes: int = 1000, batch: int = 2) -> dict[str, Any]:
    """The figures above for the paper preset's model on ``image_size`` RGB images."""
    config = ImageConfig(size="paper")
    model = image_model(config, 3, classes).eval()
    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    per = 1.0 / batch
    with torch.no_grad():
        u = model.inject(x)
        z0 = model.initial_state(u)
        inj = cost.count_flops(lambda: model.inject(x)).total * per
        layer = cost.count_flops(lambda: model.cell(z0, u)).total * per
        head = cost.count_flops(lambda: model.head(z0)).total * per
    state = sum(p[0].numel() for p in z0)
    budget = presets.PAPER_RUN["teacher"]["eval_solver"]["max_iter"]
    student = ConsistencyStudent(model).eval()
    with torch.no_grad():  # random FiLM weights, so that no zero initialisation hides an op
        for p in student.time_embed.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    eval_config = EvalConfig(budgets=(1,), solvers=("picard",), exact_max_iter=1)
    with torch.no_grad():
        flops = measure_flops(model, predictors(model, student, eval_config, [1], None, x), x)
    return {
        "command": COMMAND,
        "preset": {"task_config": {k: list(v) if isinstance(v, tuple) else v
                                   for k, v in presets.PAPER_TASK.items()},
                   "run": presets.PAPER_RUN},
        "image": [3, image_size, image_size], "classes": classes, "batch": batch,
        "parameters": {"injection": _params(model.injection), "layer": _params(model.cell),
                       "head": _params(model.head), "total": _params(model)},
        "flops_per_image": {"injection": inj, "layer_call": layer, "head": head,
                            f"forward_at_{budget}_layer_calls": inj + budget * layer + head},
        "state_per_image": {"shapes": [list(p.shape[1:]) for p in z0], "numbers": state,
                            "bytes_float32": 4 * state, "bytes_float16": 2 * state},
        "student_1_call_layer_calls": flops["layer_calls"]["cdeq"]["1"],
        "torch": torch.__version__,
    }


def table(result: dict[str, Any]) -> str:
    """The figures as a markdown table (the one in docs/how-to/large-data.md)."""
    p, f, s = result["parameters"], result["flops_per_image"], result["state_per_image"]
    forward = next(k for k in f if k.startswith("forward_at_"))
    rows = [("parameters: injection / layer / head / total",
             f"{p['injection'] / 1e6:.2f}M / {p['layer'] / 1e6:.2f}M / {p['head'] / 1e6:.2f}M / "
             f"{p['total'] / 1e6:.2f}M"),
            ("GFLOPs per image: injection / one layer call / head",
             f"{f['injection'] / 1e9:.3f} / {f['layer_call'] / 1e9:.3f} / {f['head'] / 1e9:.3f}"),
            (f"GFLOPs per image, forward at {forward.split('_')[2]} layer calls (the solver's own "
             "updates not counted)", f"{f[forward] / 1e9:.1f}"),
            ("state per image", ", ".join("x".join(map(str, sh)) for sh in s["shapes"])
             + f": {s['numbers']:,} numbers, {s['bytes_float32'] / 2**20:.2f} MiB in float32"),
            ("C-DEQ student's 1-call plan, in layer calls", f"{result['student_1_call_layer_calls']:.3f}")]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_size_images.json"))
    parser.add_argument("--table", action="store_true", help="print the table of the stored file only")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    torch.manual_seed(0)
    result = measure()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
