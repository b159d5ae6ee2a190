"""The shared types of the recipes: a :class:`Variant`, a :class:`Preset`, a :class:`Recipe` (which also
holds the one LightningCLI entry point of the recipe modules), and the results of a run.

A recipe is a LightningModule plus a table of named variants. A variant is only a combination of model
flags and library callbacks; the recipes compute no gradient statistics and clip nothing themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import ArgsType, LightningCLI

__all__ = ["CorruptedResult", "Preset", "Recipe", "RunResult", "Variant", "filter_third_party_warnings"]


def filter_third_party_warnings() -> None:
    """Hide the warnings of other packages that a recipe run would print every time and that say nothing
    about the run: torch's ``isinstance(treespec, LeafSpec)`` deprecation (raised inside Lightning),
    Lightning's litlogger tip and its ``num_workers`` hints. Called by the recipes' entry points only
    (``python -m recipes`` and :meth:`Recipe.cli_main`), never by the library."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info logs
    if _LITLOGGER_TIP not in tips.filters:
        tips.addFilter(_LITLOGGER_TIP)


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


_LITLOGGER_TIP = _DropLitLoggerTip()


class _RecipeCLI(LightningCLI):
    """LightningCLI that runs with the recipe's CPU thread count when the trainer is on the CPU."""

    def __init__(self, *args: Any, cpu_threads: int | None = None, **kwargs: Any) -> None:
        self.cpu_threads = cpu_threads
        super().__init__(*args, **kwargs)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if self.cpu_threads and isinstance(self.trainer.accelerator, CPUAccelerator):
            torch.set_num_threads(self.cpu_threads)


@dataclass
class Variant:
    """One named run of a recipe: a pathology or a remedy.

    Args:
        name: the variant's name (``--variant``).
        description: one line saying what it shows.
        model: keyword arguments that override the recipe's model defaults.
        callbacks: builds the library callbacks this variant adds (besides the monitor, which every run
            has, and the histogram logger, which every run that writes logs has); called once per run,
            so every run gets fresh callbacks.
        cures: for a remedy, the name of the pathology variant of the same recipe it cures (shown next to
            that pathology's numbers in the compare table and stored in ``summary.json``); ``None`` for a
            pathology, a baseline, or a remedy that cures nothing in this setting.
        data: data module arguments that override the preset's ``data_kwargs`` (a pathology shown at its
            own sequence length, say).
    """

    name: str
    description: str
    model: dict[str, Any] = field(default_factory=dict)
    callbacks: Callable[[], list[Callback]] = field(default=lambda: [])
    cures: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Preset:
    """A budget and scale for a recipe.

    Args:
        max_steps: optimizer steps per run.
        batch_size: training batch size.
        data: data set name (see :mod:`recipes.data`).
        model: model keyword arguments for this preset (variants override them).
        data_kwargs: extra data module arguments (e.g. ``seq_len``).
        trainer: extra ``Trainer`` arguments (accelerator, precision).
        log_every_n_steps: Lightning's and the monitor's logging cadence.
        histogram_every_n_steps: the histogram logger's cadence.
        val_every_n_steps: validation cadence during training (a final validation always runs).
        gpu_data: data set to use instead of ``data`` when ``--data-dir`` holds it.
        cpu_threads: intra-op threads for the run (``None``: PyTorch's default). The CPU presets' models
            are tiny: one thread is as fast as two and does not thrash when other jobs share the cores.
    """

    max_steps: int
    batch_size: int
    data: str
    model: dict[str, Any] = field(default_factory=dict)
    data_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    log_every_n_steps: int = 10
    histogram_every_n_steps: int = 100
    val_every_n_steps: int = 200
    gpu_data: str | None = None
    cpu_threads: int | None = None


