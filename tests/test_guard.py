"""NonFiniteGuard: skipped steps leave weights and optimizer state bit-identical, halt leaves finite
weights in the exception checkpoint, clippers' statistics stay finite, ranks agree."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, host_syncs_per_step, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn

from stability_callbacks.clipping import AutoClip, ValueClip, ZClip
from stability_callbacks.guard import NonFiniteGradientError, NonFiniteGuard


class PoisonedMLP(MLPModule):
    """Trains with AdamW (weight decay); the loss is multiplied by NaN (or inf) at the listed steps."""

    def __init__(self, bad_steps: tuple[int, ...] = (2,), value: float = math.nan) -> None:
        super().__init__()
        self.bad_steps = bad_steps
        self.value = value

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.global_step in self.bad_steps:
            loss = loss * self.value
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class Snapshot(Callback):
    """Copies weights and optimizer state at the start of every batch."""

    def __init__(self) -> None:
        self.weights: dict[int, list[Tensor]] = {}
        self.states: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        self.weights[step] = [p.detach().clone() for p in pl_module.parameters()]
        self.states[step] = copy.deepcopy(trainer.optimizers[0].state_dict())


def _fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Callback], steps: int, **kw: Any) -> None:
    make_trainer(tmp_path, max_steps=steps, max_epochs=None, callbacks=callbacks, **kw).fit(
        model, make_loader()
    )


def _states_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a["state"]:
        for name, value in a["state"][key].items():
            other = b["state"][key][name]
            if not torch.equal(torch.as_tensor(value), torch.as_tensor(other)):
                return False
    return a["state"].keys() == b["state"].keys()


def test_skip_leaves_weights_and_adam_state_bit_identical(tmp_path: Path) -> None:
    snap = Snapshot()
    guard = NonFiniteGuard("skip")
    model = PoisonedMLP(bad_steps=(2,))
    with pytest.warns(UserWarning, match=r"skipped step 2 .*\(non-finite values in net.0.weight: 128, "):
        make_trainer(tmp_path, max_steps=4, max_epochs=None, callbacks=[guard, snap]).fit(
            model, make_loader()
        )
    assert guard.skipped == 1 and guard.consecutive == 0
    assert all(torch.equal(a, b) for a, b in zip(snap.weights[2], snap.weights[3], strict=True))
    assert _states_equal(snap.states[2], snap.states[3])
    # The step before and after did move the weights and the state (the comparison can fail).
    assert not all(torch.equal(a, b) for a, b in zip(snap.weights[1], snap.weights[2], strict=True))
    assert not _states_equal(snap.states[1], snap.states[2])
    assert all(torch.isfinite(p).all() for p in model.parameters())


class ZeroingGuard(Callback):
    """The naive alternative: zero the gradients of a non-finite step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        for p in pl_module.parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                p.grad.zero_()
            elif p.grad is not None:
                p.grad.nan_to_num_(0.0)


def test_zeroing_gradients_would_not_leave_adam_untouched(tmp_path: Path) -> None:
    snap = Snapshot()
    make_trainer(tmp_path, max_steps=4, max_epochs=None, callbacks=[ZeroingGuard(), snap]).fit(
        PoisonedMLP(bad_steps=(2,)), make_loader()
    )
    assert not all(torch.equal(a, b) for a, b in zip(snap.weights[2], snap.weights[3], strict=True))
    assert not _states_equal(snap.states[2], snap.states[3])


@pytest.mark.parametrize("clipper", [AutoClip, lambda: ZClip(warmup_steps=2)], ids=["AutoClip", "ZClip"])
def test_nan_step_keeps_weights_and_clipper_statistics_finite(tmp_path: Path, clipper: Any) -> None:
    clip = clipper()
    guard = NonFiniteGuard("skip")
    model = PoisonedMLP(bad_steps=(1, 4))
    with pytest.warns(UserWarning, match="NonFiniteGuard"):
        make_trainer(tmp_path, max_steps=8, max_epochs=None, callbacks=[clip, guard]).fit(
            model, make_loader()
        )
    assert guard.skipped == 2 and clip.skipped_steps.item() == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = clip.policy.state_dict()
    values = state["buffer"] + ([state["mean"], state["var"]] if "mean" in state else [])
    assert all(math.isfinite(v) for v in values)
    assert state["count"] == (6 if isinstance(clip, AutoClip) else 2)  # 6 finite norms; ZClip warm-up of 2


