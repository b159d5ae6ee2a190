"""Update monitor: update norms and ratios by hand and against naive loops, Adam's update norm against the
real update, the jump test against a plain Python reference, and the callback in fits (keys, host syncs,
a learning-rate jump caught, resume)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, count_host_syncs, make_loader, make_trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from stability_callbacks import UpdateJumpDetector, UpdateMonitor, adam_update_norms, reset_adam_moments_
from stability_callbacks._trainer import UnsupportedStrategyError
from stability_callbacks.stats import LayerIndex, tensor_norms
from stability_callbacks.update_monitor import UpdateResult, snapshot_weights_, update_norms_, update_ratios


class AdamMLP(MLPModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------------------------------
# Layer 1
# ---------------------------------------------------------------------------------------------------


def test_update_norms_and_ratio_by_hand() -> None:
    w = [torch.tensor([3.0, 4.0]), torch.tensor([[0.0, 12.0]])]
    buffer = snapshot_weights_(w)
    weight = tensor_norms(buffer)
    w[0] += torch.tensor([0.3, 0.4])  # ||Δ|| = 0.5 on a weight of norm 5
    w[1] -= torch.tensor([[0.0, 1.2]])  # 1.2 on 12
    assert snapshot_weights_(w, buffer) is buffer  # same shapes: copied in place
    w[0] += torch.tensor([0.3, 0.4])
    delta = update_norms_(buffer, w)
    assert delta.tolist() == pytest.approx([0.5, 0.0])
    buffer = snapshot_weights_(w, None)
    w[1] += torch.tensor([[1.2, 0.0]])
    delta = update_norms_(buffer, w)
    assert delta.tolist() == pytest.approx([0.0, 1.2])
    total, _ = update_ratios(torch.tensor([0.5, 1.2]), weight)
    assert total.item() == pytest.approx(1.3 / 13.0)


def test_update_ratios_per_layer_match_a_naive_loop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2, bias=False))
    index = LayerIndex.build(model)
    before = [p.detach().clone() for p in index.params]
    buffer = snapshot_weights_(index.params)
    weight = tensor_norms(buffer)
    with torch.no_grad():
        for p in index.params:
            p.add_(torch.randn_like(p) * 0.01)
    total, per_layer = update_ratios(update_norms_(buffer, index.params), weight, index)
    assert per_layer is not None and index.layer_names == ["0", "2", "3"]
    for j, name in enumerate(index.layer_names):
        members = [i for i, layer in enumerate(index.layer_of) if layer == j]
        diffs = [(index.params[i].detach() - before[i]).double() for i in members]
        d = math.sqrt(sum(float(x.square().sum()) for x in diffs))
        n = math.sqrt(sum(float(before[i].double().square().sum()) for i in members))
        assert per_layer[j].item() == pytest.approx(d / n, rel=1e-5), name
    d = math.sqrt(
        sum(
            float((p.detach() - b).double().square().sum()) for p, b in zip(index.params, before, strict=True)
        )
    )
    n = math.sqrt(sum(float(b.double().square().sum()) for b in before))
    assert total.item() == pytest.approx(d / n, rel=1e-5)


def test_adam_update_norm_is_the_step_over_the_learning_rate() -> None:
    """With no weight decay, ``lr * ||m_hat / (sqrt(v_hat) + eps)||`` is the norm of the applied update,
    also for parameters whose step count differs (reset) and for an AMSGrad group."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = list(model.parameters())
    lr = 0.01
    opt = torch.optim.Adam(
        [{"params": params[:2]}, {"params": params[2:], "amsgrad": True, "betas": (0.8, 0.95), "eps": 1e-3}],
        lr=lr,
    )
    assert adam_update_norms(opt, params) is None  # no state yet
    for t in range(6):
        if t == 3:
            reset_adam_moments_(opt, params[1:3])  # two parameters start their step count again
        buffer = snapshot_weights_(params)
        opt.zero_grad()
        model(torch.randn(8, 3)).square().sum().backward()
        opt.step()
        delta = update_norms_(buffer, params)
        norms = adam_update_norms(opt, params, workspace=buffer)
        assert norms is not None
        torch.testing.assert_close(norms * lr, delta, rtol=1e-4, atol=1e-9)
    steps = [float(opt.state[p]["step"]) for p in params]
    assert steps == [6.0, 3.0, 3.0, 6.0]


