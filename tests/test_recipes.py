"""Recipes: data modules, models, every variant for a few steps, the runner's commands and the CLI configs."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from recipes import cli, reports, runner
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
from recipes.spec import RunResult, filter_third_party_warnings
from recipes.train import RunRecorder
from stability_callbacks import GradientMonitor

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
ENTRY_KEYS = SUMMARY_KEYS | {"cures", "diagnosis", "warnings", "actions"}

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
    assert abs(float(hidden.weight.detach().std()) / expected - 1) < 0.01
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
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", UserWarning)
        result = runner.run_variant(recipe, variant, max_steps=3, log_dir=tmp_path, progress=False)
    # What the library says during a run (InitSwap re-initialising, say) comes from a callback of the run
    # and starts with its name.
    ours = {type(c).__name__ for c in runner.get_recipe(recipe).variants[variant].callbacks()}
    ours |= {"GradientMonitor", "HistogramLogger"}
    said = [str(w.message) for w in seen if "stability_callbacks" in w.filename]
    assert [m for m in said if m.split(":")[0] not in ours] == []
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
        runner.get_recipe("nosuch")
    with pytest.raises(ValueError, match="max_steps"):
        runner.run_variant("deep_mlp", "sigmoid", max_steps=0, log_dir=None)


# -- the runner's commands ---------------------------------------------------------------------------------


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(args) == 0
    return capsys.readouterr().out


def test_list_names_every_variant_with_a_description_and_every_command(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = _main(["list"], capsys)
    for recipe, variant in ALL_VARIANTS:
        desc = runner.get_recipe(recipe).variants[variant].description
        assert f"{variant}  " in out and desc in out
    commands = out[out.index("commands (") :]
    listed = re.findall(r"^  (\S+)  ", commands, re.M)
    assert listed == ["list", "run", "compare", "demo", "readme", "depth-table", "corrupted"]
    for name in listed:  # each is a real subcommand of the parser
        with pytest.raises(SystemExit) as exit_info:
            cli.build_parser().parse_args([name, "--help"])
        assert exit_info.value.code == 0
    for config in CONFIGS:
        assert config.name in out


def test_run_command_is_quiet_and_progress_brings_the_bar_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", "deep_mlp", "--variant", "relu_he", "--max-steps", "3", "--log-dir", str(tmp_path)]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert re.fullmatch(r"deep_mlp/relu_he seed0: 3 steps in \d+\.\d s, train loss \d\.\d+", lines[0])
    assert lines[1].split()[:4] == ["variant", "cures", "train", "loss"] and "val_acc" in lines[1]
    assert lines[-1].startswith("logs: ") and len(lines) == 5  # the line, the table (3 lines), the logs
    assert "Epoch" not in captured.out + captured.err and "it/s" not in captured.out + captured.err
    assert list((tmp_path / "deep_mlp" / "relu_he" / "seed0").glob("events.out.tfevents.*"))

    assert cli.main([*args, "--progress"]) == 0
    captured = capsys.readouterr()
    assert "Epoch 0" in captured.out + captured.err  # Lightning's progress bar
    assert "\ndeep_mlp/relu_he seed0: 3 steps in " in captured.out


def test_compare_writes_summary_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = _main(["compare", "resnet", "--max-steps", "2", "--seed", "3", "--log-dir", str(tmp_path)], capsys)
    summary = json.loads((tmp_path / "resnet" / "summary.json").read_text())
    assert summary["recipe"] == "resnet" and summary["seed"] == 3
    assert list(summary["variants"]) == list(runner.get_recipe("resnet").variants)
    for name, entry in summary["variants"].items():
        assert set(entry) == ENTRY_KEYS
        assert entry["cures"] == runner.get_recipe("resnet").variants[name].cures
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


# -- what the monitor said and the autopilot did; the README's generated sections -------------------------


def test_recorder_keeps_the_monitor_warning_once_per_rule() -> None:
    # The recorder reads the plain-words message from the monitor's diagnosis; it must be exactly the
    # warning the same monitor prints when its warnings are on, and only once however long the rule holds.
    monitor = GradientMonitor(log_every_n_steps=2, per_layer=False, warn=True)
    recorder = RunRecorder(1e3, check_every=2, monitor=monitor)
    pl.seed_everything(0, verbose=False)
    model = DeepMLP(depth=30)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[monitor, recorder],
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", UserWarning)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    printed = [str(w.message) for w in seen if str(w.message).startswith("GradientMonitor: ")]
    assert list(recorder.warnings) == ["vanishing"]
    assert printed == ["GradientMonitor: " + recorder.warnings["vanishing"]]
    assert "vanishing toward the input" in recorder.warnings["vanishing"]


def test_autopilot_run_reports_its_timeline(tmp_path: Path) -> None:
    result = runner.run_variant("deep_mlp", "autopilot", max_steps=8, log_dir=None, progress=False)
    assert result.warnings.get("vanishing")  # the baseline's gradients vanish before the autopilot acts
    assert len(result.actions) >= 1 and "re-initialised" in result.actions[0]
    lines = reports.format_table({"autopilot": result}).splitlines()
    assert lines[3] == "" and lines[4].startswith("autopilot: GradientMonitor (vanishing): Gradients are")
    said = [line for line in lines if line.startswith("autopilot: StabilityAutopilot: ")]
    assert len(said) == len(result.actions) and result.actions[0].startswith(said[0][31:].split()[0])


def _result(name: str, val: float, cures: str | None = None, **kw: Any) -> RunResult:
    return RunResult(0.5, val, "val_acc", False, 1e-3, 10, 1.25, variant=name, cures=cures, **kw)


def test_table_names_what_each_remedy_cures_beside_the_pathology_figure() -> None:
    results = {
        "sick": _result("sick", 0.1, vanishing=True, warnings={"vanishing": "Gradients are vanishing."}),
        "fix": _result("fix", 0.9, cures="sick"),
        "other": _result("other", 0.5),
    }
    text = reports.format_table(results).splitlines()
    head = "variant | cures | train loss | val_acc | depth ratio | diagnosis | diverged | steps | seconds"
    assert [c.strip() for c in head.split("|")] == [c.strip() for c in re.split(r"\s{2,}", text[0])]
    assert text[2].split()[:3] == ["sick", "-", "0.500"] and "vanishing" in text[2]
    assert text[3].split()[:5] == ["fix", "sick", "(0.100)", "0.500", "0.900"]
    assert text[4].split()[:2] == ["other", "-"]
    assert text[5:] == ["", "sick: GradientMonitor (vanishing): Gradients are vanishing."]
    md = reports.format_table(results, markdown=True).splitlines()
    assert md[3] == "| fix | sick (0.100) | 0.500 | 0.900 | 1.0e-03 | - | no | 10 | 1.2 |"
    assert md[-1] == "- `sick` GradientMonitor (vanishing): Gradients are vanishing."
    assert reports.format_table(results, notes=False).count("\n") == 4


def _summary(recipe: str, val: float) -> dict[str, Any]:
    entry = reports.summary_entry(_result("a", val))
    return {"recipe": recipe, "seed": 0, "preset": "cpu", "variants": {"a": entry}}


def test_update_readme_rewrites_and_appends_generated_sections() -> None:
    begin, end = reports.readme_markers("one")
    text = f"intro\n\n{begin}\nold table\n{end}\n\nafter\n"
    new = reports.update_readme(text, {"one": _summary("one", 0.25), "two": _summary("two", 0.75)})
    blocks = reports.readme_blocks(new)
    assert list(blocks) == ["one", "two"]
    assert blocks["one"] == reports.readme_section(_summary("one", 0.25)) and "0.250" in blocks["one"]
    assert "| a | - | 0.500 | 0.750 |" in blocks["two"]
    assert new.startswith("intro\n\n" + begin) and new.endswith(
        reports.readme_markers("two")[1] + "\n\nafter\n"
    )
    assert reports.update_readme(new, {"one": _summary("one", 0.25)}) == new  # idempotent
    with pytest.raises(ValueError, match="no generated section"):
        reports.update_readme("no markers here", {"one": _summary("one", 0.25)})


def test_readme_command_rewrites_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name in runner.RECIPES:
        (results / f"{name}.json").write_text(json.dumps(_summary(name, 0.5)))
    readme = tmp_path / "README.md"
    begin, end = reports.readme_markers(runner.RECIPES[0])
    readme.write_text(f"# title\n{begin}\nstale\n{end}\n")
    args = ["readme", "--readme", str(readme), "--results-dir", str(results)]
    assert cli.main([*args, "--check"]) == 1
    assert "differ from their summaries: " + ", ".join(runner.RECIPES) in capsys.readouterr().out
    assert readme.read_text() == f"# title\n{begin}\nstale\n{end}\n"  # --check changes nothing
    assert _main(args, capsys).startswith("README sections rewritten: " + ", ".join(runner.RECIPES))
    assert list(reports.readme_blocks(readme.read_text())) == list(runner.RECIPES)
    assert _main([*args, "--check"], capsys) == "README tables match the committed summaries\n"
    assert _main(args, capsys) == "README sections rewritten: none (unchanged)\n"


@pytest.mark.slow  # every deep_mlp variant, two steps each
def test_demo_write_readme_stores_the_summaries_it_renders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    begin, end = reports.readme_markers("deep_mlp")
    readme.write_text(f"{begin}\n{end}\n")
    results = tmp_path / "results"
    runner.demo(
        max_steps=2,
        log_dir=tmp_path / "logs",
        recipes=["deep_mlp"],
        write_readme=True,
        readme=readme,
        results_dir=results,
    )
    out = capsys.readouterr().out
    committed = json.loads((results / "deep_mlp.json").read_text())
    assert committed == json.loads((tmp_path / "logs" / "deep_mlp" / "summary.json").read_text())
    assert list(committed["variants"]) == list(runner.get_recipe("deep_mlp").variants)
    assert reports.readme_blocks(readme.read_text()) == {"deep_mlp": reports.readme_section(committed)}
    assert "README sections rewritten: deep_mlp" in out


def test_corrupted_write_readme_commits_the_summary_it_renders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    begin, end = reports.CORRUPTED_MARKERS
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{begin}\nstale\n{end}\nafter\n")
    results = tmp_path / "results"
    args = ["corrupted", "--max-steps", "6", "--step", "3", "--log-dir", str(tmp_path / "logs")]
    out = _main([*args, "--write-readme", "--readme", str(readme), "--results-dir", str(results)], capsys)
    summary = json.loads((results / reports.CORRUPTED_RESULTS).read_text())
    assert summary["command"] == "python -m recipes corrupted --step 3 --max-steps 6 --write-readme"
    assert summary["corrupt_step"] == 3 and summary["max_steps"] == 6
    assert list(summary["runs"]) == ["clean", "corrupted", "corrupted_autopilot"]
    assert all(r["steps"] == 6 for r in summary["runs"].values())
    text = readme.read_text()
    block = reports.corrupted_readme_block(text)
    assert block == reports.corrupted_readme_section(summary) and text.endswith(f"{end}\nafter\n")
    report = reports.corrupted_report(summary)
    assert report in out and report in block  # the README shows what the command printed
    assert "one corrupted batch at step 3 of 6, seed 0" in report
    # the readme command checks and rewrites the section from the committed summary
    for name in runner.RECIPES:
        (results / f"{name}.json").write_text(json.dumps(_summary(name, 0.5)))
    markers = [reports.readme_markers(name) for name in runner.RECIPES]
    readme.write_text("".join(f"{b}\n{e}\n" for b, e in markers) + text.replace(block, "edited by hand"))
    check = ["readme", "--readme", str(readme), "--results-dir", str(results)]
    assert cli.main(check) == 0 and "corrupted" in capsys.readouterr().out
    assert reports.corrupted_readme_block(readme.read_text()) == block
    readme.write_text(readme.read_text().replace(block, "edited by hand"))
    assert cli.main([*check, "--check"]) == 1
    assert capsys.readouterr().out.startswith("README tables differ from their summaries: corrupted")


# -- usage errors: exit status 2, a message, no traceback, nothing trained ----------------------------------

USAGE_ERRORS = [
    (["run", "deep_mlp", "--variant", "nosuch"], "argument --variant: unknown variant 'nosuch' of deep_mlp"),
    (["run", "nosuch", "--variant", "sigmoid"], "argument recipe: invalid choice: 'nosuch'"),
    (
        ["compare", "lstm", "--variants", "rnn,nosuch"],
        "argument --variants: unknown variant 'nosuch' of lstm",
    ),
    (["compare", "lstm", "--variants", "rnn,,gru"], "argument --variants: expected comma-separated names"),
    (["compare", "lstm", "--variants", "rnn,rnn"], "argument --variants: a name is repeated"),
    (
        ["run", "deep_mlp", "--variant", "sigmoid", "--preset", "tpu"],
        "argument --preset: invalid choice: 'tpu'",
    ),
    (["run", "deep_mlp", "--variant", "sigmoid", "--seed", "-1"], "argument --seed: a seed is an integer in"),
    (["compare", "resnet", "--seed", str(2**32)], "argument --seed: a seed is an integer in [0, 4294967295]"),
    (["run", "deep_mlp", "--variant", "sigmoid", "--seed", "1.5"], "argument --seed: expected an integer"),
    (["demo", "--seed", "abc"], "argument --seed: expected an integer, got 'abc'"),
    (["corrupted", "--seed", "-2"], "argument --seed: a seed is an integer in"),
    (["depth-table", "--seed", "-2"], "argument --seed: a seed is an integer in"),
    (
        ["run", "deep_mlp", "--variant", "sigmoid", "--max-steps", "0"],
        "argument --max-steps: expected an integer >= 1",
    ),
    (["demo", "--max-steps", "-5"], "argument --max-steps: expected an integer >= 1"),
    (["run", "lstm", "--variant", "rnn", "--data", "digits"], "argument --data: lstm trains on"),
    (["run", "deep_mlp", "--variant", "sigmoid", "--data", "adding"], "argument --data: deep_mlp trains on"),
    (["run", "deep_mlp", "--variant", "sigmoid", "--data", "imagenet"], "argument --data: invalid choice"),
    (
        ["run", "deep_mlp", "--variant", "sigmoid", "--data-dir", "{tmp}/none"],
        "argument --data-dir: no folder",
    ),
    (
        ["run", "deep_mlp", "--variant", "sigmoid", "--data", "mnist", "--data-dir", "{tmp}"],
        "argument --data: data set 'mnist' is not under",
    ),
    (
        ["run", "deep_mlp", "--variant", "sigmoid", "--log-dir", "{tmp}/file"],
        "argument --log-dir: not a folder but a file",
    ),
    (
        ["corrupted", "--step", "600", "--max-steps", "600"],
        "argument --step: must be below --max-steps (600)",
    ),
    (["corrupted", "--step", "-1"], "argument --step: expected an integer >= 0"),
    (["corrupted", "--input-scale", "inf"], "argument --input-scale: expected a finite number"),
    (["depth-table", "--depths", "1,4"], "argument --depths: every depth must be >= 2"),
    (["depth-table", "--depths", "4,x"], "argument --depths: expected comma-separated integers"),
    (["depth-table", "--activations", "relu,nosuch"], "argument --activations: `activation` must be one of"),
    (["depth-table", "--steps", "0"], "argument --steps: expected an integer >= 1"),
    (["demo", "--recipes", "deep_mlp,nosuch"], "argument --recipes: unknown recipe 'nosuch'"),
    (
        ["demo", "--write-readme", "--max-steps", "5"],
        "argument --write-readme: the README shows the presets' budgets",
    ),
    (["demo", "--write-readme", "--readme", "{tmp}/none.md"], "argument --readme: no file"),
    (
        ["demo", "--write-readme", "--readme", "{tmp}/file"],
        "argument --readme: '{tmp}/file' has no generated",
    ),
    (["readme", "--recipes", "nosuch"], "argument --recipes: unknown recipe 'nosuch'"),
    (["readme", "--results-dir", "{tmp}"], "argument --results-dir: no summary {tmp}/deep_mlp.json"),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_bad_arguments_are_usage_errors_before_anything_trains(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    (tmp_path / "file").write_text("")
    fits: list[object] = []
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: fits.append(self))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert fits == []
    assert captured.err.startswith("usage: python -m recipes " + argv[0])
    message = message.replace("{tmp}", str(tmp_path))
    assert f"python -m recipes {argv[0]}: error: {message}" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_compare_refuses_unknown_variants_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    fits: list[object] = []
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: fits.append(self))
    with pytest.raises(ValueError, match="'nosuch'"):
        runner.compare("lstm", variants=["rnn", "nosuch"], log_dir="unused")
    assert fits == []


def test_entry_points_filter_only_third_party_noise() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_third_party_warnings()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn(
            "The 'train_dataloader' does not have many workers which may be a bottleneck.", stacklevel=1
        )
        warnings.warn("GradientMonitor: Gradients are vanishing toward the input", UserWarning, stacklevel=1)
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == [
        "GradientMonitor: Gradients are vanishing toward the input",
        "some other deprecation",
    ]


# -- LightningCLI configs ----------------------------------------------------------------------------------

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_cli_config_fits_with_the_cpu_presets_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: Path
) -> None:
    module = {"deep": "deep_mlp", "resn": "resnet", "lstm": "lstm", "tran": "transformer"}[config.stem[:4]]
    cli_main = importlib.import_module(f"recipes.{module}").cli_main
    monkeypatch.setattr(sys, "argv", [f"python -m recipes.{module}"])  # the arguments come from `args`
    threads_in_fit: list[int] = []
    fit = pl.Trainer.fit

    def counting_fit(self: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        threads_in_fit.append(torch.get_num_threads())
        fit(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", counting_fit)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
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
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert threads_in_fit == [runner.get_recipe(module).presets["cpu"].cpu_threads] == [1]
    assert after == 2  # restored when the entry point returns
    assert list(tmp_path.rglob("events.out.tfevents.*"))
