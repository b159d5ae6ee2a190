"""What the README's comparison table says of the peer packages, checked against the packages themselves.

Each test runs the peer (zclip 1.0.0, autoclip, Lightning's ``gradient_clip_val``, wandb.watch's hooks)
and our counterpart on the same gradients and asserts the difference the table claims.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import wandb
from autoclip.torch import QuantileClip
from conftest import MLPModule, count_host_syncs, make_loader, make_trainer
from torch import Tensor, nn
from wandb.integration.torch.wandb_torch import TorchHistory
from zclip import ZClip as ZClipRef
from zclip import ZClipLightningCallback

from stability_callbacks import NonFiniteGuard, ZClip
from stability_callbacks.clipping import PercentilePolicy, ZScorePolicy, clip_grad_norm_to, total_norm
from stability_callbacks.histograms import tensor_histograms


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _grads(model: nn.Module, scale: float, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) * scale for p in model.parameters()]


def _set(model: nn.Module, grads: list[Tensor]) -> None:
    for p, grad in zip(model.parameters(), grads, strict=True):
        p.grad = grad.clone()


def _norm(grads: list[Tensor | None]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads if g is not None))


def test_one_nan_step_disables_zclip_for_good_but_not_ours() -> None:
    """zclip's EMA mean and variance become NaN after one NaN step, so a later 50x spike passes
    unclipped; our ZScorePolicy ignores the NaN norm and clips the spike."""
    model = _model()
    ref = ZClipRef(warmup_steps=5, max_grad_norm=None)
    ours = ZScorePolicy(warmup_steps=5, max_grad_norm=None)
    sequence = [_grads(model, 1.0, seed) for seed in range(12)]
    sequence[8] = [g * float("nan") for g in sequence[8]]
    spike = [g * 50.0 for g in _grads(model, 1.0, 99)]
    for grads in sequence:
        _set(model, grads)
        ref.step(model)
        ours.step(total_norm(grads))
    assert math.isnan(ref.mean) and math.isnan(ref.var)
    assert ours.mean is not None and torch.isfinite(ours.mean) and torch.isfinite(ours.var)  # type: ignore[arg-type]

    _set(model, spike)
    ref.step(model)
    assert _norm([p.grad for p in model.parameters()]) == _norm(spike)  # zclip let it through
    decision = ours.step(total_norm(spike))
    assert decision.clipped.item()
    assert decision.norm_post.item() < 0.2 * _norm(spike)


def test_one_nan_step_makes_every_later_autoclip_gradient_nan_but_not_ours() -> None:
    """autoclip's QuantileClip records the NaN norm and its quantile, hence every later clipping
    coefficient, is NaN; our PercentilePolicy records finite norms only."""
    model = _model()
    ref = QuantileClip(list(model.parameters()), quantile=0.1, global_threshold=True)
    ours = PercentilePolicy(percentile=10.0, include_current=False)
    for seed in range(6):
        grads = _grads(model, float("nan") if seed == 2 else 1.0, seed)
        _set(model, grads)
        ref.step()
        ours.step(total_norm(grads))
    later = _grads(model, 1.0, 7)
    _set(model, later)
    ref.step()
    assert all(torch.isnan(p.grad).all() for p in model.parameters())  # type: ignore[arg-type]

    mine = [g.clone() for g in later]
    norm = total_norm(mine)
    clip_grad_norm_to(mine, ours.step(norm), total=norm)
    assert all(torch.isfinite(g).all() for g in mine)
    assert _norm(mine) <= _norm(later) + 1e-6


def _fit(tmp_path: Path, callbacks: list[pl.Callback], steps: int, **kwargs: Any) -> pl.Trainer:
    trainer = make_trainer(tmp_path, max_steps=steps, max_epochs=None, callbacks=callbacks, **kwargs)
    torch.manual_seed(0)
    trainer.fit(MLPModule(), make_loader(n=64))
    return trainer


def test_zclip_lightning_callback_keeps_nothing_for_a_resume_ours_does(tmp_path: Path) -> None:
    ref, ours = ZClipLightningCallback(warmup_steps=3), ZClip(warmup_steps=3)
    _fit(tmp_path / "ref", [ref], steps=6)
    _fit(tmp_path / "ours", [ours], steps=6)
    assert ref.zclip.initialized  # it has running statistics...
    assert ref.state_dict() == {}  # ...but a checkpoint gets none of them
    state = ours.state_dict()
    assert state and any("mean" in str(key) for key in _keys(state))


def _keys(state: Any) -> list[str]:
    if isinstance(state, dict):
        return [str(k) for k in state] + [k for v in state.values() for k in _keys(v)]
    return []


class NaNAtStep(MLPModule):
    """An MLP whose loss is NaN at one training step."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.bad_step = bad_step

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.bad_step else loss


