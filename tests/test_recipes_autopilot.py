"""Recipes with StabilityAutopilot: the ``autopilot`` variant of every recipe, the batch corruptor and the
``python -m recipes corrupted`` command (fast; the claims themselves are in test_recipes_claims.py)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from recipes import runner
from recipes.corrupted import RUNS, CorruptBatch, corrupted_demo
from recipes.data import DigitsDataModule, load_digits_split
from recipes.deep_mlp import DeepMLP
from stability_callbacks import StabilityAutopilot
from stability_callbacks.init import InitSwap

# -- the autopilot variants --------------------------------------------------------------------------------

PATHOLOGY = {"deep_mlp": "sigmoid", "lstm": "rnn_exploding", "resnet": "plain_nobn", "transformer": "high_lr"}


@pytest.mark.parametrize("recipe", runner.RECIPES)
def test_autopilot_variant_is_the_pathology_plus_the_autopilot(recipe: str) -> None:
    rec = runner.get_recipe(recipe)
    var = rec.variants["autopilot"]
    assert var.model == rec.variants[PATHOLOGY[recipe]].model
    assert rec.variants[PATHOLOGY[recipe]].callbacks() == []
    callbacks = var.callbacks()
    assert len(callbacks) == 1 and isinstance(callbacks[0], StabilityAutopilot)
    pilot = callbacks[0]
    assert pilot.rollback and set(pilot.children) == {"reinit", "guard", "clipper"}
    reinit = pilot.children["reinit"]
    assert isinstance(reinit, InitSwap) and reinit.when == "on_vanishing"
    # a 30-layer sigmoid stack needs centred LSUV; the other recipes keep the activation-aware default
    assert reinit.scheme == ("lsuv" if recipe == "deep_mlp" else "auto")
    assert var.callbacks()[0] is not pilot  # a fresh autopilot for every run
    pre = rec.presets["cpu"]
    model = rec.module(**{**pre.model, **rec.data_args(pre.data), **var.model})
    x = torch.randn(3, 50, 2) if recipe == "lstm" else torch.randn(3, 64)
    if recipe == "resnet":
        x = x.view(3, 1, 8, 8)
    if recipe == "transformer":  # next-byte logits at every position
        assert model(torch.randint(0, 256, (3, 64))).shape == (3, 64, 256)
        return
    assert model(x).shape == (3, 1 if recipe == "lstm" else 10)


# -- CorruptBatch ------------------------------------------------------------------------------------------


def test_corrupt_batch_changes_exactly_the_chosen_step() -> None:
    cb = CorruptBatch(step=4, input_scale=1e3, seed=7)
    x0, y0 = torch.randn(16, 5), torch.arange(16)
    x, y = x0.clone(), y0.clone()
    for step in (0, 3, 5):
        cb.on_train_batch_start(SimpleNamespace(global_step=step), None, (x, y), 0)  # type: ignore[arg-type]
    assert torch.equal(x, x0) and torch.equal(y, y0) and cb.corrupted == []
    cb.on_train_batch_start(SimpleNamespace(global_step=4), None, (x, y), 9)  # type: ignore[arg-type]
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(x, x0 * 1e3)
    assert torch.equal(y, y0[perm]) and not torch.equal(y, y0)
    assert cb.corrupted == [9]
    keep = CorruptBatch(step=0, input_scale=2.0, scramble=False)
    keep.on_train_batch_start(SimpleNamespace(global_step=0), None, (x, y), 0)  # type: ignore[arg-type]
    assert torch.equal(y, y0[perm]) and torch.equal(x, x0 * 2e3)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"step": -1}, "step"),
        ({"step": 1.5}, "step"),
        ({"step": 1, "input_scale": float("inf")}, "input_scale"),
    ],
)
def test_corrupt_batch_bad_arguments(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        CorruptBatch(**kwargs)


def test_corrupt_batch_rejects_a_batch_it_cannot_read() -> None:
    with pytest.raises(TypeError, match="inputs, targets"):
        CorruptBatch(0).on_train_batch_start(
            SimpleNamespace(global_step=0),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            {"x": torch.ones(2)},
            0,
        )


class _LossSpy(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def test_corrupt_batch_in_a_fit_hits_one_step_and_leaves_the_data_alone() -> None:
    pl.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=32, seed=0)
    model = DeepMLP(depth=3, width=16, activation="relu", init="he")
    spy = _LossSpy()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[CorruptBatch(step=3), spy],
    )
    trainer.fit(model, datamodule=dm)
    assert len(spy.losses) == 6
    others = spy.losses[:3]
    assert spy.losses[3] > 100 * max(others)  # inputs x1e3: the loss of that step alone explodes
    x_tr, y_tr, _, _ = load_digits_split()
    assert dm.train_set is not None
    assert torch.equal(dm.train_set.tensors[0], x_tr) and torch.equal(dm.train_set.tensors[1], y_tr)  # type: ignore[attr-defined]


def test_corrupted_demo_bad_step() -> None:
    with pytest.raises(ValueError, match="step"):
        corrupted_demo(step=10, max_steps=10, log_dir=None, progress=False, echo=False)


# -- python -m recipes corrupted ---------------------------------------------------------------------------


def test_corrupted_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = sys.argv
    sys.argv = [
        "python -m recipes",
        "corrupted",
        "--max-steps",
        "40",
        "--step",
        "30",
        "--log-dir",
        str(tmp_path),
    ]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("recipes", run_name="__main__")
    finally:
        sys.argv = old
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "ratio to clean" in out and "rollbacks" in out
    for run in RUNS:
        assert f"\n{run} " in out
        assert list((tmp_path / "corrupted" / run / "seed0").glob("events.out.tfevents.*")), run
    summary = json.loads((tmp_path / "corrupted" / "summary.json").read_text())
    assert summary["corrupt_step"] == 30 and summary["seed"] == 0 and list(summary["runs"]) == list(RUNS)
    runs = summary["runs"]
    assert runs["clean"]["ratio"] == 1.0 and runs["clean"]["steps"] == 40
    assert runs["clean"]["rollbacks"] == runs["corrupted"]["rollbacks"] == 0
    # the autopilot skipped the bad batch at step 30 before its update, so no rollback was needed
    pilot = runs["corrupted_autopilot"]
    assert pilot["rollbacks"] == 0 and not pilot["diverged"] and pilot["steps"] == 40
    assert pilot["events"][0].startswith("step 31: [skip] step 30 was an outlier")
    assert "corrupted_autopilot: step 31: [skip] step 30 was an outlier" in out
    assert "| corrupted_autopilot |" in (tmp_path / "corrupted" / "summary.md").read_text()