def naive_jumps(
    values: list[float], factor: float, patience: int, window: int, min_history: int
) -> list[bool]:
    history: list[float] = []
    streak, out = 0, []
    for x in values:
        ready = len(history) >= min_history
        recent = history[-window:]
        median = sorted(recent)[(len(recent) - 1) // 2] if recent else math.nan  # torch's lower median
        high = not math.isfinite(x) or (ready and x > factor * median)
        if not high:
            history.append(x)
        streak = streak + 1 if high else 0
        out.append(streak >= patience)
    return out


def test_jump_detector_by_hand_and_against_a_plain_python_reference() -> None:
    detector = UpdateJumpDetector(factor=3.0, patience=3, window=20, min_history=10)
    values = [1.0] * 12 + [5.0] * 4 + [1.0, 5.0]
    flags = [bool(detector.observe(torch.tensor(v))[0]) for v in values]
    assert flags == [False] * 14 + [True, True, False, False]
    assert detector.jumps is not None and detector.jumps.item() == 1.0

    g = torch.Generator().manual_seed(0)
    values = (torch.rand(120, generator=g) + 0.5).tolist()
    for i in (30, 31, 32, 33, 34, 60, 61, 90, 91, 92):
        values[i] *= 8.0
    values[75] = math.nan
    detector = UpdateJumpDetector(factor=3.0, patience=3, window=25, min_history=10)
    got = [bool(detector.observe(torch.tensor(v))[0]) for v in values]
    want = naive_jumps(values, 3.0, 3, 25, 10)
    assert got == want and sum(got) >= 4


def test_jump_detector_state_round_trip_continues_identically(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    values = (torch.rand(40, generator=g) + 1.0).tolist() + [9.0] * 5
    detector = UpdateJumpDetector(window=8, min_history=4)
    for v in values[:20]:
        detector.observe(torch.tensor(v))
    torch.save(detector.state_dict(), tmp_path / "s.pt")
    copy = UpdateJumpDetector(window=8, min_history=4)
    copy.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for v in values[20:]:
        a, b = detector.observe(torch.tensor(v)), copy.observe(torch.tensor(v))
        assert [bool(x) for x in a[:2]] == [bool(x) for x in b[:2]] and a[2].item() == b[2].item()
    assert bool(a[0])  # the rise at the end is a jump


# ---------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sample_every_n_steps": 0}, "sample_every_n_steps"),
        ({"max_layer_keys": 0}, "max_layer_keys"),
        ({"per_layer": "yes"}, "per_layer"),
        ({"factor": 1.0}, "factor"),
        ({"patience": 0}, "patience"),
        ({"min_history": 1}, "min_history"),
        ({"log_every_n_steps": -1}, "log_every_n_steps"),
    ],
)
def test_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        UpdateMonitor(**kwargs)


def test_refuses_sharded_strategies() -> None:
    class FakeTrainer:
        strategy = FSDPStrategy()

    with pytest.raises(UnsupportedStrategyError, match="UpdateMonitor"):
        UpdateMonitor().setup(FakeTrainer(), MLPModule(), "fit")  # type: ignore[arg-type]


class WeightSpy(pl.Callback):
    """The naive reference: copies every weight before the step and compares after it."""

    def __init__(self) -> None:
        self.before: list[Tensor] = []
        self.ratios: list[float] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        after = [p.detach() for p in pl_module.parameters()]
        d = math.sqrt(
            sum(float((a - b).double().square().sum()) for a, b in zip(after, self.before, strict=True))
        )
        n = math.sqrt(sum(float(b.double().square().sum()) for b in self.before))
        self.ratios.append(d / n)


def _recording(monitor: UpdateMonitor) -> list[UpdateResult]:
    results: list[UpdateResult] = []
    original = monitor.measure

    def measure(trainer: pl.Trainer) -> UpdateResult | None:
        result = original(trainer)
        if result is not None:
            results.append(result)
        return result

    monitor.measure = measure  # type: ignore[method-assign]
    return results


