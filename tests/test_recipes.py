"""Recipes: data modules, models, every variant for a few steps, the runner's commands and the CLI configs."""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from recipes import runner
from recipes.data import (
    AddingDataModule,
    DigitsDataModule,
    SeqDigitsDataModule,
    TorchvisionDataModule,
    adding_problem,
    load_digits_split,
)
from recipes.deep_mlp import DeepMLP, HighwayLayer, ResidualLayer
from recipes.lstm import SequenceModel
from recipes.resnet import CifarResNet, ResNetClassifier

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {
    "final_train_loss",
    "val_metric",
    "val_metric_name",
    "diverged",
    "depth_ratio",
    "steps",
    "seconds",
}

# -- data --------------------------------------------------------------------------------------------------


def test_digits_split_is_fixed_stratified_and_standardised() -> None:
    x_tr, y_tr, x_va, y_va = load_digits_split()
    assert x_tr.shape == (1437, 64) and x_va.shape == (360, 64)
    assert y_tr.dtype == torch.long and set(y_va.tolist()) == set(range(10))
    # stratified: every class holds 20% +- one sample of its members in the validation split
    for c in range(10):
        n_va, n_all = int((y_va == c).sum()), int((y_va == c).sum() + (y_tr == c).sum())
        assert abs(n_va - 0.2 * n_all) <= 1
    # standardised with the training statistics (constant pixels stay 0)
    assert torch.allclose(x_tr.mean(0), torch.zeros(64), atol=1e-5)
    std = x_tr.std(0)
    assert torch.all(((std - 1).abs() < 1e-4) | (std == 0))
    again = load_digits_split()
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_va)


def test_digits_shapes_flat_image_and_sequence() -> None:
    flat = DigitsDataModule(batch_size=32, flat=True)
    x, y = next(iter(flat.train_dataloader()))
    assert x.shape == (32, 64) and y.shape == (32,)
    img = DigitsDataModule(batch_size=16, flat=False)
    x, _ = next(iter(img.train_dataloader()))
    assert x.shape == (16, 1, 8, 8)
    seq = SeqDigitsDataModule(batch_size=8)
    x, y = next(iter(seq.val_dataloader()))
    assert x.shape == (360, 64, 1) and y.shape == (360,)
    # the image is the flat vector reshaped, the sequence reads it pixel by pixel
    flat_val = next(iter(flat.val_dataloader()))[0]
    img_val = next(iter(img.val_dataloader()))[0]
    assert torch.equal(img_val.reshape(-1, 64), flat_val) and torch.equal(x.squeeze(-1), flat_val)


def test_adding_problem_known_answers() -> None:
    x, y = adding_problem(2000, seq_len=50, seed=3)
    assert x.shape == (2000, 50, 2) and y.shape == (2000, 1)
    markers = x[..., 1]
    assert torch.equal(markers.sum(1), torch.full((2000,), 2.0))
    assert torch.all(markers[:, :25].sum(1) == 1) and torch.all(markers[:, 25:].sum(1) == 1)
    assert torch.allclose((x[..., 0] * markers).sum(1, keepdim=True), y)
    assert torch.all((x[..., 0] >= 0) & (x[..., 0] <= 1))
    # the mean predictor's MSE is Var(U1 + U2) = 1/6
    big_y = adding_problem(40000, seq_len=10, seed=0)[1]
    assert abs(float(((big_y - 1.0) ** 2).mean()) - 1 / 6) < 0.005
    assert torch.equal(adding_problem(5, 20, seed=1)[0], adding_problem(5, 20, seed=1)[0])
    assert not torch.equal(adding_problem(5, 20, seed=1)[0], adding_problem(5, 20, seed=2)[0])


def test_adding_datamodule_and_bad_input() -> None:
    dm = AddingDataModule(seq_len=30, n_train=128, n_val=64, batch_size=16, seed=0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 30, 2) and y.shape == (16, 1)
    assert len(dm.val_set) == 64  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seq_len"):
        AddingDataModule(seq_len=1)
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)


