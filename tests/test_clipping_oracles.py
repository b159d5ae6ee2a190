"""The published implementations as oracles: autoclip's QuantileClip, zclip 1.0.0 and timm's AGC, on
recorded gradient sequences and in real fits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from autoclip.torch import QuantileClip
from conftest import MLPModule, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from timm.utils.agc import adaptive_clip_grad
from torch import Tensor, nn
from zclip import ZClip as ZClipRef
from zclip import ZClipLightningCallback

from stability_callbacks.clipping import (
    AGC,
    AutoClip,
    PercentilePolicy,
    ZClip,
    ZScorePolicy,
    adaptive_clip_grad_,
    clip_grad_norm_to,
    scale_grads_,
    total_norm,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _gradient_sequence(model: nn.Module, steps: int = 80, seed: int = 0) -> list[list[Tensor]]:
    """Random gradients whose scale drifts, with spikes (x30) and quiet steps (x0.05)."""
    g = torch.Generator().manual_seed(seed)
    seq = []
    for step in range(steps):
        scale = 1.0 + 0.02 * step
        if step % 11 == 7:
            scale *= 30.0
        elif step % 13 == 5:
            scale *= 0.05
        seq.append([torch.randn(p.shape, generator=g) * scale for p in model.parameters()])
    return seq


def _set_grads(model: nn.Module, grads: list[Tensor]) -> None:
    for p, grad in zip(model.parameters(), grads, strict=True):
        p.grad = grad.clone()


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]


def _close(a: list[Tensor], b: list[Tensor], rtol: float = 1e-5) -> bool:
    return all(torch.allclose(x, y, rtol=rtol, atol=1e-7) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------------------------------
# AutoClip vs autoclip.QuantileClip(global_threshold=True)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("percentile", "history"), [(10.0, 1000), (50.0, 7), (90.0, 20)])
def test_percentile_policy_matches_quantile_clip_on_a_recorded_sequence(
    percentile: float, history: int
) -> None:
    ref_model, our_model = _model(), _model()
    ref = QuantileClip(
        ref_model.parameters(), quantile=percentile / 100, history_length=history, global_threshold=True
    )
    policy = PercentilePolicy(percentile, history, include_current=False)
    clipped = 0
    for grads in _gradient_sequence(ref_model):
        _set_grads(ref_model, grads)
        _set_grads(our_model, grads)
        ref.step()
        ours = _grads(our_model)
        norm = total_norm(ours)
        decision = clip_grad_norm_to(ours, policy.step(norm), total=norm)
        clipped += int(decision.clipped.item())
        assert _close(_grads(ref_model), ours)
    assert clipped > 5  # the comparison covers clipped steps


class QuantileClipCallback(Callback):
    """autoclip's QuantileClip called from a callback (the package has no Lightning callback)."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.clipper: QuantileClip | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        if self.clipper is None:
            self.clipper = QuantileClip(list(pl_module.parameters()), global_threshold=True, **self.kwargs)
        self.clipper.step()


def _fit(tmp_path: Path, callback: Callback, lr: float = 0.5, epochs: int = 3) -> list[Tensor]:
    torch.manual_seed(0)
    model = MLPModule(lr=lr)
    make_trainer(tmp_path, max_epochs=epochs, callbacks=[callback]).fit(model, make_loader(n=96))
    return [p.detach().clone() for p in model.parameters()]


def test_autoclip_fit_matches_quantile_clip_fit(tmp_path: Path) -> None:
    ours = AutoClip(percentile=30.0, history=5, include_current=False)
    a = _fit(tmp_path / "a", ours)
    b = _fit(tmp_path / "b", QuantileClipCallback(quantile=0.3, history_length=5))
    bare = _fit(tmp_path / "c", Callback())
    assert ours.clipped_steps.item() > 1
    assert _close(a, b)
    assert not _close(a, bare)


# ---------------------------------------------------------------------------------------------------
# ZClip vs zclip 1.0.0
# ---------------------------------------------------------------------------------------------------

