"""Logged gradient norms against a float64 reference on the deep-MLP sigmoid recipe (1e-25 gradients).

Run: ``python benchmarks/norm_accuracy.py [--steps 30]``.
Trains ``python -m recipes run deep_mlp --variant sigmoid`` as the recipe does, with a reference callback
that, on every logging step, takes the norms of the same gradients in float64 by the obvious formula
(``sqrt(sum(g.double() ** 2))``). Prints, per logging step, the logged first-layer norm and depth ratio
(read back from the run's TensorBoard events), the reference values and their relative errors.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from recipes.registry import get_recipe
from recipes.train import run_variant
from stability_callbacks._trainer import is_logging_step


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


if __name__ == "__main__":
    main()