def test_missing_torchvision_set_names_set_and_folder(tmp_path: Path) -> None:
    dm = TorchvisionDataModule("fashion_mnist", data_dir=str(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError, match=r"fashion_mnist.*nothing"):
        dm.setup()
    with pytest.raises(ValueError, match="name"):
        TorchvisionDataModule("imagenet")


# -- models ------------------------------------------------------------------------------------------------


def test_deep_mlp_structure() -> None:
    plain = DeepMLP(depth=7, width=8)
    assert sum(isinstance(m, nn.Linear) for m in plain.modules()) == 7
    assert sum(isinstance(m, nn.Sigmoid) for m in plain.modules()) == 6
    res = DeepMLP(depth=7, width=8, residual=True, activation="relu", init="he")
    assert sum(isinstance(m, ResidualLayer) for m in res.modules()) == 5
    hw = DeepMLP(depth=6, width=8, highway=True)
    gates = [m.gate for m in hw.modules() if isinstance(m, HighwayLayer)]
    assert len(gates) == 4 and all(torch.all(g.bias == -4.0) for g in gates)
    bn = DeepMLP(depth=4, width=8, norm="batch")
    assert sum(isinstance(m, nn.BatchNorm1d) for m in bn.modules()) == 3
    assert DeepMLP(depth=4, width=8, norm="layer")(torch.randn(5, 64)).shape == (5, 10)
    leaky = DeepMLP(depth=3, width=8, activation="leaky_relu")
    assert [m.negative_slope for m in leaky.modules() if isinstance(m, nn.LeakyReLU)] == [0.2, 0.2]


def test_deep_mlp_he_init_has_the_activation_gain() -> None:
    torch.manual_seed(0)
    net = DeepMLP(depth=4, width=2000, in_features=2000, activation="leaky_relu", init="he")
    hidden = net.net[2]
    assert isinstance(hidden, nn.Linear)
    expected = math.sqrt(2.0 / (1 + 0.2**2)) / math.sqrt(2000)
    assert abs(float(hidden.weight.std()) / expected - 1) < 0.01
    assert torch.all(hidden.bias == 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depth": 1},
        {"activation": "gelu"},
        {"norm": "group"},
        {"init": "lecun"},
        {"residual": True, "highway": True},
        {"optimizer": "lamb"},
        {"lr": 0.0},
        {"dropout": 1.0},
    ],
)
def test_deep_mlp_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DeepMLP(**kwargs)


