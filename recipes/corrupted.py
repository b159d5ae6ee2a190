"""Corrupted-batch recipe: one poisoned batch in the middle of a healthy run, with and without
:class:`~stability_callbacks.autopilot.StabilityAutopilot`.

A single training batch is corrupted at a fixed optimizer step (:class:`CorruptBatch`: targets scrambled
across the batch, inputs scaled by 1e3), the kind of bad shard or broken preprocessing that wrecks a long
run. Three runs of the same recipe variant, seed and budget are compared:

- ``clean``: no corruption;
- ``corrupted``: the bad batch, nothing to catch it;
- ``corrupted_autopilot``: the bad batch with the autopilot, which sees the loss spike, rolls back to its
  last in-memory snapshot, lowers the learning rate for a while and carries on.

Run it with ``python -m recipes corrupted``; the logs go to ``logs/corrupted/<run>/seed<S>/`` and the
table (final training loss, its ratio to the clean run, rollbacks) to ``logs/corrupted/summary.md``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from tqdm.auto import tqdm

from recipes import deep_mlp
from recipes.reports import (
    corrupted_report,
    corrupted_summary,
    format_corrupted_table,
    write_corrupted_summary,
)
from recipes.spec import CorruptedResult, Recipe, Variant
from recipes.train import run_variant
from stability_callbacks import StabilityAutopilot

__all__ = [
    "RUNS",
    "CorruptBatch",
    "CorruptedResult",
    "corrupted_demo",
    "corrupted_recipe",
    "format_corrupted_table",
    "summary_of",
]

RUNS = ("clean", "corrupted", "corrupted_autopilot")


class CorruptBatch(Callback):
    """Corrupts the training batch(es) of one optimizer step, in place, before the model sees them.

    At ``trainer.global_step == step`` (every micro-batch of that optimizer step under gradient
    accumulation) the batch ``(inputs, targets)`` is changed in place: the targets are scrambled by a
    random permutation across the batch (seeded), and the inputs are multiplied by ``input_scale``. The
    tensors changed are the batch the data loader collated (with the recipes' loaders a fresh copy, not
    a view of the data set), so only this step sees the corruption; the model and the data module are
    untouched.

    Args:
        step: the optimizer step whose batch is corrupted (>= 0).
        input_scale: factor applied to the inputs.
        scramble: permute the targets across the batch.
        seed: seed of the permutation.
    """

    def __init__(self, step: int, input_scale: float = 1e3, scramble: bool = True, seed: int = 0) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"`step` must be an integer >= 0, got {step!r}")
        if not (isinstance(input_scale, (int, float)) and math.isfinite(input_scale)):
            raise ValueError(f"`input_scale` must be a finite number, got {input_scale!r}")
        self.step = step
        self.input_scale = float(input_scale)
        self.scramble = scramble
        self.seed = seed
        self.corrupted: list[int] = []  # batch indices corrupted so far

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step:
            return
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"CorruptBatch expects an (inputs, targets) batch, got {type(batch).__name__}")
        x, y = batch
        with torch.no_grad():
            if self.scramble:
                g = torch.Generator().manual_seed(self.seed + len(self.corrupted))
                perm = torch.randperm(y.shape[0], generator=g).to(y.device)
                y.copy_(y[perm])
            x.mul_(self.input_scale)
        self.corrupted.append(batch_idx)


# -- the demonstration ----------------------------------------------------------------------------------

#: The run that gets the bad batch: the deep-MLP recipe's ``relu_he`` variant made shallow (4 layers) and
#: strongly L2-regularised. Its training loss settles on a floor (~0.1 on the digits) that hardly depends
#: on the path taken to it (seeds 0-2 end within ~10% of each other), so comparing final losses measures
#: the damage done by the bad batch, not the randomness of the path. A run whose loss goes to ~0 (the
#: 30-layer nets) is no place for a 5% comparison: its final loss varies by a factor of 2-3 with the seed.
BASE_RECIPE = deep_mlp.RECIPE.name
BASE_VARIANT = "relu_he"
BASE_MODEL: dict[str, Any] = {"depth": 4, "lr": 0.05, "weight_decay": 0.02}
MAX_STEPS = 600
CORRUPT_STEP = 250


def corrupted_recipe(
    step: int = CORRUPT_STEP,
    max_steps: int = MAX_STEPS,
    input_scale: float = 1e3,
    seed: int = 0,
    autopilots: list[StabilityAutopilot] | None = None,
) -> Recipe:
    """The :class:`~recipes.spec.Recipe` of the demonstration, named ``corrupted``, with the three runs
    as its variants. Any training loss counts (the bad batch's own loss is huge by design); only a
    non-finite one counts as diverged. Each autopilot built is appended to ``autopilots``."""
    base = deep_mlp.RECIPE
    model = {**base.variants[BASE_VARIANT].model, **BASE_MODEL}

    def corrupt() -> list[Callback]:
        return [CorruptBatch(step, input_scale, seed=seed)]

    def corrupt_with_autopilot() -> list[Callback]:
        pilot = StabilityAutopilot(verbose=False)
        if autopilots is not None:
            autopilots.append(pilot)
        return [*corrupt(), pilot]

    where = f"at step {step} (targets scrambled, inputs x{input_scale:g})"
    variants = {
        "clean": Variant("clean", f"4-layer ReLU MLP, L2 0.02, {max_steps} steps, no corruption", model),
        "corrupted": Variant("corrupted", f"the same run, one corrupted batch {where}", model, corrupt),
        "corrupted_autopilot": Variant(
            "corrupted_autopilot",
            "the corrupted run with StabilityAutopilot (its defaults), which rolls back on a loss spike",
            model,
            corrupt_with_autopilot,
        ),
    }
    cpu = dataclasses.replace(base.presets["cpu"], max_steps=max_steps, val_every_n_steps=max_steps)
    return dataclasses.replace(
        base, name="corrupted", variants=variants, presets={"cpu": cpu}, divergence_bound=math.inf
    )


def corrupted_demo(
    *,
    seed: int = 0,
    step: int = CORRUPT_STEP,
    max_steps: int = MAX_STEPS,
    input_scale: float = 1e3,
    log_dir: str | Path | None = "logs",
    progress: bool = True,
    echo: bool = True,
) -> dict[str, CorruptedResult]:
    """Train the clean run, the run with one corrupted batch, and that run with the autopilot (same seed,
    same data order); write ``summary.json`` and ``summary.md`` under ``<log_dir>/corrupted/`` and print
    the table and the autopilot's timeline.

    Args:
        seed: seed of weights and data order.
        step: optimizer step whose batch is corrupted (``0 <= step < max_steps``).
        max_steps: optimizer steps per run.
        input_scale: factor on the corrupted batch's inputs.
        log_dir: TensorBoard root (``None``: no logs, no summary files).
        progress: show a progress bar over the runs.
        echo: print the table.
    """
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an integer >= 1, got {max_steps!r}")
    if not isinstance(step, int) or not 0 <= step < max_steps:
        raise ValueError(f"`step` must be an integer in [0, max_steps={max_steps}), got {step!r}")
    pilots: list[StabilityAutopilot] = []
    rec = corrupted_recipe(step, max_steps, input_scale, seed, pilots)
    results: dict[str, CorruptedResult] = {}
    bar = tqdm(RUNS, desc="corrupted", unit="run", disable=not progress, leave=True)
    for name in bar:
        bar.set_postfix_str(name)
        before = len(pilots)
        r = run_variant(rec, name, seed=seed, log_dir=log_dir, progress=False)
        pilot = pilots[-1] if len(pilots) > before else None
        clean = results["clean"].final_train_loss if results else r.final_train_loss
        loss = r.final_train_loss
        results[name] = CorruptedResult(
            run=name,
            final_train_loss=loss,
            ratio=loss / clean if loss is not None and clean else None,
            rollbacks=pilot.rollbacks if pilot is not None else 0,
            diverged=r.diverged,
            val_metric=r.val_metric,
            steps=r.steps,
            seconds=r.seconds,
            events=list(pilot.events) if pilot is not None else [],
            log_dir=r.log_dir,
        )
    bar.close()
    summary = summary_of(results, seed=seed, step=step, max_steps=max_steps, input_scale=input_scale)
    if log_dir is not None:
        write_corrupted_summary(Path(log_dir) / "corrupted", rec, summary)
    if echo:
        print(f"\n{corrupted_report(summary)}")
        if log_dir is not None:
            print(f"summary: {Path(log_dir) / 'corrupted' / 'summary.md'}")
    return results


def summary_of(
    results: dict[str, CorruptedResult], *, seed: int, step: int, max_steps: int, input_scale: float
) -> dict[str, Any]:
    """The ``summary.json`` object of a :func:`corrupted_demo` run with these arguments."""
    base = {"recipe": BASE_RECIPE, "variant": BASE_VARIANT, "model": BASE_MODEL}
    return corrupted_summary(base, seed, step, max_steps, input_scale, results)
