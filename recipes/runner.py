"""The recipe runner: one variant, all variants of a recipe side by side, the demo, and the depth table.

Every run trains with :class:`~stability_callbacks.monitor.GradientMonitor` and
:class:`~stability_callbacks.histograms.HistogramLogger` on, writes TensorBoard logs to
``<log_dir>/<recipe>/<variant>/seed<S>/``, and stops early when it diverges (a non-finite training loss,
or one above the recipe's bound). ``compare`` writes ``summary.json``, ``summary.md`` and ``summary.png``
under ``<log_dir>/<recipe>/`` and prints the table.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from recipes.common import Variant
from recipes.data import make_datamodule, torchvision_available

__all__ = [
    "RECIPES",
    "Preset",
    "Recipe",
    "RunRecorder",
    "RunResult",
    "compare",
    "demo",
    "depth_table",
    "format_table",
    "get_recipe",
    "run_variant",
    "write_summary",
]

RECIPES = ("deep_mlp", "resnet", "lstm")


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
    data_args: Any
    flat: bool = False


def get_recipe(name: str) -> Recipe:
    """The :class:`Recipe` called ``name``."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    recipe: Recipe = importlib.import_module(f"recipes.{name}").RECIPE
    return recipe


@dataclass
class RunResult:
    """What one run produced (the first seven fields are the ``summary.json`` entry)."""

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
        flags = [n for n, on in (("vanishing", self.vanishing), ("exploding", self.exploding)) if on]
        return ", ".join(flags) or "-"


class RunRecorder(Callback):
    """Keeps the training loss of every step, reads the monitor's diagnosis, and stops a diverged run.

    The losses stay on the device and are copied to the host every ``check_every`` steps in one
    transfer; a non-finite loss or one above ``bound`` sets ``trainer.should_stop``. The monitor's
    diagnosis is a host object it already computed: reading it costs nothing.

    Args:
        bound: training loss above which the run counts as diverged.
        check_every: steps between host copies of the losses.
        monitor: the run's ``GradientMonitor``, if any.
    """

    def __init__(self, bound: float, check_every: int = 10, monitor: Any = None) -> None:
        self.bound = bound
        self.check_every = check_every
        self.monitor = monitor
        self.losses: list[float] = []
        self.diverged = False
        self.vanishing = False
        self.exploding = False
        self.ratios: list[tuple[int, float | None]] = []
        self._pending: list[torch.Tensor] = []
        self._last_diag: Any = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._pending.append(loss.detach().float().reshape(()))
        diag = getattr(self.monitor, "last_diagnosis", None)
        if diag is not None and diag is not self._last_diag:
            self._last_diag = diag
            self.ratios.append((trainer.global_step - 1, diag.depth_ratio))
            self.vanishing |= bool(diag.vanishing)
            self.exploding |= bool(diag.exploding)
        if len(self._pending) >= self.check_every:
            self._check(trainer)

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
        self._check(trainer)


def _library_callbacks(preset: Preset) -> tuple[Any, list[Callback]]:
    from stability_callbacks.histograms import HistogramLogger
    from stability_callbacks.monitor import GradientMonitor

    monitor = GradientMonitor(warn=False)
    return monitor, [monitor, HistogramLogger(every_n_steps=preset.histogram_every_n_steps)]


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory.*")
    warnings.filterwarnings("ignore", message=".*val_check_interval.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="lightning.*")


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
    _quiet()
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
        **pre.data_kwargs,
    )
    monitor, library = _library_callbacks(pre)
    recorder = RunRecorder(rec.divergence_bound, check_every=min(10, steps), monitor=monitor)
    callbacks: list[Callback] = [*library, *var.callbacks(), *extra_callbacks, recorder]

    logger: Any = False
    run_dir: Path | None = None
    if log_dir is not None:
        from lightning.pytorch.loggers import TensorBoardLogger

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
    )
    if run_dir is not None:
        result.layer_norms = _layer_norms_from_events(run_dir, model)
    return result