@dataclass
class Recipe:
    """A recipe: its LightningModule, its variants, its presets and its divergence bound.

    Args:
        name: ``deep_mlp``, ``resnet`` or ``lstm``.
        module: the LightningModule class.
        variants: the named variants, in display order.
        presets: ``"cpu"`` and ``"gpu"`` budgets.
        divergence_bound: a training loss above this (or non-finite) counts as diverged.
        data_args: maps a data set name to the model arguments it implies (input size, classes).
        flat: image data as flat vectors (the MLP) rather than images.
    """

    name: str
    module: type[pl.LightningModule]
    variants: dict[str, Variant]
    presets: dict[str, Preset]
    divergence_bound: float
    data_args: Callable[[str], dict[str, Any]]
    flat: bool = False

    def cli_main(self, args: ArgsType = None) -> None:
        """LightningCLI entry point of the recipe's module: ``python -m recipes.<name> fit --config ...``.

        On the CPU it trains with the CPU preset's thread count (``cpu_threads``), as ``python -m recipes
        run`` does, and restores the previous count when it returns.
        """
        filter_third_party_warnings()
        threads = torch.get_num_threads()
        try:
            _RecipeCLI(
                self.module,
                pl.LightningDataModule,
                subclass_mode_data=True,
                args=args,
                cpu_threads=self.presets["cpu"].cpu_threads if "cpu" in self.presets else None,
            )
        finally:
            torch.set_num_threads(threads)


@dataclass
class RunResult:
    """What one run produced (the first seven fields are the ``summary.json`` entry; ``cures``, the
    monitor's ``warnings`` (rule -> its plain-words message, the first time the rule fired) and the
    autopilot's ``actions`` (its timeline) are stored beside them by :mod:`recipes.reports`)."""

    final_train_loss: float | None
    val_metric: float | None
    val_metric_name: str
    diverged: bool
    depth_ratio: float | None
    steps: int
    seconds: float
    recipe: str = ""
    variant: str = ""
    seed: int = 0
    vanishing: bool = False
    exploding: bool = False
    losses: list[float] = field(default_factory=list)
    ratios: list[tuple[int, float | None]] = field(default_factory=list)
    layer_norms: list[tuple[str, float]] = field(default_factory=list)
    log_dir: str | None = None
    cures: str | None = None
    warnings: dict[str, str] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` entry of this run."""
        return {
            "final_train_loss": self.final_train_loss,
            "val_metric": self.val_metric,
            "val_metric_name": self.val_metric_name,
            "diverged": self.diverged,
            "depth_ratio": self.depth_ratio,
            "steps": self.steps,
            "seconds": self.seconds,
        }

    def diagnosis(self) -> str:
        """The monitor's flags raised during the run, in words."""
        seen = {"vanishing": self.vanishing, "exploding": self.exploding}
        kinds = ("vanishing", "exploding", "diverging", "nonfinite")
        flags = [k for k in kinds if seen.get(k) or k in self.warnings]
        return ", ".join(flags) or "-"


@dataclass
class CorruptedResult:
    """One run of the corrupted-batch demonstration (:mod:`recipes.corrupted`).

    Args:
        run: ``clean``, ``corrupted`` or ``corrupted_autopilot``.
        final_train_loss: mean training loss of the last 20 steps (``None`` if non-finite).
        ratio: ``final_train_loss`` over the clean run's (``None`` if either is missing).
        rollbacks: rollbacks the autopilot made (0 without it).
        diverged: the training loss became non-finite (the run then stops).
        val_metric: validation accuracy at the end (``None`` if diverged).
        steps: optimizer steps done.
        seconds: wall time of the fit.
        events: the autopilot's timeline (what it did and why).
        log_dir: the run's TensorBoard folder.
    """

    run: str
    final_train_loss: float | None
    ratio: float | None
    rollbacks: int
    diverged: bool
    val_metric: float | None
    steps: int
    seconds: float
    events: list[str] = field(default_factory=list)
    log_dir: str | None = None

    def summary(self) -> dict[str, Any]:
        """The ``summary.json`` entry of this run."""
        out = dataclasses.asdict(self)
        del out["run"], out["log_dir"]
        return out