def test_ratio_and_keys_in_a_fit_with_syncs_on_logging_steps_only(tmp_path: Path) -> None:
    monitor = UpdateMonitor(log_every_n_steps=4, max_layer_keys=3)
    spy = WeightSpy()
    results = _recording(monitor)
    calls_per_step: list[list[str]] = []
    with count_host_syncs() as counter:
        original_before, original_measure = monitor.on_before_optimizer_step, monitor.measure

        def before(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            counter.calls, counter.active = [], True
            try:
                original_before(trainer, pl_module, optimizer)
            finally:
                counter.active = False

        def measure(trainer: pl.Trainer) -> UpdateResult | None:
            counter.active = True
            try:
                return original_measure(trainer)
            finally:
                counter.active = False
                calls_per_step.append(list(counter.calls))

        monitor.on_before_optimizer_step = before  # type: ignore[method-assign]
        monitor.measure = measure  # type: ignore[method-assign]
        torch.manual_seed(0)
        trainer = make_trainer(
            tmp_path, max_steps=9, max_epochs=None, logger=CSVLogger(tmp_path), callbacks=[monitor, spy]
        )
        trainer.fit(AdamMLP(depth=5, lr=0.01), make_loader(n=160))
    assert calls_per_step == [[], [], [], ["tolist"], [], [], [], ["tolist"], []]
    assert [r.step for r in results] == list(range(9))
    assert [r.ratio.item() for r in results] == pytest.approx(spy.ratios, rel=1e-5)
    assert not monitor._handles  # the hooks are removed after the fit
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))  # type: ignore[union-attr]
    logged = [r for r in rows if r.get("update/ratio")]
    assert [int(r["step"]) for r in logged] == [3, 7]
    layer_keys = sorted(k for k in rows[0] if k.startswith("update/ratio/"))
    assert layer_keys == [
        "update/ratio/net.0",
        "update/ratio/net.4",
        "update/ratio/net.8",
    ]  # first, middle, last
    for key in ("update/adam_norm", "update/ratio_max", "update/ratio_median", "update/jump"):
        assert logged[-1][key] != "", key
    assert float(logged[0]["update/ratio"]) == pytest.approx(spy.ratios[3], rel=1e-5)


class LRJump(AdamMLP):
    """Adam whose learning rate is multiplied by 30 from step 25 on: a sustained jump of the updates."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 30.0 if step >= 25 else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_learning_rate_jump_is_flagged_after_patience_samples(tmp_path: Path) -> None:
    monitor = UpdateMonitor(patience=3, min_history=10, factor=3.0)
    results = _recording(monitor)
    torch.manual_seed(0)
    make_trainer(tmp_path, max_steps=32, max_epochs=None, callbacks=[monitor]).fit(
        LRJump(), make_loader(n=512)
    )
    flags = [bool(r.jump) for r in results]
    assert flags == [False] * 27 + [True] * 5  # steps 25, 26 high; the third high sample is a jump
    assert [bool(r.high) for r in results[25:]] == [True] * 7
    assert monitor.jumps.item() == 1.0
    adam = [r.adam_norm.item() for r in results if r.adam_norm is not None]
    assert len(adam) == 32 and all(a > 0 for a in adam)


def test_sampled_steps_only(tmp_path: Path) -> None:
    monitor = UpdateMonitor(sample_every_n_steps=3)
    results = _recording(monitor)
    make_trainer(tmp_path, max_steps=8, max_epochs=None, callbacks=[monitor]).fit(AdamMLP(), make_loader())
    assert [r.step for r in results] == [2, 5]


def _fit(tmp_path: Path, callback: UpdateMonitor, epochs: int, ckpt: Path | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_epochs=epochs, callbacks=[callback])
    trainer.fit(AdamMLP(lr=0.05), make_loader(n=96), ckpt_path=ckpt)
    return trainer


def test_resume_continues_the_statistics(tmp_path: Path) -> None:
    def factory() -> UpdateMonitor:
        return UpdateMonitor(min_history=3, window=5)

    full_cb, resumed_cb = factory(), factory()
    _fit(tmp_path / "full", full_cb, epochs=3)
    first = _fit(tmp_path / "first", factory(), epochs=1)
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    _fit(tmp_path / "resumed", resumed_cb, epochs=3, ckpt=ckpt)
    a, b = full_cb.state_dict()["detector"], resumed_cb.state_dict()["detector"]
    assert torch.equal(a["detector"]["history"], b["detector"]["history"])
    assert torch.equal(a["detector"]["count"], b["detector"]["count"]) and a["detector"]["count"].item() == 18
    fresh = factory()
    fresh.load_state_dict({})
    assert fresh.detector.streak is None