def _layer_norms_from_events(run_dir: Path, model: torch.nn.Module) -> list[tuple[str, float]]:
    """Per-layer gradient norms (geometric mean over the run) read back from the run's event file,
    in module order (input to output)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 1, "images": 1})
    acc.Reload()
    tags = set(acc.Tags().get("scalars", []))
    out: list[tuple[str, float]] = []
    for name, mod in model.named_modules():
        tag = f"grad_norm/{name}"
        if name and tag in tags and any(True for _ in mod.parameters(recurse=False)):
            values = [e.value for e in acc.Scalars(tag) if math.isfinite(e.value) and e.value > 0]
            if values:
                out.append((name, math.exp(sum(math.log(v) for v in values) / len(values))))
    return out


# -- tables and summaries -------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
        return f"{x:.1e}"
    return f"{x:.{digits}f}"


def format_table(results: dict[str, RunResult], markdown: bool = False) -> str:
    """The results as an aligned text table (or a Markdown table)."""
    metric = next(iter(results.values())).val_metric_name if results else "val_metric"
    head = ["variant", "train loss", metric, "depth ratio", "diagnosis", "diverged", "steps", "seconds"]
    rows = [
        [
            name,
            _fmt(r.final_train_loss),
            _fmt(r.val_metric),
            _fmt(r.depth_ratio, 2),
            r.diagnosis(),
            "yes" if r.diverged else "no",
            str(r.steps),
            f"{r.seconds:.1f}",
        ]
        for name, r in results.items()
    ]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def write_summary(
    recipe: Recipe, seed: int, results: dict[str, RunResult], out_dir: Path, preset: str = "cpu"
) -> dict[str, Any]:
    """Write ``summary.json``, ``summary.md`` and ``summary.png`` to ``out_dir``; returns the JSON object."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {
        "recipe": recipe.name,
        "seed": seed,
        "variants": {name: r.summary() for name, r in results.items()},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# {recipe.name}: all variants, seed {seed}, preset {preset}",
        "",
        format_table(results, markdown=True),
        "",
        "| variant | what it shows |",
        "|---|---|",
        *(f"| {n} | {recipe.variants[n].description} |" for n in results),
        "",
        f"TensorBoard: `tensorboard --logdir {out_dir}`",
        "",
    ]
    (out_dir / "summary.md").write_text("\n".join(lines))
    _plot(recipe, results, out_dir / "summary.png")
    return summary


