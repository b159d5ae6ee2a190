"""Moment reset and spike-aware clipping: by hand, against naive loops and pytorch_optimizer's SPAM; the
callback's schedule, on-demand reset, logging, host syncs and resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, host_syncs_per_step, make_loader, make_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from stability_callbacks import MomentReset, reset_adam_moments_, spike_aware_clip_
from stability_callbacks.moment_reset import MomentsUnavailableError, has_adam_moments


class AdamMLP(MLPModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _stepped(
    opt_cls: type[torch.optim.Optimizer] = torch.optim.Adam, steps: int = 3, **kw: Any
) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = opt_cls(model.parameters(), lr=0.1, **kw)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 3)).square().sum().backward()
        opt.step()
    return model, opt


# ---------------------------------------------------------------------------------------------------
# Layer 1
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reset_step", [True, False])
def test_reset_zeroes_the_moments_and_the_step_when_asked(reset_step: bool) -> None:
    model, opt = _stepped(amsgrad=True)
    params = list(model.parameters())
    assert reset_adam_moments_(opt, params[:2], reset_step=reset_step) == 2
    for i, p in enumerate(params):
        state = opt.state[p]
        zeroed = i < 2
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert bool((state[key] == 0).all()) == zeroed, (i, key)
        assert float(state["step"]) == (0.0 if zeroed and reset_step else 3.0)
    assert reset_adam_moments_(opt) == len(params)


def test_after_a_reset_with_the_step_adam_takes_a_fresh_first_step() -> None:
    model, opt = _stepped(torch.optim.AdamW, weight_decay=0.0)
    fresh_model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    fresh_model.load_state_dict(model.state_dict())
    fresh = torch.optim.AdamW(fresh_model.parameters(), lr=0.1, weight_decay=0.0)
    reset_adam_moments_(opt)
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (fresh_model, fresh)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reset_refuses_an_optimizer_without_moments() -> None:
    adam = torch.optim.Adam(nn.Linear(2, 2).parameters())
    assert has_adam_moments(adam) is None and reset_adam_moments_(adam) == 0  # no state yet: nothing to do
    assert has_adam_moments(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)) is False
    _, sgd = _stepped(torch.optim.SGD, momentum=0.9)
    assert has_adam_moments(sgd) is False
    with pytest.raises(MomentsUnavailableError, match="SGD keeps no Adam moments"):
        reset_adam_moments_(sgd)


def naive_spike_clip(g: list[float], v: list[float], theta: float) -> tuple[list[float], int]:
    out, n = [], 0
    for x, s in zip(g, v, strict=True):
        if x * x > theta * s:
            out.append(math.copysign(math.sqrt(theta * s), x))
            n += 1
        else:
            out.append(x)
    return out, n


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_spike_aware_clip_matches_a_naive_loop(grad_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(5, 4), (7,), (2, 3, 2)]
    v = [torch.rand(s, generator=g) * 1e-2 for s in shapes]
    grads = [
        (torch.randn(s, generator=g) * torch.randint(1, 30, s, generator=g)).to(grad_dtype) for s in shapes
    ]
    v[1][3] = 0.0  # a zero second moment clips its element to 0
    theta = 50.0
    ref = [
        naive_spike_clip(x.double().flatten().tolist(), s.double().flatten().tolist(), theta)
        for x, s in zip(grads, v, strict=True)
    ]
    count = spike_aware_clip_(grads, v, theta, count=True)
    expected = sum(n for _, n in ref)
    assert count is not None and count.item() == expected and 0 < expected < sum(math.prod(s) for s in shapes)
    tol = 1e-6 if grad_dtype == torch.float32 else 1e-2
    for got, (want, _) in zip(grads, ref, strict=True):
        assert got.double().flatten().tolist() == pytest.approx(want, rel=tol, abs=1e-7)
    assert grads[1][3].item() == 0.0
    assert spike_aware_clip_(grads, v, theta) is None  # idempotent, and no count unless asked


def test_spike_aware_clip_checks_its_inputs() -> None:
    with pytest.raises(ValueError, match="2 gradients and 1 second moments"):
        spike_aware_clip_([torch.ones(2), torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match="shape"):
        spike_aware_clip_([torch.ones(2)], [torch.ones(3)])


def test_callback_in_a_plain_loop_equals_pytorch_optimizer_spam() -> None:
    """Adam with MomentReset(reset_step=False) takes the steps of the peer's SPAM (dense, no LR warm-up)."""
    peer = pytest.importorskip("pytorch_optimizer")
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    theirs = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    theirs.load_state_dict(ours.state_dict())
    interval, delay, theta = 12, 3, 4.0
    opt = torch.optim.Adam(ours.parameters(), lr=1e-2, eps=1e-12)
    spam = peer.SPAM(
        theirs.parameters(),
        lr=1e-2,
        eps=1e-12,
        density=1.0,
        warmup_epoch=0,
        threshold=theta,
        grad_accu_steps=delay,
        update_proj_gap=interval,
        foreach=False,
    )
    callback = MomentReset(interval=interval, theta=theta, clip_delay=delay, reset_step=False)
    g = torch.Generator().manual_seed(1)
    clipped_steps = 0
    for t in range(30):
        x = torch.randn(16, 6, generator=g) * (30.0 if t in (8, 20) else 1.0)
        y = torch.randint(0, 3, (16,), generator=g)
        for model, optimizer in ((ours, opt), (theirs, spam)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        trainer = SimpleNamespace(global_step=t, loggers=[], log_every_n_steps=50, optimizers=[opt])
        result = callback.step(trainer, opt)  # type: ignore[arg-type]
        assert result.reset == ((t + 1) % interval == 0)
        assert result.clip_active == (t + 1 >= delay and (t + 1) % interval >= delay)
        clipped_steps += result.clip_active
        opt.step()
        spam.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert callback.resets == 2 and clipped_steps > 10


# ---------------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"interval": 0}, "interval"),
        ({"theta": 0.0}, "theta"),
        ({"clip_delay": -1}, "clip_delay"),
        ({"interval": 10, "clip_delay": 10}, "clip_delay"),
        ({"reset_step": 1}, "reset_step"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MomentReset(**kwargs)


class ResetOnDemand(pl.Callback):
    """Asks for a reset at the end of one batch, as the autopilot would after a spike."""

    def __init__(self, target: MomentReset, at: int) -> None:
        self.target, self.at = target, at
        self.moments_after: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.at:
            self.target.reset(trainer)
            opt = trainer.optimizers[0]
            self.moments_after.append(
                sum(float(opt.state[p]["exp_avg_sq"].abs().sum()) for p in pl_module.parameters())
            )


def test_on_demand_reset_in_a_fit_and_logging_without_host_syncs(tmp_path: Path) -> None:
    callback = MomentReset(interval=5, theta=5000.0, clip_delay=2, log_every_n_steps=3)
    demand = ResetOnDemand(callback, at=7)
    with host_syncs_per_step(callback) as calls_per_step:
        trainer = make_trainer(
            tmp_path, max_steps=12, max_epochs=None, logger=CSVLogger(tmp_path), callbacks=[callback, demand]
        )
        trainer.fit(AdamMLP(lr=0.01), make_loader(n=192))
    assert len(calls_per_step) == 12
    for step, calls in enumerate(calls_per_step):
        # one transfer on logging steps where the clipping ran (and counted), none on the others
        assert calls == (["tolist"] if step in (2, 11) else []), (step, calls)
    assert demand.moments_after == [0.0]
    # scheduled before steps 4 and 9, on demand after step 6 (global_step 7)
    assert callback.resets == 3 and callback.last_reset_step == 9
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))  # type: ignore[union-attr]
    logged = {int(r["step"]): r for r in rows if r.get("moment/resets")}
    assert sorted(logged) == [2, 5, 8, 11]
    assert [float(logged[s]["moment/resets"]) for s in (2, 5, 8, 11)] == [0.0, 1.0, 2.0, 3.0]
    # clipping pauses for `clip_delay` steps after each reset: step 5 is one step after the reset at 4
    assert [float(logged[s]["moment/clip_active"]) for s in (2, 5, 8, 11)] == [1.0, 0.0, 0.0, 1.0]