ZCLIP_CONFIGS = [
    {"warmup_steps": 5, "max_grad_norm": None},
    {"warmup_steps": 5, "max_grad_norm": None, "clip_option": "mean"},
    {"warmup_steps": 5, "max_grad_norm": None, "mode": "percentile"},
    {"warmup_steps": 5, "max_grad_norm": 20.0},
    {"warmup_steps": 5, "max_grad_norm": None, "skip_update_on_spike": True},
    {"warmup_steps": 8, "max_grad_norm": None, "clip_factor": 0.7, "alpha": 0.9, "z_thresh": 2.0},
    {"warmup_steps": 3, "max_grad_norm": 8.0, "mode": "percentile", "z_thresh": 1.0},
]


@pytest.mark.parametrize("config", ZCLIP_CONFIGS, ids=[str(i) for i in range(len(ZCLIP_CONFIGS))])
def test_zscore_policy_matches_zclip_on_a_recorded_sequence(
    config: dict[str, Any],
) -> None:
    ref_model, our_model = _model(), _model()
    ref = ZClipRef(**config)
    policy = ZScorePolicy(**config)
    clipped = 0
    for grads in _gradient_sequence(ref_model):
        _set_grads(ref_model, grads)
        _set_grads(our_model, grads)
        ref.step(ref_model)
        ours = _grads(our_model)
        decision = policy.step(total_norm(ours))
        scale_grads_(ours, decision.coef)
        clipped += int(decision.clipped.item())
        assert _close(_grads(ref_model), ours)
        if ref.initialized:
            assert policy.mean is not None and policy.var is not None
            assert policy.mean.item() == pytest.approx(ref.mean, rel=1e-6)
            assert policy.var.item() == pytest.approx(ref.var, rel=1e-5)
    assert clipped > 3


def test_zclip_fit_matches_zclip_lightning_callback(tmp_path: Path) -> None:
    config = {"warmup_steps": 3, "z_thresh": 0.5, "max_grad_norm": None}
    ours = ZClip(**config)
    a = _fit(tmp_path / "a", ours)
    b = _fit(tmp_path / "b", ZClipLightningCallback(**config))
    bare = _fit(tmp_path / "c", Callback())
    assert ours.clipped_steps.item() > 1
    assert _close(a, b)
    assert not _close(a, bare)


# ---------------------------------------------------------------------------------------------------
# AGC vs timm.utils.agc.adaptive_clip_grad
# ---------------------------------------------------------------------------------------------------


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.big = nn.Linear(300, 300)  # 90 000 elements: reduced in place, not flattened
        self.fc = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.tensor(2.0))  # a 0-d parameter


def test_adaptive_clip_grad_matches_timm() -> None:
    torch.manual_seed(0)
    ref_model = ConvNet()
    with torch.no_grad():
        ref_model.fc.weight[0].zero_()  # a zero unit: the eps floor matters
    our_model = copy.deepcopy(ref_model)
    g = torch.Generator().manual_seed(3)
    scales = [0.1, 0.01, 1, 0.001, 5, 0.1, 0.02, 3, 1]
    grads = [
        torch.randn(p.shape, generator=g) * s for p, s in zip(ref_model.parameters(), scales, strict=True)
    ]
    _set_grads(ref_model, grads)
    _set_grads(our_model, grads)
    adaptive_clip_grad(ref_model.parameters(), clip_factor=0.05, eps=1e-3)
    decision = adaptive_clip_grad_(list(our_model.parameters()), clip_factor=0.05, eps=1e-3)
    assert 0.0 < decision.clipped.item() < 1.0  # some units clipped, some not
    for ref_p, our_p in zip(ref_model.parameters(), our_model.parameters(), strict=True):
        assert torch.allclose(ref_p.grad, our_p.grad, rtol=1e-6, atol=1e-6)  # type: ignore[arg-type]


class TimmAGC(Callback):
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, opt: Any) -> None:
        adaptive_clip_grad(pl_module.parameters(), clip_factor=0.02, eps=1e-3)


def test_agc_fit_matches_timm_fit(tmp_path: Path) -> None:
    a = _fit(tmp_path / "a", AGC(clip_factor=0.02, exclude=[]))
    b = _fit(tmp_path / "b", TimmAGC())
    bare = _fit(tmp_path / "c", Callback())
    assert _close(a, b, rtol=1e-6)
    assert not _close(a, bare)
