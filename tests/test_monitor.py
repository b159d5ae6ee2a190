"""GradientMonitor: logged values, the diagnosis rules on known sequences and in fits, cadence, endpoints,
loggers, host syncs, state."""

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
from test_contracts import assert_same_state
from torch import Tensor, nn

from stability_callbacks._trainer import is_logging_step, log_every
from stability_callbacks.diagnosis import Diagnosis
from stability_callbacks.monitor import (
    GradientDiagnostician,
    GradientMonitor,
    endpoint_layers,
    layer_index_for,
)


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
        "grad_health/diverging",
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
    with count_host_syncs() as counter:  # the rules on every step
        monitor = CountingMonitor(counter, log_every_n_steps=5, update_ratio=True, sample_every_n_steps=1)
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


# -- the rules, fed known sequences -------------------------------------------------------------------

NAMES = ["a", "b"]


def feed(
    diag: GradientDiagnostician,
    totals: list[float],
    losses: list[float] | None = None,
    layers: list[list[float | None]] | None = None,
) -> list[Diagnosis]:
    """One update per step: the total norm split over two layers (or ``layers``), and the loss."""
    out = []
    for i, g in enumerate(totals):
        norms = layers[i] if layers is not None else [g / 2**0.5, g / 2**0.5]
        out.append(diag.update(g, norms, NAMES, loss=None if losses is None else losses[i]))
    return out


def on(ds: list[Diagnosis], kind: str) -> list[int]:
    return [i for i, d in enumerate(ds) if getattr(d, kind)]


def test_exploding_needs_patience_steps_over_the_runs_level_and_turns_off_below_half() -> None:
    diag = GradientDiagnostician(patience=3, recovery=4, window=20)
    totals = [1.0] * 20 + [20.0] * 2 + [1.0] + [20.0] * 3 + [7.0] * 5 + [2.0] * 4 + [1.0]
    ds = feed(diag, totals, losses=[1.0] * len(totals))
    # two steps over 10x, one under: the streak starts again; on at the third of 23-25; 7x is above the
    # off-threshold (5x) so it stays on; four steps under it turn it off
    assert on(ds, "exploding") == list(range(25, 34))
    d = ds[25]
    assert d.since == {"exploding": 25} and d.episodes["exploding"] == 1
    assert d.onset_value["exploding"] == 20.0 and d.onset_reference["exploding"] == 1.0
    assert ds[-1].norm_level == 1.0  # the spikes never entered the run's level
    assert 20.0 not in diag.history and 7.0 not in diag.history
    text = d.message("exploding")
    parts = (
        "for 3 consecutive steps",
        "over spike_factor=10 times the run's own level 1",
        "20 at step 25",
        "ZClip",
    )
    for part in parts:
        assert part in text, (part, text)
    assert not any(d.vanishing or d.diverging or d.nonfinite for d in ds)


def test_flag_is_the_device_copy_of_each_rule_of_the_diagnosis() -> None:
    diag = GradientDiagnostician(patience=2, recovery=2, window=20)
    assert diag.steps_observed == 0 and not bool(diag.flag("vanishing"))
    totals = [1.0] * 20 + [20.0] * 3
    ds = feed(diag, totals, losses=[1.0] * len(totals))
    assert diag.steps_observed == len(totals)
    flag = diag.flag("exploding")
    assert flag.dtype == torch.bool and flag.shape == () and bool(flag) == ds[-1].exploding is True
    assert not bool(diag.flag("vanishing")) and not bool(diag.flag("diverging"))
    with pytest.raises(ValueError, match="rule"):
        diag.flag("nope")


def _break_off(loss_falls: bool) -> list[Diagnosis]:
    """A plateau (norm ~0.2, loss 0.13), then the norm rises 12x for good, with or without the loss
    falling (0.13 -> 0.057 -> ... -> 0.0086, then slowly lower)."""
    g = torch.Generator().manual_seed(0)
    plateau = (0.2 * (1 + 0.2 * torch.randn(30, generator=g))).tolist()
    risen = (2.4 * (1 + 0.2 * torch.randn(90, generator=g))).tolist()
    if loss_falls:
        losses = (
            [0.13] * 30 + [0.13 * 0.7 ** (k + 1) for k in range(8)] + [0.0086 * 0.995**k for k in range(82)]
        )
    else:
        losses = [0.13] * 120
    return feed(GradientDiagnostician(), plateau + risen, losses)


