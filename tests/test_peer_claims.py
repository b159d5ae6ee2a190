"""What the README's comparison table says of the peer packages, checked against the packages themselves.

Each test runs the peer (zclip 1.0.0, autoclip, Lightning's ``gradient_clip_val``) and our counterpart
on the same gradients and asserts the difference the table claims.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from autoclip.torch import QuantileClip
from conftest import MLPModule, make_loader, make_trainer
from torch import Tensor, nn
from zclip import ZClip as ZClipRef
from zclip import ZClipLightningCallback

from stability_callbacks import NonFiniteGuard, ZClip
from stability_callbacks.clipping import PercentilePolicy, ZScorePolicy, clip_grad_norm_to, total_grad_norm


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
        ours.step(total_grad_norm(grads))
    assert math.isnan(ref.mean) and math.isnan(ref.var)
    assert ours.mean is not None and torch.isfinite(ours.mean) and torch.isfinite(ours.var)  # type: ignore[arg-type]

    _set(model, spike)
    ref.step(model)
    assert _norm([p.grad for p in model.parameters()]) == _norm(spike)  # zclip let it through
    decision = ours.step(total_grad_norm(spike))
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
        ours.step(total_grad_norm(grads))
    later = _grads(model, 1.0, 7)
    _set(model, later)
    ref.step()
    assert all(torch.isnan(p.grad).all() for p in model.parameters())  # type: ignore[arg-type]

    mine = [g.clone() for g in later]
    norm = total_grad_norm(mine)
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
    guarded = weights([NonFiniteGuard()])
    assert all(torch.isnan(w).all() for w in clipped)
    assert all(torch.isfinite(w).all() for w in guarded)