def test_cifar_resnet_depth_and_shortcuts() -> None:
    net = CifarResNet(depth=20, in_channels=1, width=4)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 convolutions and the classifier
    x = torch.randn(3, 1, 8, 8)
    assert net(x).shape == (3, 10)
    plain = CifarResNet(depth=20, in_channels=1, width=4, plain=True)
    plain.load_state_dict(net.state_dict())
    net.eval()
    plain.eval()
    assert not torch.allclose(net(x), plain(x))
    nf = CifarResNet(depth=8, in_channels=1, width=4, norm_free=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nf.modules())
    with pytest.raises(ValueError, match="depth"):
        CifarResNet(depth=21)
    r18 = ResNetClassifier(backbone="resnet18", in_channels=1)
    assert r18(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_sequence_model_recurrent_init_scale() -> None:
    model = SequenceModel(cell="lstm", hidden=8, recurrent_init_scale=2.0)
    w = model.rnn.weight_hh_l0
    for block in w.split(8, dim=0):  # each gate's block is 2 x orthogonal
        assert torch.allclose(block @ block.T, 4 * torch.eye(8), atol=1e-5)
    assert model(torch.randn(4, 11, 2)).shape == (4, 1)
    cls = SequenceModel(cell="gru", hidden=8, input_size=1, num_outputs=10, task="classification")
    assert cls(torch.randn(4, 64, 1)).shape == (4, 10)
    with pytest.raises(ValueError, match="cell"):
        SequenceModel(cell="transformer")


# -- every variant, a few steps -----------------------------------------------------------------------------

ALL_VARIANTS = [(r, v) for r in runner.RECIPES for v in runner.get_recipe(r).variants]


@pytest.mark.parametrize(("recipe", "variant"), ALL_VARIANTS, ids=[f"{r}-{v}" for r, v in ALL_VARIANTS])
def test_every_variant_runs_three_steps(tmp_path: Path, recipe: str, variant: str) -> None:
    result = runner.run_variant(recipe, variant, max_steps=3, log_dir=tmp_path, progress=False)
    assert set(result.summary()) == SUMMARY_KEYS
    assert result.steps == 3 or result.diverged
    assert result.val_metric_name == ("val_mse" if recipe == "lstm" else "val_acc")
    if not result.diverged:
        assert result.val_metric is not None and math.isfinite(result.val_metric)
        assert result.final_train_loss is not None and len(result.losses) == 3
    events = list((tmp_path / recipe / variant / "seed0").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under logs/<recipe>/<variant>/"
    assert runner.get_recipe(recipe).variants[variant].description


def test_diverged_run_stops_early_and_reports_it(tmp_path: Path) -> None:
    result = runner.run_variant("lstm", "rnn_exploding", max_steps=200, log_dir=None, progress=False)
    assert result.diverged and result.steps < 200
    assert result.val_metric is None
    assert any(not math.isfinite(v) or v > 1e6 for v in result.losses)


def test_unknown_names_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="variant"):
        runner.run_variant("deep_mlp", "nope", log_dir=None)
    with pytest.raises(ValueError, match="recipe"):
        runner.get_recipe("transformer")
    with pytest.raises(ValueError, match="max_steps"):
        runner.run_variant("deep_mlp", "sigmoid", max_steps=0, log_dir=None)


# -- the runner's commands ---------------------------------------------------------------------------------


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    old = sys.argv
    sys.argv = ["python -m recipes", *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module("recipes", run_name="__main__")
    finally:
        sys.argv = old
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_list_names_every_variant_with_a_description() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "recipes", "list"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    for recipe, variant in ALL_VARIANTS:
        desc = runner.get_recipe(recipe).variants[variant].description
        assert f"{variant}  " in out and desc in out


def test_run_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _main(
        ["run", "deep_mlp", "--variant", "relu_he", "--max-steps", "3", "--log-dir", str(tmp_path)], capsys
    )
    assert "relu_he" in out and "val_acc" in out
    assert list((tmp_path / "deep_mlp" / "relu_he" / "seed0").glob("events.out.tfevents.*"))


def test_compare_writes_summary_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _main(["compare", "resnet", "--max-steps", "2", "--seed", "3", "--log-dir", str(tmp_path)], capsys)
    summary = json.loads((tmp_path / "resnet" / "summary.json").read_text())
    assert summary["recipe"] == "resnet" and summary["seed"] == 3
    assert list(summary["variants"]) == list(runner.get_recipe("resnet").variants)
    for entry in summary["variants"].values():
        assert set(entry) == SUMMARY_KEYS
        assert isinstance(entry["diverged"], bool) and entry["steps"] == 2
        assert entry["val_metric_name"] == "val_acc"
        for key in ("final_train_loss", "val_metric", "depth_ratio"):
            assert entry[key] is None or isinstance(entry[key], float)
        assert isinstance(entry["seconds"], float)
    md = (tmp_path / "resnet" / "summary.md").read_text()
    assert "| plain |" in md and "nf_agc" in md
    assert (tmp_path / "resnet" / "summary.png").read_bytes()[:4] == b"\x89PNG"
    for name in summary["variants"]:
        assert name in out


def test_depth_table_json(capsys: pytest.CaptureFixture[str]) -> None:
    out = _main(
        ["depth-table", "--json", "--depths", "4,12", "--steps", "2", "--activations", "sigmoid"], capsys
    )
    rows = json.loads(out)
    assert [(r["depth"], r["residual"]) for r in rows] == [(4, False), (4, True), (12, False), (12, True)]
    for r in rows:
        assert r["steps"] == 2 and r["activation"] == "sigmoid"
    plain12, res12 = rows[2], rows[3]
    assert plain12["depth_ratio_init"] < res12["depth_ratio_init"]  # sigmoid vanishes without shortcuts


# -- LightningCLI configs ----------------------------------------------------------------------------------

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_cli_config_fits(tmp_path: Path, config: Path) -> None:
    module = {"deep": "deep_mlp", "resn": "resnet", "lstm": "lstm"}[config.stem[:4]]
    cli_main = runpy.run_module(f"recipes.{module}")["cli_main"]
    cli_main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert list(tmp_path.rglob("events.out.tfevents.*"))
