"""GradientMonitor: logged values, diagnosis on real nets, cadence, loggers, host syncs, state."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, count_host_syncs, make_loader, make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from stability_callbacks._trainer import is_logging_step, log_every
from stability_callbacks.monitor import GradientDiagnostician, GradientMonitor


class ResidualReLU(pl.LightningModule):
    """A deep ReLU MLP with He init and residual blocks scaled by 1/sqrt(blocks)."""

    def __init__(self, depth: int = 30, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 2))
        self.out = nn.Linear(width, 3)
        for m in [self.inp, *self.blocks]:
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.inp(x))
        for block in self.blocks:
            x = x + torch.relu(block(x)) / len(self.blocks) ** 0.5
        return self.out(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def read_csv_metrics(logger: CSVLogger) -> list[dict[str, str]]:
    """The logged rows, merged by step (Lightning's own keys come in separate rows)."""
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        merged: dict[str, dict[str, str]] = {}
        for row in csv.DictReader(f):
            target = merged.setdefault(row["step"], {})
            target.update({k: v for k, v in row.items() if v != ""})
    return [merged[k] for k in sorted(merged, key=int)]


def fit_with_monitor(
    tmp_path: Path, model: pl.LightningModule, monitor: GradientMonitor, **kw: Any
) -> list[Any]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_kw: dict[str, Any] = dict(max_steps=20, max_epochs=None, callbacks=[monitor])
        trainer_kw.update(kw)
        make_trainer(tmp_path, **trainer_kw).fit(model, make_loader(n=320))
    return [w for w in caught if "GradientMonitor" in str(w.message)]


def test_deep_sigmoid_mlp_is_flagged_vanishing_within_20_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = GradientMonitor(log_every_n_steps=1)
    warned = fit_with_monitor(tmp_path, MLPModule(depth=30, width=32, activation=nn.Sigmoid), monitor)
    d = monitor.last_diagnosis
    assert d is not None and d.vanishing and not d.exploding
    assert d.depth_ratio is not None and d.depth_ratio < 1e-10
    assert (d.first_layer, d.last_layer) == ("net.0", "net.58")
    assert len(warned) == 1
    text = str(warned[0].message)
    assert "vanishing" in text and "net.0" in text and "InitSwap" in text


def test_residual_relu_mlp_with_he_init_is_not_flagged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    monitor = GradientMonitor(log_every_n_steps=1)
    warned = fit_with_monitor(tmp_path, ResidualReLU(), monitor)
    assert warned == []
    assert monitor.state == {"vanishing": False, "exploding": False, "nonfinite": False}
    assert monitor.last_diagnosis is not None and monitor.last_diagnosis.depth_ratio is not None
    assert monitor.last_diagnosis.depth_ratio > 1e-2


class NaiveNorms(Callback):
    """Records per-layer gradient norms with a plain loop, after the monitor has run."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, float]] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        norms = {}
        for name, module in pl_module.named_modules():
            grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
            if grads:
                norms[name] = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
        norms["total"] = math.sqrt(sum(v**2 for v in norms.values()))
        self.by_step[trainer.global_step] = norms


def test_logged_norms_equal_naive_loop_and_are_logged_once_per_optimizer_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path)
    naive = NaiveNorms()
    make_trainer(
        tmp_path,
        max_epochs=1,
        logger=logger,
        log_every_n_steps=1,
        accumulate_grad_batches=2,
        callbacks=[GradientMonitor(), naive],
    ).fit(MLPModule(), make_loader(n=128, batch_size=16))
    rows = [r for r in read_csv_metrics(logger) if r.get("grad_norm/total")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]  # 8 batches / 2 = 4 optimizer steps
    for row in rows:
        expected = naive.by_step[int(row["step"])]
        assert float(row["grad_norm/total"]) == pytest.approx(expected["total"], rel=1e-6)
        for layer in ("net.0", "net.2", "net.4"):
            assert float(row[f"grad_norm/{layer}"]) == pytest.approx(expected[layer], rel=1e-6)
        assert float(row["grad_health/depth_ratio"]) == pytest.approx(
            expected["net.0"] / expected["net.4"], rel=1e-5
        )


def test_log_every_n_steps_defaults_to_trainer(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    make_trainer(
        tmp_path,
        max_steps=10,
        max_epochs=None,
        logger=logger,
        log_every_n_steps=4,
        callbacks=[GradientMonitor()],
    ).fit(MLPModule(), make_loader(n=320))
    steps = [int(r["step"]) for r in read_csv_metrics(logger) if r.get("grad_norm/total")]
    assert steps == [3, 7]


def test_tensorboard_tags_read_back(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb")
    make_trainer(
        tmp_path,
        max_steps=6,
        max_epochs=None,
        logger=logger,
        log_every_n_steps=2,
        callbacks=[GradientMonitor(update_ratio=True)],
    ).fit(MLPModule(), make_loader(n=320))
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {
        "grad_norm/total",
        "grad_norm/net.0",
        "grad_norm/net.2",
        "grad_norm/net.4",
        "grad_health/depth_ratio",
        "grad_health/vanishing",
        "grad_health/exploding",
        "grad_health/nonfinite",
        "update_ratio/net.0",
        "update_ratio/net.4",
    }
    assert expected <= tags
    assert [e.step for e in acc.Scalars("grad_norm/total")] == [1, 3, 5]
    assert [e.step for e in acc.Scalars("update_ratio/net.0")] == [1, 3, 5]


class SGDRatioCheck(Callback):
    """Computes the expected update ratio of plain SGD: lr * ||g|| / ||w||."""

    def __init__(self) -> None:
        self.expected: dict[int, float] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        layer = pl_module.net[0]
        g = torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()])
        w = torch.cat([layer.weight.flatten(), layer.bias.flatten()])
        self.expected[trainer.global_step] = (0.1 * g.norm() / w.norm()).item()


def test_update_ratio_equals_lr_times_grad_over_weight_for_sgd(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    check = SGDRatioCheck()
    make_trainer(
        tmp_path,
        max_steps=3,
        max_epochs=None,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[GradientMonitor(update_ratio=True), check],
    ).fit(MLPModule(lr=0.1), make_loader())
    rows = [r for r in read_csv_metrics(logger) if r.get("update_ratio/net.0")]
    assert len(rows) == 3
    for row in rows:
        assert float(row["update_ratio/net.0"]) == pytest.approx(check.expected[int(row["step"])], rel=1e-4)


class CountingMonitor(GradientMonitor):
    """Counts host syncs inside the monitor's hooks on non-logging steps."""

    def __init__(self, counter: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.counter = counter
        self.non_logging_steps = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        quiet = not is_logging_step(trainer, log_every(trainer, self.log_every_n_steps))
        self.non_logging_steps += quiet
        self.counter.active = quiet
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.counter.active = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # after the optimizer step: global_step has already moved past the step just taken
        self.counter.active = trainer.global_step % log_every(trainer, self.log_every_n_steps) != 0
        super().on_train_batch_end(trainer, pl_module, *args)
        self.counter.active = False


def test_no_host_sync_on_non_logging_steps(tmp_path: Path) -> None:
    with count_host_syncs() as counter:
        monitor = CountingMonitor(counter, log_every_n_steps=5, update_ratio=True)
        make_trainer(tmp_path, max_steps=12, max_epochs=None, callbacks=[monitor]).fit(
            MLPModule(), make_loader(n=320)
        )
    assert monitor.non_logging_steps == 10
    assert counter.calls == []


class SparseEmbedding(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4, sparse=True)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(4, 3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y = batch
        if batch_idx == 1:
            return None  # skip this batch
        idx = (x.abs() * 5).long().clamp_max(19)[:, 0]
        return nn.functional.cross_entropy(self.head(self.frozen(self.emb(idx))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_sparse_embedding_frozen_layers_and_none_loss(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path)
    make_trainer(
        tmp_path,
        max_steps=3,
        max_epochs=None,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[GradientMonitor()],
    ).fit(SparseEmbedding(), make_loader())
    rows = [r for r in read_csv_metrics(logger) if r.get("grad_norm/total")]
    assert [int(r["step"]) for r in rows] == [0, 2]  # step 1 had no gradients (training_step returned None)
    assert "grad_norm/frozen" not in rows[0]
    assert all(float(r["grad_norm/emb"]) > 0 for r in rows)


@pytest.mark.parametrize("logger_kind", ["none", "csv"])
def test_bf16_mixed_and_loggers(tmp_path: Path, logger_kind: str) -> None:
    logger: Any = False if logger_kind == "none" else CSVLogger(tmp_path)
    monitor = GradientMonitor(log_every_n_steps=1)
    make_trainer(
        tmp_path, max_steps=3, max_epochs=None, logger=logger, precision="bf16-mixed", callbacks=[monitor]
    ).fit(MLPModule(), make_loader())
    assert monitor.last_diagnosis is not None and math.isfinite(monitor.last_diagnosis.total_norm)


def test_exploding_spike_and_nonfinite_rules() -> None:
    diag = GradientDiagnostician(exploding_norm=100.0, spike_factor=10.0, min_history=3, patience=2)
    names = ["a", "b"]
    for _ in range(3):
        assert not diag.update(1.0, [0.5, 0.5], names).exploding
    assert diag.update(20.0, [10.0, 10.0], names).exploding  # 20x the median of 1.0
    assert diag.update(150.0, [1.0, 1.0], names).exploding  # above the absolute bound
    d = diag.update(float("nan"), [float("nan"), 1.0], names)
    assert d.nonfinite and d.nonfinite_layers == ["a"] and not d.exploding
    assert list(diag.history) == [1.0, 1.0, 1.0, 20.0, 150.0]  # the NaN never entered
    # vanishing needs `patience` consecutive steps; a layer without gradient is not vanishing
    assert not diag.update(1.0, [1e-6, 1.0], names).vanishing
    assert diag.update(1.0, [1e-6, 1.0], names).vanishing
    assert not diag.update(1.0, [None, 1.0], names).vanishing


def test_state_round_trip_through_checkpoint(tmp_path: Path) -> None:
    monitor = GradientMonitor(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, max_steps=4, max_epochs=None, callbacks=[monitor])
    trainer.fit(MLPModule(), make_loader())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    restored = GradientMonitor(log_every_n_steps=1)
    restored.load_state_dict(ckpt["callbacks"][monitor.state_key])
    assert list(restored.diagnostician.history) == list(monitor.diagnostician.history)
    assert len(restored.diagnostician.history) == 4
    fresh = GradientMonitor()
    fresh.load_state_dict({})  # a checkpoint without the callback: fresh start
    assert list(fresh.diagnostician.history) == []


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
        ({"group_by": "block"}, "group_by"),
        ({"vanishing_ratio": -1.0}, "vanishing_ratio"),
        ({"vanishing_norm": -1e-8}, "vanishing_norm"),
        ({"exploding_norm": 0.0}, "exploding_norm"),
        ({"spike_factor": 0.5}, "spike_factor"),
        ({"window": 0}, "window"),
        ({"patience": 0}, "patience"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        GradientMonitor(**kwargs)


def test_monitor_after_a_gradient_modifying_callback_is_a_clear_error(tmp_path: Path) -> None:
    class Halver(Callback):
        modifies_gradients = True

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            for p in pl_module.parameters():
                p.grad.mul_(0.5)

    trainer = make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[Halver(), GradientMonitor()])
    with pytest.raises(MisconfigurationException, match=r"GradientMonitor .* must come before Halver"):
        trainer.fit(MLPModule(), make_loader())

    naive = NaiveNorms()
    monitor = GradientMonitor(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[naive, monitor, Halver()])
    trainer.fit(MLPModule(), make_loader())
    assert monitor.last_diagnosis is not None  # in front of the Halver it sees the unhalved gradients
    assert monitor.last_diagnosis.total_norm == pytest.approx(naive.by_step[0]["total"], rel=1e-6)


@pytest.mark.ddp
def test_ddp_logs_from_rank_zero_only(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="ddp", version=0)
    trainer = make_trainer(
        tmp_path,
        strategy="ddp_spawn",
        devices=2,
        max_steps=4,
        max_epochs=None,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[GradientMonitor()],
    )
    trainer.fit(MLPModule(), make_loader(n=128))
    event_files = list((tmp_path / "ddp" / "version_0").glob("events.out.tfevents.*"))
    assert len(event_files) == 1
    acc = EventAccumulator(str(event_files[0]))
    acc.Reload()
    assert [e.step for e in acc.Scalars("grad_norm/total")] == [0, 1, 2, 3]  # once per step, not per rank