def _plot(recipe: Recipe, results: dict[str, RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_grad) = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    for i, (name, r) in enumerate(results.items()):
        color = cmap(i % 20)
        steps = list(range(len(r.losses)))
        losses = [v if math.isfinite(v) and v > 0 else float("nan") for v in r.losses]
        if len(losses) > 50:  # light smoothing so the curves stay readable
            k = max(1, len(losses) // 50)
            losses = [
                sum(losses[j : j + k]) / len(losses[j : j + k])
                if all(math.isfinite(v) for v in losses[j : j + k])
                else float("nan")
                for j in range(0, len(losses), k)
            ]
            steps = list(range(0, len(r.losses), k))
        ax_loss.plot(steps, losses, label=name, color=color, lw=1.2)
        if r.layer_norms:
            ax_grad.plot(
                range(len(r.layer_norms)), [v for _, v in r.layer_norms], label=name, color=color, lw=1.2
            )
    ax_loss.set(title=f"{recipe.name}: training loss", xlabel="step", ylabel="loss", yscale="log")
    ax_grad.set(
        title="gradient norm per layer (geometric mean over the run)",
        xlabel="layer (input -> output)",
        ylabel="L2 norm",
        yscale="log",
    )
    from matplotlib.ticker import MaxNLocator

    ax_grad.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend(fontsize=7, ncol=2)
    ax_grad.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(
    recipe: str,
    *,
    seed: int = 0,
    max_steps: int | None = None,
    preset: str = "cpu",
    data: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    log_dir: str | Path = "logs",
    variants: Sequence[str] | None = None,
    progress: bool = True,
    echo: bool = True,
) -> dict[str, RunResult]:
    """Run every variant of ``recipe`` (or those named) with the same seed and budget, write the summary
    files under ``<log_dir>/<recipe>/`` and print the table."""
    from tqdm.auto import tqdm

    rec = get_recipe(recipe)
    names = list(variants) if variants is not None else list(rec.variants)
    results: dict[str, RunResult] = {}
    bar = tqdm(names, desc=recipe, unit="run", disable=not progress, leave=True)
    for name in bar:
        bar.set_postfix_str(name)
        results[name] = run_variant(
            rec,
            name,
            seed=seed,
            max_steps=max_steps,
            preset=preset,
            data=data,
            data_dir=data_dir,
            download=download,
            log_dir=log_dir,
            progress=False,
        )
    bar.close()
    write_summary(rec, seed, results, Path(log_dir) / rec.name, preset=preset)
    if echo:
        print(f"\n{recipe} (seed {seed}, preset {preset})")
        print(format_table(results))
        print(f"summary: {Path(log_dir) / rec.name / 'summary.md'}")
    return results


def demo(
    *, seed: int = 0, log_dir: str | Path = "logs", max_steps: int | None = None, progress: bool = True
) -> dict[str, dict[str, RunResult]]:
    """``compare`` for every recipe on the CPU preset; prints each table and the total time."""
    start = time.perf_counter()
    out = {
        name: compare(name, seed=seed, max_steps=max_steps, log_dir=log_dir, progress=progress)
        for name in RECIPES
    }
    print(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s; see it with: tensorboard --logdir {log_dir}"
    )
    return out


# -- depth table ----------------------------------------------------------------------------------------


def depth_table(
    *,
    depths: Sequence[int] = (10, 50, 100),
    steps: int = 150,
    seed: int = 0,
    activations: Sequence[str] = ("sigmoid", "relu"),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Depth ratio (first layer's gradient norm over the last layer's, from ``GradientMonitor``) at
    initialisation and after ``steps`` steps, and the validation accuracy after ``steps`` steps, for the
    deep MLP at each depth, plain and residual, with each activation (ReLU with He initialisation)."""
    from tqdm.auto import tqdm

    from stability_callbacks.monitor import GradientMonitor

    rec = get_recipe("deep_mlp")
    configs = [(d, a, r) for d in depths for a in activations for r in (False, True)]
    rows: list[dict[str, Any]] = []
    for depth, act, residual in tqdm(configs, desc="depth-table", unit="run", disable=not progress):
        monitor = GradientMonitor(log_every_n_steps=1, per_layer=False, warn=False)
        recorder = RunRecorder(rec.divergence_bound, check_every=min(10, steps), monitor=monitor)
        pl.seed_everything(seed, verbose=False)
        overrides = {"depth": depth, "activation": act, "residual": residual}
        overrides["init"] = "he" if act in ("relu", "leaky_relu", "elu", "silu") else "default"
        pre = rec.presets["cpu"]
        model = rec.module(**{**pre.model, **overrides})
        dm = make_datamodule("digits", batch_size=pre.batch_size, seed=seed)
        _quiet()
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            max_epochs=-1,
            logger=False,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            limit_val_batches=0,
            callbacks=[monitor, recorder],
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(pre.cpu_threads or threads)
        try:
            trainer.fit(model, datamodule=dm)
        finally:
            torch.set_num_threads(threads)
        val = None
        if not recorder.diverged:
            model.eval()
            dm.setup("validate")
            with torch.no_grad():
                correct = total = 0
                for x, y in dm.val_dataloader():
                    correct += int((model(x).argmax(-1) == y).sum())
                    total += len(y)
            val = correct / total
        ratios = recorder.ratios
        rows.append(
            {
                "depth": depth,
                "activation": act,
                "residual": residual,
                "depth_ratio_init": ratios[0][1] if ratios else None,
                "depth_ratio_final": ratios[-1][1] if ratios else None,
                "val_acc": val,
                "diverged": recorder.diverged,
                "steps": trainer.global_step,
            }
        )
    return rows


def format_depth_table(rows: Sequence[dict[str, Any]]) -> str:
    """The depth table as aligned text."""
    head = ["depth", "activation", "net", "ratio at init", "ratio after K", "val_acc"]
    body = [
        [
            str(r["depth"]),
            r["activation"],
            "residual" if r["residual"] else "plain",
            _fmt(r["depth_ratio_init"], 2),
            _fmt(r["depth_ratio_final"], 2),
            _fmt(r["val_acc"]),
        ]
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=False)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)]
    )
