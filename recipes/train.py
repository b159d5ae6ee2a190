"""Training one variant of a recipe: :func:`run_variant` and the :class:`RunRecorder` it trains with.

Every run trains with :class:`~stability_callbacks.GradientMonitor` and, when it writes logs,
:class:`~stability_callbacks.HistogramLogger` on, writes TensorBoard logs to
``<log_dir>/<recipe>/<variant>/seed<S>/``, and stops early when it diverges (a non-finite training loss,
or one above the recipe's bound).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from recipes.data import make_datamodule, torchvision_available
from recipes.registry import get_recipe
from recipes.reports import format_number, layer_norms_from_events
from recipes.spec import Preset, Recipe, RunResult
from stability_callbacks import GradientMonitor, HistogramLogger, StabilityAutopilot
from stability_callbacks.diagnosis import RULES, Diagnosis

__all__ = ["RunRecorder", "progress_line", "quiet_lightning", "resolve_data", "run_variant"]


class RunRecorder(Callback):
    """Keeps the training loss of every step, reads the monitor's diagnosis, and stops a diverged run.

    The losses stay on the device and are copied to the host every ``check_every`` steps in one
    transfer; a non-finite loss or one above ``bound`` sets ``trainer.should_stop``. The monitor's
    diagnosis is a host object it already computed: reading it costs nothing. ``warnings`` keeps, for
    each rule that fired during the run, the monitor's plain-words message at the first diagnosis that
    reported it (what the monitor would have warned, without the warning being printed mid-run).

    Args:
        bound: training loss above which the run counts as diverged.
        check_every: steps between host copies of the losses.
        monitor: the run's ``GradientMonitor``, if any.
    """

    def __init__(self, bound: float, check_every: int = 10, monitor: GradientMonitor | None = None) -> None:
        self.bound = bound
        self.check_every = check_every
        self.monitor = monitor
        self.losses: list[float] = []
        self.diverged = False
        self.vanishing = False
        self.exploding = False
        self.ratios: list[tuple[int, float | None]] = []
        self.warnings: dict[str, str] = {}
        self._pending: list[torch.Tensor] = []
        self._last_diag: Any = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._pending.append(loss.detach().float().reshape(()))
        self._read_diagnosis(trainer)
        if len(self._pending) >= self.check_every:
            self._check(trainer)

    def _read_diagnosis(self, trainer: pl.Trainer) -> None:
        diag: Diagnosis | None = getattr(self.monitor, "last_diagnosis", None)
        if diag is None or diag is self._last_diag:
            return
        self._last_diag = diag
        self.ratios.append((trainer.global_step - 1, diag.depth_ratio))
        self.vanishing |= bool(diag.vanishing)
        self.exploding |= bool(diag.exploding)
        fired = [k for k in diag.first_flagged if k in RULES]
        if diag.nonfinite_steps:
            fired.append("nonfinite")
        for kind in fired:
            self.warnings.setdefault(kind, diag.message(kind))

    def _check(self, trainer: pl.Trainer) -> None:
        if not self._pending:
            return
        values = torch.stack(self._pending).tolist()
        self._pending.clear()
        self.losses.extend(values)
        if any(not math.isfinite(v) or v > self.bound for v in values):
            self.diverged = True
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read_diagnosis(trainer)  # the monitor reads the last step once more at the end of the fit
        self._check(trainer)


def _library_callbacks(preset: Preset, histograms: bool) -> tuple[GradientMonitor, list[Callback]]:
    """The monitor, and the histogram logger when the run writes TensorBoard logs (without a logger it
    would only warn that it has nowhere to write)."""
    monitor = GradientMonitor(warn=False)
    if not histograms:
        return monitor, [monitor]
    return monitor, [monitor, HistogramLogger(every_n_steps=preset.histogram_every_n_steps)]


def quiet_lightning() -> None:
    """Silence Lightning's info logs and the warnings a recipe run would print every time."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*")
    warnings.filterwarnings("ignore", message=".*val_check_interval.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning.*")


def progress_line(result: RunResult) -> str:
    """One line for a finished run, e.g. ``deep_mlp/sigmoid seed0: 200 steps in 16.2 s, train loss 2.303``."""
    loss = format_number(result.final_train_loss)
    end = ", diverged" if result.diverged else ""
    return (
        f"{result.recipe}/{result.variant} seed{result.seed}: {result.steps} steps "
        f"in {result.seconds:.1f} s, train loss {loss}{end}"
    )


def resolve_data(recipe: Recipe, preset: Preset, data: str | None, data_dir: str | None) -> str:
    """The data set a run uses: ``data`` if given, else the preset's torchvision set when ``data_dir``
    holds it, else the preset's embedded default."""
    if data is not None:
        return data
    if preset.gpu_data and torchvision_available(preset.gpu_data, data_dir):
        return preset.gpu_data
    return preset.data


