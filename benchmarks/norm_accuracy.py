"""Logged gradient norms against a float64 reference on the deep-MLP sigmoid recipe (1e-25 gradients),
and what the norm engine costs on the CPU.

Run: ``python benchmarks/norm_accuracy.py [--steps 30] [--reps 7]``.
Trains ``python -m recipes run deep_mlp --variant sigmoid`` as the recipe does, with a reference callback
that, on every logging step, takes the norms of the same gradients in float64 by the obvious formula
(``sqrt(sum(g.double() ** 2))``). Prints, per logging step, the logged first-layer norm and depth ratio
(read back from the run's TensorBoard events), the reference values and their relative errors.

Then, on resnet18's gradients (11.7M values, 62 tensors; the models of the overhead benchmarks), the
time of one set of per-tensor norms: torch's float32 ``_foreach_norm`` (what ``clip_grad_norm_`` and
``gradient_clip_val`` use), the same with a float64 accumulator, and the library's ``tensor_norms``
(float64 accumulation, exact for 1e-25 and 1e20 gradients), each as a share of a bare resnet18 training
step (batch 32 of 3x32x32, SGD) and with its largest relative error against a float64 reference; the
minimum of ``--reps`` repetitions. This is what exactness costs the callbacks' per-step passes on one
CPU thread.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import MODELS

from recipes.registry import get_recipe
from recipes.train import run_variant
from stability_callbacks._trainer import is_logging_step
from stability_callbacks.stats import tensor_norms


class Float64Norms(Callback):
    """On logging steps: float64 L2 norms of the first and last layer's gradients, by the obvious formula."""

    def __init__(self, first: str, last: str, every: int) -> None:
        self.first, self.last, self.every = first, last, every
        self.by_step: dict[int, tuple[float, float]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        if not is_logging_step(trainer, self.every):
            return
        norms = []
        for name in (self.first, self.last):
            module = pl_module.get_submodule(name)
            squares = sum(
                float((p.grad.double() ** 2).sum()) for p in module.parameters() if p.grad is not None
            )
            norms.append(math.sqrt(squares))
        self.by_step[trainer.global_step] = (norms[0], norms[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    recipe = get_recipe("deep_mlp")
    every = recipe.presets["cpu"].log_every_n_steps
    with tempfile.TemporaryDirectory() as tmp:
        reference = Float64Norms("net.0", "net.58", every)
        result = run_variant(
            recipe, "sigmoid", max_steps=args.steps, log_dir=tmp, progress=False, extra_callbacks=[reference]
        )
        acc = EventAccumulator(str(Path(result.log_dir or tmp)), size_guidance={"scalars": 0})
        acc.Reload()
        first = {e.step: e.value for e in acc.Scalars("grad_norm/net.0")}
        ratio = {e.step: e.value for e in acc.Scalars("grad_health/depth_ratio")}
    print(f"deep_mlp sigmoid, {args.steps} steps, logging every {every}; torch {torch.__version__}\n")
    print("| step | logged net.0 | float64 net.0 | rel. error | logged ratio | float64 ratio | rel. error |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for step, (f64_first, f64_last) in sorted(reference.by_step.items()):
        ref_ratio = f64_first / f64_last
        err_first = abs(first[step] - f64_first) / f64_first
        err_ratio = abs(ratio[step] - ref_ratio) / ref_ratio
        worst = max(worst, err_first, err_ratio)
        print(
            f"| {step} | {first[step]:.4g} | {f64_first:.4g} | {err_first:.2e} | {ratio[step]:.4g} | "
            f"{ref_ratio:.4g} | {err_ratio:.2e} |"
        )
    print(f"\nlargest relative error: {worst:.2e} (goal: below 1e-2)")
    norm_costs(args.reps)


def _best_ms(fn: Any, reps: int) -> float:
    fn()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def norm_costs(reps: int) -> None:
    """Per-tensor norms of resnet18's gradients, three ways, against a bare training step."""
    build, shape, batch = MODELS["resnet18"]
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))

    def train_step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step_ms = _best_ms(train_step, reps)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    reference = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
    ways = {
        "float32 `_foreach_norm` (torch's clip_grad_norm_)": lambda: torch.stack(torch._foreach_norm(grads)),
        "float64 accumulator (`_foreach_norm(dtype=float64)`)": lambda: torch.stack(
            torch._foreach_norm(grads, 2.0, dtype=torch.float64)
        ),
        "`tensor_norms` (this library)": lambda: tensor_norms(grads),
    }
    n = sum(g.numel() for g in grads)
    print(f"\nper-tensor norms of resnet18's gradients ({n / 1e6:.1f}M values, {len(grads)} tensors),")
    print(f"best of {reps} interleaved; a bare training step takes {step_ms:.1f} ms\n")
    print("| norms | ms | share of a step | largest rel. error vs float64 |")
    print("|---|---|---|---|")
    best = dict.fromkeys(ways, math.inf)
    for _ in range(reps):  # interleaved, so a busy moment of the machine hits all three alike
        for name, fn in ways.items():
            best[name] = min(best[name], _best_ms(fn, 1))
    for name, fn in ways.items():
        err = ((fn().double() - reference).abs() / reference).max().item()
        print(f"| {name} | {best[name]:.2f} | {best[name] / step_ms:.1%} | {err:.1e} |")


if __name__ == "__main__":
    main()