def test_an_optimizer_without_moments_is_left_alone_with_one_warning(tmp_path: Path) -> None:
    callback = MomentReset(interval=2, clip_delay=0)
    model = MLPModule()  # SGD
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="keeps no Adam moments") as record:
        make_trainer(tmp_path, max_steps=5, max_epochs=None, callbacks=[callback]).fit(model, make_loader())
    assert len([w for w in record if "Adam moments" in str(w.message)]) == 1
    assert callback.resets == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _fit(tmp_path: Path, callback: MomentReset, epochs: int, ckpt: Path | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, max_epochs=epochs, callbacks=[callback])
    trainer.fit(AdamMLP(lr=0.05), make_loader(n=96), ckpt_path=ckpt)
    return trainer


def _weights(trainer: pl.Trainer) -> list[Tensor]:
    return [p.detach().clone() for p in trainer.lightning_module.parameters()]


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    def factory() -> MomentReset:
        return MomentReset(interval=4, theta=2.0, clip_delay=2)

    full = _fit(tmp_path / "full", factory(), epochs=3)
    first = _fit(tmp_path / "first", factory(), epochs=1)
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    resumed_cb = factory()
    resumed = _fit(tmp_path / "resumed", resumed_cb, epochs=3, ckpt=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(resumed), strict=True))
    assert resumed_cb.state_dict() == full.callbacks[0].state_dict()  # type: ignore[attr-defined]
    assert resumed_cb.resets == 4  # 18 steps: before steps 3, 7, 11, 15
    state = torch.load(ckpt, weights_only=True)["callbacks"][factory().state_key]
    assert state == {"resets": 1, "last_reset_step": 3, "pending": False}