def run_variant(
    recipe: str | Recipe,
    variant: str,
    *,
    seed: int = 0,
    max_steps: int | None = None,
    preset: str = "cpu",
    data: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    log_dir: str | Path | None = "logs",
    progress: bool = True,
    model_overrides: dict[str, Any] | None = None,
    extra_callbacks: Sequence[Callback] = (),
    trainer_overrides: dict[str, Any] | None = None,
) -> RunResult:
    """Train one variant of a recipe and return what happened.

    Args:
        recipe: recipe name or :class:`Recipe`.
        variant: variant name.
        seed: seed of weights, data order and generated data.
        max_steps: optimizer steps (the preset's budget if ``None``).
        preset: ``"cpu"`` or ``"gpu"``.
        data: data set name (the preset's if ``None``).
        data_dir: folder of torchvision data sets.
        download: download a missing torchvision data set.
        log_dir: TensorBoard root (``None``: no logger).
        progress: show Lightning's progress bar.
        model_overrides: model arguments applied last (used by the depth table and the tests).
        extra_callbacks: more callbacks for this run.
        trainer_overrides: more ``Trainer`` arguments.
    """
    quiet_lightning()
    rec = recipe if isinstance(recipe, Recipe) else get_recipe(recipe)
    if variant not in rec.variants:
        raise ValueError(
            f"unknown variant {variant!r} of {rec.name}; choose one of {', '.join(rec.variants)}"
        )
    if preset not in rec.presets:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(rec.presets)}")
    pre = rec.presets[preset]
    var = rec.variants[variant]
    steps = pre.max_steps if max_steps is None else max_steps
    if steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {steps!r}")
    data_name = resolve_data(rec, pre, data, data_dir)

    pl.seed_everything(seed, verbose=False)
    kwargs = {**pre.model, **rec.data_args(data_name), **var.model, **(model_overrides or {})}
    model = rec.module(**kwargs)
    dm = make_datamodule(
        data_name,
        flat=rec.flat,
        batch_size=pre.batch_size,
        seed=seed,
        data_dir=data_dir,
        download=download,
        **{**pre.data_kwargs, **var.data},
    )
    monitor, library = _library_callbacks(pre, histograms=log_dir is not None)
    recorder = RunRecorder(rec.divergence_bound, check_every=min(10, steps), monitor=monitor)
    callbacks: list[Callback] = [*library, *var.callbacks(), *extra_callbacks, recorder]

    logger: Any = False
    run_dir: Path | None = None
    if log_dir is not None:
        run_dir = Path(log_dir) / rec.name / variant / f"seed{seed}"
        if run_dir.exists():  # a rerun replaces the previous run of the same variant and seed
            shutil.rmtree(run_dir)
        logger = TensorBoardLogger(
            save_dir=str(Path(log_dir) / rec.name),
            name=variant,
            version=f"seed{seed}",
            default_hp_metric=False,
        )
    trainer_kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        check_val_every_n_epoch=None,
        val_check_interval=min(pre.val_every_n_steps, steps),
        num_sanity_val_steps=0,
        log_every_n_steps=min(pre.log_every_n_steps, steps),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(log_dir) if log_dir is not None else None,
    )
    trainer_kwargs.update(pre.trainer)
    trainer_kwargs.update(trainer_overrides or {})
    trainer = pl.Trainer(**trainer_kwargs)
    threads = torch.get_num_threads()
    if pre.cpu_threads:
        torch.set_num_threads(pre.cpu_threads)
    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=dm)
        metric_name = getattr(model, "val_metric_name", "val_acc")
        val: float | None = None
        if not recorder.diverged:
            out = trainer.validate(model, datamodule=dm, verbose=False)
            val = out[0].get(metric_name) if out else None
            if val is not None and not math.isfinite(val):
                val = None
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    if logger:
        logger.experiment.flush()

    tail = recorder.losses[-min(20, len(recorder.losses)) :]
    final = sum(tail) / len(tail) if tail else None
    if final is not None and not math.isfinite(final):
        final = None
    ratio = next((r for _, r in reversed(recorder.ratios) if r is not None and math.isfinite(r)), None)
    result = RunResult(
        final_train_loss=final,
        val_metric=val,
        val_metric_name=metric_name,
        diverged=recorder.diverged,
        depth_ratio=ratio,
        steps=trainer.global_step,
        seconds=round(seconds, 2),
        recipe=rec.name,
        variant=variant,
        seed=seed,
        vanishing=recorder.vanishing,
        exploding=recorder.exploding,
        losses=recorder.losses,
        ratios=recorder.ratios,
        log_dir=str(run_dir) if run_dir is not None else None,
        cures=var.cures,
        warnings=dict(recorder.warnings),
        actions=[e for cb in callbacks if isinstance(cb, StabilityAutopilot) for e in cb.events],
    )
    if run_dir is not None:
        result.layer_norms = layer_norms_from_events(run_dir, model)
    return result