def test_halt_leaves_finite_weights_in_the_exception_checkpoint(tmp_path: Path) -> None:
    snap = Snapshot()
    ckpt = OnExceptionCheckpoint(dirpath=tmp_path, filename="on_exception")
    trainer = make_trainer(
        tmp_path,
        max_steps=6,
        max_epochs=None,
        callbacks=[NonFiniteGuard("halt"), snap, ckpt],
        enable_checkpointing=True,
    )
    with pytest.raises(NonFiniteGradientError, match="step 3"):
        trainer.fit(PoisonedMLP(bad_steps=(3,)), make_loader())
    checkpoint = torch.load(tmp_path / "on_exception.ckpt", weights_only=True)
    weights = list(checkpoint["state_dict"].values())
    assert all(torch.isfinite(w).all() for w in weights)
    assert all(torch.equal(a, b) for a, b in zip(weights, snap.weights[3], strict=True))


def test_max_consecutive_stops_a_run_that_does_not_recover(tmp_path: Path) -> None:
    guard = NonFiniteGuard("skip", max_consecutive=3)
    trainer = make_trainer(tmp_path, max_steps=10, max_epochs=None, callbacks=[guard])
    with pytest.warns(UserWarning), pytest.raises(NonFiniteGradientError, match="3 optimizer steps in a row"):
        trainer.fit(PoisonedMLP(bad_steps=tuple(range(1, 10))), make_loader())
    assert guard.skipped == 2 and guard.consecutive == 3


def test_under_a_grad_scaler_inf_steps_are_the_scalers(tmp_path: Path) -> None:
    guard = NonFiniteGuard("halt")
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    model = PoisonedMLP(bad_steps=(2,), value=math.inf)
    make_trainer(tmp_path, max_steps=5, max_epochs=None, plugins=[plugin], callbacks=[guard]).fit(
        model, make_loader()
    )
    assert guard.scaler_skipped >= 1 and guard.skipped == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_one_host_read_per_step(tmp_path: Path) -> None:
    guard = NonFiniteGuard("skip")
    with host_syncs_per_step(guard) as calls:
        make_trainer(tmp_path, max_steps=4, max_epochs=None, callbacks=[guard]).fit(
            MLPModule(), make_loader()
        )
    assert calls == [["item"]] * 4


def test_guard_after_value_clip_warns(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[ValueClip(), NonFiniteGuard()])
    with pytest.warns(UserWarning, match="put the guard first"):
        trainer.fit(MLPModule(), make_loader())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"action": "retry"}, "action"),
        ({"max_consecutive": 0}, "max_consecutive"),
        ({"log_every_n_steps": -1}, "log_every_n_steps"),
    ],
)
def test_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        NonFiniteGuard(**kwargs)


def test_state_round_trip() -> None:
    guard = NonFiniteGuard()
    guard.skipped, guard.scaler_skipped, guard.consecutive = 3, 2, 1
    other = NonFiniteGuard()
    other.load_state_dict(guard.state_dict())
    assert other.state_dict() == {"skipped": 3, "scaler_skipped": 2, "consecutive": 1}
    other.load_state_dict({})
    assert other.state_dict() == {"skipped": 0, "scaler_skipped": 0, "consecutive": 0}


class RankPoisoned(PoisonedMLP):
    """NaN on global rank 1 only, at step 2."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.global_step == 2 and self.global_rank == 1:
            loss = loss * math.nan
        return loss


class RankRecorder(Callback):
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))  # type: ignore[attr-defined]
        flat = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        gathered = trainer.strategy.all_gather(flat)
        skipped = trainer.strategy.all_gather(torch.tensor(float(guard.skipped)))
        if trainer.is_global_zero:
            torch.save({"weights": gathered, "skipped": skipped}, Path(trainer.default_root_dir) / "ranks.pt")


@pytest.mark.ddp
def test_every_rank_skips_when_one_rank_sees_nan(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        max_epochs=None,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[NonFiniteGuard("skip"), RankRecorder()],
    )
    trainer.fit(RankPoisoned(), make_loader())
    result = torch.load(tmp_path / "ranks.pt", weights_only=True)
    assert result["skipped"].tolist() == [1.0, 1.0]
    assert torch.equal(result["weights"][0], result["weights"][1])
    assert torch.isfinite(result["weights"]).all()