def test_a_norm_rising_with_a_falling_loss_is_not_exploding_and_becomes_the_new_level() -> None:
    ds = _break_off(loss_falls=True)
    assert on(ds, "exploding") == []
    assert ds[29].norm_level is not None and ds[29].norm_level < 0.3
    assert ds[-1].norm_level is not None and ds[-1].norm_level > 2.0  # the new level, learnt while falling
    assert ds[32].loss_falling
    # the same norms with a loss that does not fall: exploding from the third step over the level
    flat = _break_off(loss_falls=False)
    assert on(flat, "exploding")[0] == 32


def test_the_verdict_does_not_depend_on_the_scale_of_the_loss() -> None:
    """An autoencoder with reduction="sum" has norms and losses 1e6 times larger: the same flags."""
    totals = [1.0] * 20 + [20.0] * 5 + [1.0] * 20
    losses = [1.0] * 20 + [3.0] * 5 + [1.0] * 20
    small = feed(GradientDiagnostician(), totals, losses)
    large = feed(GradientDiagnostician(), [1e6 * v for v in totals], [1e6 * v for v in losses])
    assert [d.flags() for d in small] == [d.flags() for d in large]
    assert on(small, "exploding") == list(range(22, 34)) and on(small, "diverging")[0] == 22
    assert GradientDiagnostician().exploding_norm == math.inf  # no absolute bound unless asked for
    bound = feed(GradientDiagnostician(exploding_norm=1e4, patience=1), [2e4])
    assert bound[0].exploding and "over exploding_norm=1e+04: 2e+04 at step 0" in bound[0].message(
        "exploding"
    )


def test_a_run_converging_to_zero_loss_raises_no_alarm() -> None:
    g = torch.Generator().manual_seed(1)
    noise = (1 + 0.5 * torch.rand(300, generator=g)).tolist()
    totals = [0.95**k * n * (8.0 if k % 7 == 3 else 1.0) for k, n in enumerate(noise)]  # spikes of 8x
    losses = [2.0 * 0.96**k * n * (3.0 if k % 11 == 5 else 1.0) for k, n in enumerate(noise)]
    layers: list[list[float | None]] = [[v / 2**0.5, v / 2**0.5] for v in totals]
    ds = feed(GradientDiagnostician(), totals, losses, layers)
    assert totals[-1] < 1e-6 and losses[-1] < 1e-4  # every layer below vanishing_norm=1e-8 at the end
    assert not any(any(d.flags().values()) for d in ds)


def test_diverging_loss_rule_with_hysteresis_and_non_finite_loss() -> None:
    diag = GradientDiagnostician(patience=3, recovery=5)
    losses = [1.0, 1.1, 0.9, 1.05, 0.95] * 4 + [3.0] * 5 + [1.0] * 6 + [math.nan] * 3
    ds = feed(diag, [1.0] * len(losses), losses)
    assert on(ds, "diverging") == [*range(22, 29), 33]  # off after 5 steps back at 1.0; three NaN: again
    d = ds[22]
    assert d.episodes["diverging"] == 1 and d.onset_value["diverging"] == 3.0
    text = d.message("diverging")
    for part in (
        "over diverging_factor=2 times its recent median 1: 3 at step 22",
        "warm-up",
        "StabilityAutopilot",
    ):
        assert part in text, (part, text)
    assert ds[33].episodes["diverging"] == 2 and "not finite (nan at step 33)" in ds[33].message("diverging")
    assert not any(d.exploding for d in ds)


def test_a_rise_that_is_small_against_the_runs_loss_scale_is_not_diverging() -> None:
    losses = [2.0 * 0.8**k for k in range(40)] + [3e-3] * 10  # 2.0 -> 3e-4, then 10x that, for good
    ds = feed(GradientDiagnostician(), [1.0] * len(losses), losses)
    assert on(ds, "diverging") == []
    assert ds[-1].loss_scale is not None and ds[-1].loss_scale > 1.0


def test_vanishing_rule_with_patience_and_hysteresis() -> None:
    diag = GradientDiagnostician(patience=3, recovery=2)
    ratio = [1e-4, 1e-4, 1.0, 1e-4, 1e-4, 1e-4, 1.5e-3, 1.0, 1.0, 1.0]
    ds = feed(diag, [1.0] * len(ratio), layers=[[r, 1.0] for r in ratio])
    # on at the third of three; 1.5e-3 is above the on-threshold but below the off-threshold (2e-3)
    assert on(ds, "vanishing") == [5, 6, 7]
    assert ds[5].depth_ratio == pytest.approx(1e-4) and (ds[5].first_layer, ds[5].last_layer) == ("a", "b")
    text = ds[5].message("vanishing")
    assert "the depth ratio stayed under vanishing_ratio=0.001 (0.0001 at step 5)" in text
    assert "first layer 'a'" in text and "InitSwap" in text
    # a layer without gradient is not vanishing; a tiny layer beside a large one is
    none = feed(GradientDiagnostician(patience=1), [1.0], layers=[[None, 1.0]])
    assert not none[0].vanishing and none[0].depth_ratio is None
    tiny = feed(GradientDiagnostician(patience=1), [1.0], layers=[[1.0, 1e-9]])
    assert tiny[0].vanishing and tiny[0].small_layers == ["b"]


