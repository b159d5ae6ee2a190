"""The recipe runner: all variants of a recipe side by side, the demo, and the depth table.

Each run goes through :func:`recipes.train.run_variant`. ``compare`` writes ``summary.json``,
``summary.md`` and ``summary.png`` under ``<log_dir>/<recipe>/`` and prints the table. The recipe
lookup, :func:`~recipes.train.run_variant` and the types and tables a caller needs with them are
importable from here too.
"""

from __future__ import annotations

import multiprocessing
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from tqdm.auto import tqdm

from recipes import reports
from recipes.data import make_datamodule
from recipes.registry import RECIPES, get_recipe
from recipes.reports import format_table, write_summary
from recipes.spec import Preset, Recipe, RunResult, filter_third_party_warnings
from recipes.train import RunRecorder, progress_line, quiet_lightning, run_variant
from stability_callbacks import GradientMonitor

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
    progress: bool = False,
    echo: bool = True,
    jobs: int = 1,
) -> dict[str, RunResult]:
    """Run every variant of ``recipe`` (or those named) with the same seed and budget, write the summary
    files under ``<log_dir>/<recipe>/`` and print the table.

    Unknown names in ``variants`` raise ``ValueError`` before anything trains. ``progress`` shows
    Lightning's progress bar in each run; ``echo`` prints one line as each run ends, then the table.
    ``jobs`` > 1 trains that many variants at once, each in its own process: every run seeds itself, so
    the numbers are those of one run after another (only the wall times differ).
    """
    rec = get_recipe(recipe)
    names = list(variants) if variants is not None else list(rec.variants)
    unknown = [n for n in names if n not in rec.variants]
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(map(repr, unknown))} of {rec.name}; "
            f"choose from {', '.join(rec.variants)}"
        )
    if jobs < 1:
        raise ValueError(f"`jobs` must be >= 1, got {jobs!r}")
    kwargs: dict[str, Any] = dict(
        seed=seed,
        max_steps=max_steps,
        preset=preset,
        data=data,
        data_dir=data_dir,
        download=download,
        log_dir=log_dir,
        progress=progress and jobs == 1,
    )
    results: dict[str, RunResult] = {}
    if jobs == 1:
        for name in names:
            results[name] = run_variant(rec, name, **kwargs)
            if echo:
                print(progress_line(results[name]), flush=True)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=filter_third_party_warnings) as pool:
            futures = {name: pool.submit(run_variant, rec.name, name, **kwargs) for name in names}
            for name in names:  # in the recipe's order, whichever ends first
                results[name] = futures[name].result()
                if echo:
                    print(progress_line(results[name]), flush=True)
    write_summary(rec, seed, results, Path(log_dir) / rec.name, preset=preset)
    if echo:
        print(f"\n{recipe} (seed {seed}, preset {preset})")
        print(format_table(results))
        print(f"summary: {Path(log_dir) / rec.name / 'summary.md'}")
    return results


def demo(
    *,
    seed: int = 0,
    log_dir: str | Path = "logs",
    max_steps: int | None = None,
    progress: bool = False,
    recipes: Sequence[str] | None = None,
    write_readme: bool = False,
    readme: str | Path = reports.README,
    results_dir: str | Path = reports.RESULTS_DIR,
    jobs: int = 1,
) -> dict[str, dict[str, RunResult]]:
    """``compare`` for every recipe (or those named) on the CPU preset; prints a line per run, each table
    with what the monitor said and what the autopilot did, and the total time (``progress``: Lightning's
    progress bar in each run; ``jobs``: variants trained at once, see :func:`compare`).

    With ``write_readme``, each recipe's ``summary.json`` is also copied to ``<results_dir>/<recipe>.json``
    (the committed summaries) and the README's generated sections of those recipes are rewritten from
    them (:func:`recipes.reports.write_readme`).
    """
    names = list(recipes) if recipes is not None else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise ValueError(
            f"unknown recipe(s) {', '.join(map(repr, unknown))}; choose from {', '.join(RECIPES)}"
        )
    start = time.perf_counter()
    out = {
        name: compare(name, seed=seed, max_steps=max_steps, log_dir=log_dir, progress=progress, jobs=jobs)
        for name in names
    }
    print(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s; see it with: tensorboard --logdir {log_dir}"
    )
    if write_readme:
        results = Path(results_dir)
        results.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(Path(log_dir) / name / "summary.json", results / f"{name}.json")
        changed = reports.write_readme(names, Path(readme), results)
        print(f"summaries: {results}; README sections rewritten: {', '.join(changed) or 'none (unchanged)'}")
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
        quiet_lightning()
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