def test_gradient_clip_val_lets_a_nan_step_into_the_weights_the_guard_does_not(tmp_path: Path) -> None:
    def weights(callbacks: list[pl.Callback], **kwargs: Any) -> list[Tensor]:
        trainer = make_trainer(tmp_path, max_steps=5, max_epochs=None, callbacks=callbacks, **kwargs)
        torch.manual_seed(0)
        module = NaNAtStep(bad_step=2)
        trainer.fit(module, make_loader(n=64))
        return [p.detach() for p in module.parameters()]

    clipped = weights([], gradient_clip_val=1.0)
    with pytest.warns(UserWarning, match="NonFiniteGuard: skipped step 2"):
        guarded = weights([NonFiniteGuard()])
    assert all(torch.isnan(w).all() for w in clipped)
    assert all(torch.isfinite(w).all() for w in guarded)


# -- wandb.watch --------------------------------------------------------------------------------------
# ``wandb.watch(model, log="all", log_freq=n)`` installs the hooks of ``run._torch``, a ``TorchHistory``:
# the tests install the same hooks on a ``TorchHistory`` whose run only records what it is given.


class _RecordingRun:
    def __init__(self) -> None:
        self.logged: list[dict[str, Any]] = []

    def _log(self, data: dict[str, Any], commit: bool = False) -> None:
        self.logged.append(data)


@pytest.fixture
def wandb_history(monkeypatch: pytest.MonkeyPatch) -> tuple[TorchHistory, _RecordingRun]:
    run = _RecordingRun()
    monkeypatch.setattr(wandb, "run", run)
    return TorchHistory(), run


def _logged_max(run: _RecordingRun, tag: str) -> list[float]:
    return [float(entry[tag].bins[-1]) for entry in run.logged if tag in entry]


def test_wandb_watch_logs_each_backward_and_scaled_amp_gradients(
    wandb_history: tuple[TorchHistory, _RecordingRun],
) -> None:
    """wandb.watch's gradient hooks fire on every backward pass: under gradient accumulation they log
    each micro-batch's gradient, never the sum the optimizer steps with; under a GradScaler they log
    the scaled gradient (here 4096 times too large). HistogramLogger logs once per optimizer step, after
    unscaling (``tests/test_histograms.py``, the test below)."""
    history, run = wandb_history
    model = _model()
    history.add_log_gradients_hook(model, log_freq=1)
    x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))
    for micro in x:  # one optimizer step of three accumulated micro-batches
        model(micro).square().mean().backward()
    weight = model[0].weight  # type: ignore[index]
    maxes = _logged_max(run, "gradients/0.weight")
    assert len(maxes) == 3  # three histograms for one optimizer step
    assert float(weight.grad.max()) not in maxes  # type: ignore[union-attr]

    model.zero_grad()
    run.logged.clear()
    scaler = torch.amp.GradScaler("cpu", init_scale=4096.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.scale(model(x[0]).square().mean()).backward()
    scaler.unscale_(optimizer)
    (logged,) = _logged_max(run, "gradients/0.weight")
    assert logged == pytest.approx(4096.0 * float(weight.grad.max()), rel=1e-6)  # type: ignore[union-attr]


def test_wandb_watch_drops_nonfinite_values_and_reads_each_tensor_on_the_host(
    wandb_history: tuple[TorchHistory, _RecordingRun],
) -> None:
    """wandb.watch removes NaN and inf values from its histograms without counting them, and reads
    every tensor on the host several times (a sync each on an accelerator). HistogramLogger counts the
    non-finite values apart and makes one transfer for all tensors (``tests/test_histograms.py``)."""
    history, run = wandb_history
    grad = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 3.0])
    with count_host_syncs() as counter:
        counter.active = True
        history.log_tensor_stats(grad, "gradients/g")
        counter.active = False
    assert len(counter.calls) >= 3  # per tensor: the all-non-finite check, min, max
    counts = run.logged[0]["gradients/g"].histogram
    assert sum(counts) == 3  # the NaN and the inf are gone, and nothing records them
    assert not any("nonfinite" in key or "nan" in key for key in run.logged[0])
    ours = tensor_histograms([grad], bins=64)[0]
    assert ours is not None and (ours.num, ours.nonfinite) == (3, 2)