def test_nonfinite_steps_are_counted_and_kept_out_of_the_statistics() -> None:
    diag = GradientDiagnostician()
    totals = [1.0, 1.0, math.nan, 1.0, math.inf, 1.0]
    ds = feed(diag, totals, layers=[[v, 1.0] for v in totals])
    assert [d.nonfinite for d in ds] == [False, False, True, False, True, False]
    assert ds[2].nonfinite_layers == ["a"]
    assert (ds[-1].nonfinite_steps, ds[-1].first_nonfinite_step, ds[-1].last_nonfinite_step) == (2, 2, 4)
    assert diag.history == [1.0] * 4
    assert not any(d.exploding or d.vanishing for d in ds)
    assert "2 step(s) so far, the first at step 2, the latest at step 4" in ds[-1].message("nonfinite")


def test_sampling_converts_the_windows_to_observations() -> None:
    """With ``sample_every=10`` a patience of 3 steps is two observations, a window of 50 steps five."""
    diag = GradientDiagnostician(sample_every=10)
    ds = feed(diag, [1.0] * 5 + [20.0] * 2, [1.0] * 7)
    assert on(ds, "exploding") == [6]
    assert "on 2 consecutive checks 10 steps apart" in ds[6].message("exploding")
    feed(diag, [1.0] * 10)
    assert len(diag.history) == 5


def test_state_round_trip_restores_every_rule() -> None:
    diag = GradientDiagnostician(window=10)
    feed(diag, [1.0] * 15 + [20.0] * 4, [1.0] * 15 + [5.0] * 4)
    state = diag.state_dict()
    restored = GradientDiagnostician(window=10)
    restored.load_state_dict(state)
    assert_same_state(restored.state_dict(), state)
    a = feed(diag, [1.0] * 12, [1.0] * 12)
    b = feed(restored, [1.0] * 12, [1.0] * 12)
    assert [d.flags() for d in a] == [d.flags() for d in b] and diag.history == restored.history
    old = GradientDiagnostician()  # the state of the former host-side rules: its norms, nothing else
    old.load_state_dict({"history": [1.0, 2.0, 3.0], "vanishing_streak": 2})
    assert old.history == [1.0, 2.0, 3.0]
    fresh = GradientDiagnostician()
    fresh.load_state_dict({})
    assert fresh.history == [] and not any(feed(fresh, [1.0])[0].flags().values())


# -- the monitor in a fit -----------------------------------------------------------------------------


class LRJump(MLPModule):
    """The small MLP trained with Adam; the learning rate jumps 300-fold at step 60."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 300.0 if s >= 60 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_the_same_run_at_cadence_1_and_50_logs_the_same_flags_at_the_same_steps(tmp_path: Path) -> None:
    logged: dict[int, dict[int, dict[str, str]]] = {}
    first: dict[int, dict[str, int]] = {}
    warned: dict[int, list[str]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is faster, and steady on a shared machine
    try:
        for cadence in (1, 50):
            torch.manual_seed(0)
            logger = CSVLogger(tmp_path / str(cadence))
            monitor = GradientMonitor(log_every_n_steps=cadence, per_layer=False)
            caught = fit_with_monitor(
                tmp_path, LRJump(depth=3, width=32), monitor, max_steps=100, logger=logger
            )
            logged[cadence] = {int(r["step"]): r for r in read_csv_metrics(logger) if "grad_norm/total" in r}
            assert monitor.last_diagnosis is not None
            first[cadence] = monitor.last_diagnosis.first_flagged
            warned[cadence] = [str(w.message) for w in caught]
    finally:
        torch.set_num_threads(threads)
    assert sorted(logged[50]) == [49, 99] and len(logged[1]) == 100
    keys = [f"grad_health/{k}" for k in ("vanishing", "exploding", "diverging", "nonfinite")]
    for step, row in logged[50].items():
        assert {k: row[k] for k in keys} == {k: logged[1][step][k] for k in keys}, step
    assert first[1] == first[50] and first[1]["diverging"] >= 60
    for cadence in (1, 50):  # one warning per rule that fired, naming it, at either cadence
        diverging = [w for w in warned[cadence] if "Training is diverging" in w]
        assert len(diverging) == 1 and f"since step {first[1]['diverging']}" in diverging[0]


class Recorded(MLPModule):
    """Keeps the loss of every micro-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss


def test_the_rules_get_the_mean_loss_of_every_micro_batch_since_the_last_sample(tmp_path: Path) -> None:
    model = Recorded()
    monitor = GradientMonitor(log_every_n_steps=1, sample_every_n_steps=2)
    make_trainer(tmp_path, max_steps=3, max_epochs=None, accumulate_grad_batches=4, callbacks=[monitor]).fit(
        model, make_loader(n=320)
    )
    d = monitor.last_diagnosis
    assert d is not None and d.step == 2 and len(model.losses) == 12
    # the rules saw step 1 only (steps 1, 3, ...): its loss is the mean of the 8 micro-batches of steps 0-1
    assert d.loss == pytest.approx(sum(model.losses[:8]) / 8, rel=1e-6)
    assert monitor.diagnostician.history == [pytest.approx(d.median)]


class TiedLM(pl.LightningModule):
    """transformers' GPT-2 (one layer, width 16): ``wte`` is tied to ``lm_head``."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)
        self.model = GPT2LMHeadModel(config)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens = (batch[0].abs() * 10).long().clamp_max(31)
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Attention(pl.LightningModule):
    """An embedding, one ``nn.MultiheadAttention`` (its ``out_proj`` never runs as a module), a head, and
    a learnable temperature owned by the root."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(1, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)
        self.temperature = nn.Parameter(torch.ones(()))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        h = self.embed(x.unsqueeze(-1))
        h, _ = self.attn(h, h, h)
        return nn.functional.cross_entropy(self.head(h.mean(1)) / self.temperature, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ViT(pl.LightningModule):
    """timm's VisionTransformer (one block, width 16), whose ``cls_token`` and ``pos_embed`` sit beside
    its sub-modules."""

    def __init__(self) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.net = VisionTransformer(
            img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x.repeat(1, 24).reshape(-1, 3, 8, 8)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    ("model", "ends", "left_out"),
    [
        (TiedLM, ("model.transformer.wpe", "model.transformer.ln_f"), "model.transformer.wte"),
        (Attention, ("embed", "head"), "attn.out_proj"),
        (ViT, ("net.patch_embed.proj", "net.head"), "net"),
    ],
)
def test_depth_ratio_ends_are_the_first_and_last_layer_of_the_network(
    tmp_path: Path, model: type[pl.LightningModule], ends: tuple[str, str], left_out: str
) -> None:
    torch.manual_seed(0)
    monitor = GradientMonitor(log_every_n_steps=1, vanishing_ratio=1e-30, warn=False)
    module = model()
    trainer = make_trainer(tmp_path, max_steps=2, max_epochs=None, callbacks=[monitor])
    trainer.fit(module, make_loader())
    d = monitor.last_diagnosis
    assert d is not None and (d.first_layer, d.last_layer) == ends
    order = monitor._order.order
    index = layer_index_for(module, trainer.optimizers[0], order)
    eligible = dict(zip(index.layer_names, endpoint_layers(module, index, order), strict=True))
    assert left_out in eligible and not eligible[left_out]
    if model is Attention:
        assert not eligible["temperature"] and not eligible["attn"]  # beside sub-modules with parameters


def test_state_survives_a_checkpoint_and_the_run_carries_on(tmp_path: Path) -> None:
    monitor = GradientMonitor(log_every_n_steps=1, sample_every_n_steps=1)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[monitor])
    trainer.fit(MLPModule(), make_loader())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)
    restored = GradientMonitor(log_every_n_steps=1, sample_every_n_steps=1)
    restored.load_state_dict(ckpt["callbacks"][monitor.state_key])
    assert_same_state(restored.state_dict(), monitor.state_dict())
    assert len(restored.diagnostician.history) == 4
    resumed = GradientMonitor(log_every_n_steps=1, sample_every_n_steps=1)
    make_trainer(tmp_path, max_epochs=2, callbacks=[resumed]).fit(
        MLPModule(), make_loader(), ckpt_path=tmp_path / "m.ckpt"
    )
    assert len(resumed.diagnostician.history) == 8  # four more steps on top of the restored four
    assert resumed.diagnostician.state_dict()["scalars"][0] == 8  # steps observed
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
        ({"recovery": 0}, "recovery"),
        ({"min_history": 1}, "min_history"),
        ({"diverging_factor": 1.0}, "diverging_factor"),
        ({"sample_every_n_steps": 0}, "sample_every_n_steps"),
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
