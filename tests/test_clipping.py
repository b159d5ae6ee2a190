"""Clipping: hand-computed cases, policies against naive references, setup errors, logging, host syncs,
resume equality and an exploding RNN kept finite."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, host_syncs_per_step, make_loader, make_trainer
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stability_callbacks.clipping import (
    AGC,
    AutoClip,
    NormClip,
    PercentilePolicy,
    UnitwisePlan,
    ValueClip,
    ZClip,
    ZScorePolicy,
    check_clipping_setup,
    clip_grad_norm_to,
    clip_grad_value_,
    total_norm,
    unitwise_norms,
)

# ---------------------------------------------------------------------------------------------------
# Layer 1, by hand
# ---------------------------------------------------------------------------------------------------


def test_clip_grad_norm_to_by_hand() -> None:
    grads = [torch.tensor([3.0]), torch.tensor([[4.0]])]  # total norm 5
    d = clip_grad_norm_to(grads, torch.tensor(1.0))
    coef = 1.0 / (5.0 + 1e-6)
    assert d.norm_pre.item() == pytest.approx(5.0)
    assert d.coef.item() == pytest.approx(coef, rel=1e-6)
    assert grads[0].item() == pytest.approx(3.0 * coef, rel=1e-6)
    assert grads[1].item() == pytest.approx(4.0 * coef, rel=1e-6)
    assert d.norm_post.item() == pytest.approx(1.0, rel=1e-5)
    assert d.clipped.item() == 1.0 and d.threshold.item() == 1.0

    grads = [torch.tensor([3.0]), torch.tensor([4.0])]
    d = clip_grad_norm_to(grads, 10.0)
    assert d.clipped.item() == 0.0 and d.coef.item() == 1.0
    assert grads[0].item() == 3.0 and grads[1].item() == 4.0


def test_clip_grad_norm_to_leaves_non_finite_steps_alone() -> None:
    grads = [torch.tensor([3.0, float("nan")]), torch.tensor([4.0])]
    d = clip_grad_norm_to(grads, 1.0)
    assert not d.finite.item() and d.coef.item() == 1.0 and d.clipped.item() == 0.0
    assert grads[0][0].item() == 3.0 and grads[1].item() == 4.0


def test_clip_grad_value_by_hand() -> None:
    grads = [torch.tensor([-3.0, 0.5, 2.0]), torch.tensor([[1.5]])]
    clip_grad_value_(grads, 1.0)
    assert grads[0].tolist() == [-1.0, 0.5, 1.0] and grads[1].item() == 1.0


def test_total_norm_matches_float64_reference_and_handles_sparse() -> None:
    torch.manual_seed(0)
    grads = [
        torch.randn(5, 3),
        torch.randn(7),
        torch.randn(2, 2, 2).double(),
        torch.randn(9).bfloat16(),
        torch.zeros(0, 4),
    ]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten().double() for g in grads]))
    assert total_norm(grads).item() == pytest.approx(expected.item(), rel=1e-6)
    with_nan = [torch.ones(3), torch.tensor([1.0, float("nan")])]
    assert math.isnan(total_norm(with_nan).item())
    assert total_norm([torch.ones(3), torch.tensor([float("inf")])]).item() == math.inf
    sparse = torch.sparse_coo_tensor([[0, 0, 2]], [3.0, 1.0, 0.0], (4,))  # duplicate index: 3 + 1
    assert total_norm([sparse, torch.tensor([3.0])]).item() == pytest.approx(5.0)


def _naive_norm(grads: list[Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([g.to_dense().flatten().double() for g in grads])))


def test_total_norm_of_many_small_tensors_of_mixed_dtypes() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(7) for _ in range(5)] + [torch.randn(3, 3).half() for _ in range(3)]
    grads += [torch.randn(5000), torch.randn(3), torch.randn(2, 2).double()]
    assert total_norm(grads).item() == pytest.approx(_naive_norm(grads), rel=1e-6)
    huge = [torch.full((7,), 1e30) for _ in range(3)]  # squares overflow float32
    assert total_norm(huge).item() == pytest.approx(math.sqrt(21) * 1e30, rel=1e-6)
    tiny = [torch.full((7,), 1e-25) for _ in range(3)]  # squares underflow float32
    assert total_norm(tiny).item() == pytest.approx(math.sqrt(21) * 1e-25, rel=1e-6)
    with_nan = [torch.ones(7), torch.ones(7), torch.tensor([float("nan")] * 7)]
    assert math.isnan(total_norm(with_nan).item())


def test_unitwise_norms_by_hand() -> None:
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    conv = torch.zeros(2, 1, 2, 2)
    conv[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # unit norm 2
    bias = torch.tensor([6.0, 8.0])  # one unit: norm 10
    big = torch.ones(70000, 4)  # reduced in place, not flattened
    out = unitwise_norms([w, conv, bias, big])
    assert out[0].tolist() == [5.0, 1.0]
    assert out[1].tolist() == [2.0, 0.0]
    assert out[2].shape == () and out[2].item() == 10.0
    assert out[3].shape == (70000,) and torch.all(out[3] == 2.0)


# ---------------------------------------------------------------------------------------------------
# Percentile policy (AutoClip)
# ---------------------------------------------------------------------------------------------------


def test_percentile_policy_by_hand() -> None:
    policy = PercentilePolicy(percentile=50.0, history=3, include_current=False)
    thresholds = [policy.step(torch.tensor(x)).item() for x in (1.0, 2.0, 3.0, 4.0, 5.0)]
    # history before each step: [], [1], [1,2], [1,2,3], [2,3,4]
    assert thresholds == [math.inf, 1.0, 1.5, 2.0, 3.0]
    current = PercentilePolicy(percentile=50.0, history=3, include_current=True)
    assert [current.step(torch.tensor(x)).item() for x in (1.0, 3.0, 8.0)] == [1.0, 2.0, 3.0]


def test_percentile_policy_ignores_non_finite_norms() -> None:
    policy = PercentilePolicy(percentile=100.0, history=4, include_current=True)
    policy.step(torch.tensor(2.0))
    for bad in (float("nan"), float("inf")):
        assert policy.step(torch.tensor(bad)).item() == 2.0
    assert policy.state_dict()["count"] == 1
    assert policy.step(torch.tensor(1.0)).item() == 2.0


@pytest.mark.parametrize("include_current", [True, False])
def test_percentile_policy_equals_torch_quantile_over_a_naive_window(include_current: bool) -> None:
    g = torch.Generator().manual_seed(1)
    norms = (torch.rand(60, generator=g) * 10).tolist()
    policy = PercentilePolicy(percentile=37.0, history=7, include_current=include_current)
    window: list[float] = []
    for x in norms:
        if include_current:
            window = [*window, x][-7:]
        expected = torch.quantile(torch.tensor(window), 0.37).item() if window else math.inf
        assert policy.step(torch.tensor(x)).item() == expected
        if not include_current:
            window = [*window, x][-7:]


def test_percentile_policy_state_round_trip_and_resize() -> None:
    policy = PercentilePolicy(percentile=50.0, history=4)
    for x in (5.0, 1.0, 2.0, 8.0, 3.0, 4.0):
        policy.step(torch.tensor(x))
    copy = PercentilePolicy(percentile=50.0, history=4)
    copy.load_state_dict(policy.state_dict())
    assert copy.step(torch.tensor(6.0)).item() == policy.step(torch.tensor(6.0)).item()
    smaller = PercentilePolicy(percentile=100.0, history=2)
    smaller.load_state_dict(policy.state_dict())  # keeps the most recent entries: 4, 6
    assert smaller.state_dict()["count"] == 2
    assert smaller.step(torch.tensor(0.0)).item() == 6.0  # 0 replaced the oldest entry, 4
    assert smaller.state_dict()["buffer"] == [0.0, 6.0]


# ---------------------------------------------------------------------------------------------------
# Z-score policy (ZClip), by hand
# ---------------------------------------------------------------------------------------------------


def test_zscore_policy_by_hand() -> None:
    policy = ZScorePolicy(alpha=0.5, z_thresh=2.0, warmup_steps=2, eps=0.0)
    for x in (1.0, 3.0):  # warm-up: mean 2, var 1, nothing clipped
        assert policy.step(torch.tensor(x)).coef.item() == 1.0
    d = policy.step(torch.tensor(10.0))  # z = 8 > 2: eta = 4, value = 2 + 2 * 1 / 4 = 2.5
    assert d.clipped.item() == 1.0
    assert d.coef.item() == pytest.approx(2.5 / (10.0 + 1e-6), rel=1e-6)
    assert d.threshold.item() == pytest.approx(4.0)  # mean + z_thresh * std
    # EMA updated with the clip value 2.5: mean = 2.25, var = 0.5 * 1 + 0.5 * 0.25^2
    assert policy.mean is not None and policy.var is not None
    assert policy.mean.item() == pytest.approx(2.25) and policy.var.item() == pytest.approx(0.53125)
    d = policy.step(torch.tensor(2.0))
    assert d.clipped.item() == 0.0 and d.coef.item() == 1.0


HOST_PATH_CONFIGS: list[dict[str, Any]] = [
    {"warmup_steps": 4},
    {"warmup_steps": 4, "eps": 0.0},  # a constant warm-up: zero variance, z = +-inf or NaN
    {"warmup_steps": 4, "eps": 0.0, "clip_option": "mean"},
    {"warmup_steps": 4, "mode": "percentile", "z_thresh": 1.0},
    {"warmup_steps": 3, "max_grad_norm": 2.5, "skip_update_on_spike": True},
    {"warmup_steps": 6, "alpha": 0.8, "z_thresh": 1.5, "clip_factor": 0.5, "max_grad_norm": 9.0},
]


class ReferenceZScore:
    """The ZClip rule of :class:`ZScorePolicy`, written plainly in Python floats (float64) as an oracle."""

    def __init__(self, **config: Any) -> None:
        self.alpha = config.get("alpha", 0.97)
        self.z_thresh = config.get("z_thresh", 2.5)
        self.cap = config.get("max_grad_norm")
        self.warmup_steps = config.get("warmup_steps", 25)
        self.mode = config.get("mode", "zscore")
        self.clip_option = config.get("clip_option", "adaptive_scaling")
        self.clip_factor = config.get("clip_factor", 1.0)
        self.skip_update_on_spike = config.get("skip_update_on_spike", False)
        self.eps = config.get("eps", 1e-6)
        self.buffer: list[float] = []
        self.mean = self.var = 0.0

    def step(self, x: float) -> tuple[float, float, bool]:
        """(coefficient, threshold, clipped) of a step whose total norm is ``x``."""
        x = float(torch.tensor(x, dtype=torch.float32))
        finite, cap = math.isfinite(x), self.cap
        coef, clipped = 1.0, False
        if len(self.buffer) < self.warmup_steps:  # warm-up: only the cap clips
            threshold = math.inf if cap is None else cap
            if finite:
                self.buffer.append(x)
                if len(self.buffer) == self.warmup_steps:
                    self.mean = sum(self.buffer) / self.warmup_steps
                    self.var = sum((b - self.mean) ** 2 for b in self.buffer) / self.warmup_steps
                if cap is not None:
                    coef, clipped = min(cap / (x + 1e-6), 1.0), x > cap
            return coef, threshold, clipped
        std = math.sqrt(self.var)
        if self.mode == "percentile":
            level = self.mean + self.z_thresh * std
        else:
            level = self.mean + self.z_thresh * (std + self.eps)
        threshold = level if cap is None else min(level, cap)
        if not finite:
            return coef, threshold, clipped
        if self.mode == "percentile":
            spike, clip_value = x > level, level
        else:
            scale = std + self.eps
            z = (x - self.mean) / scale if scale > 0 else (x - self.mean) * math.inf
            spike, clip_value = z > self.z_thresh, self.mean
            if spike and self.clip_option == "adaptive_scaling":
                clip_value = (self.mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
        effective = clip_value if spike else x
        if cap is not None:
            effective = min(effective, cap)
        if x > effective:
            coef, clipped = effective / (x + 1e-6), True
        if not (spike and self.skip_update_on_spike):
            value = clip_value if spike else x
            new_mean = self.alpha * self.mean + (1 - self.alpha) * value
            self.var = self.alpha * self.var + (1 - self.alpha) * (value - new_mean) ** 2
            self.mean = new_mean
        return coef, threshold, clipped


@pytest.mark.parametrize("config", HOST_PATH_CONFIGS, ids=[str(i) for i in range(len(HOST_PATH_CONFIGS))])
def test_zscore_policy_matches_a_plain_python_reference(config: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(1)
    norms = [2.0, 2.0, float("nan"), 2.0, 2.0, 2.0, 3.0, 1.0, float("inf"), 0.0]
    norms += [*(torch.rand(40, generator=g) * 3).exp().tolist(), 50.0, 2.0, 400.0, float("nan"), 3.0]
    policy, reference = ZScorePolicy(**config), ReferenceZScore(**config)
    clipped = 0
    for x in norms:
        d = policy.step(torch.tensor(x))
        coef, threshold, was_clipped = reference.step(x)
        assert d.coef.item() == pytest.approx(coef, rel=1e-6)
        assert d.threshold.item() == pytest.approx(threshold, rel=1e-6)
        assert bool(d.clipped.item()) == was_clipped
        assert bool(d.finite.item()) == math.isfinite(x)
        if len(reference.buffer) == reference.warmup_steps:
            state = policy.state_dict()
            assert state["mean"] == pytest.approx(reference.mean, rel=1e-12)
            assert state["var"] == pytest.approx(reference.var, rel=1e-12, abs=1e-300)
        clipped += int(d.clipped.item())
    assert clipped >= 3


def test_zscore_policy_non_finite_norm_never_enters_the_statistics() -> None:
    policy = ZScorePolicy(warmup_steps=2)
    for x in (1.0, float("nan"), 3.0, float("inf"), 2.0):
        d = policy.step(torch.tensor(x))
        if not math.isfinite(x):
            assert d.coef.item() == 1.0 and not d.finite.item()
    state = policy.state_dict()
    assert state["count"] == 2 and all(math.isfinite(v) for v in (state["mean"], state["var"]))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"percentile": -1.0}, "percentile"),
        ({"percentile": 101}, "percentile"),
        ({"history": 0}, "history"),
        ({"history": 2.5}, "history"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ],
)
def test_autoclip_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AutoClip(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.0}, "alpha"),
        ({"z_thresh": 0}, "z_thresh"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"warmup_steps": 0}, "warmup_steps"),
        ({"mode": "median"}, "mode"),
        ({"clip_option": "max"}, "clip_option"),
        ({"clip_factor": 0.0}, "clip_factor"),
    ],
)
def test_zclip_validation(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ZClip(**kwargs)


@pytest.mark.parametrize(
    ("factory", "name"),
    [
        (lambda: AGC(clip_factor=0.0), "clip_factor"),
        (lambda: AGC(eps=-1.0), "eps"),
        (lambda: AGC(exclude="head.*"), "exclude"),
        (lambda: NormClip(max_norm=0.0), "max_norm"),
        (lambda: ValueClip(max_value=-2.0), "max_value"),
    ],
)
def test_other_validation(factory: Any, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        factory()


# ---------------------------------------------------------------------------------------------------
# Setup errors
# ---------------------------------------------------------------------------------------------------

ALL = [AutoClip, ZClip, AGC, NormClip, ValueClip]


@pytest.mark.parametrize("cls", ALL)
def test_error_with_trainer_gradient_clip_val(tmp_path: Path, cls: type[Callback]) -> None:
    trainer = make_trainer(tmp_path, max_steps=1, gradient_clip_val=1.0, callbacks=[cls()])
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        trainer.fit(MLPModule(), make_loader())


class Manual(MLPModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        opt.zero_grad()  # type: ignore[union-attr]
        return loss


class ManualClipped(Manual):
    """The manual-optimization recipe of the clipping module's docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = PercentilePolicy(percentile=10.0)
        self.seen: list[tuple[float, float, float, float]] = []  # torch's norm, ours, threshold, after

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        reference = float(torch.nn.utils.get_total_norm(grads))  # type: ignore[arg-type]
        norm = total_norm(grads)
        decision = clip_grad_norm_to(grads, self.policy.step(norm), total=norm)  # type: ignore[arg-type]
        after = float(torch.nn.utils.get_total_norm(grads))  # type: ignore[arg-type]
        self.seen.append((reference, norm.item(), decision.threshold.item(), after))
        opt.step()  # type: ignore[union-attr]
        opt.zero_grad()  # type: ignore[union-attr]
        return loss


def test_layer_one_under_manual_optimization(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ManualClipped()
    make_trainer(tmp_path, max_steps=6).fit(module, make_loader())
    assert len(module.seen) >= 4
    for reference, norm, threshold, after in module.seen:
        assert norm == pytest.approx(reference, rel=1e-5)
        assert after == pytest.approx(min(norm, threshold), rel=1e-4)
    assert (
        sum(after < norm * (1 - 1e-3) for _, norm, _, after in module.seen) >= 3
    )  # the 10th percentile clips


def test_error_under_manual_optimization(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[ZClip()])
    with pytest.raises(MisconfigurationException, match="manual_backward"):
        trainer.fit(Manual(), make_loader())


class FusedAdam(MLPModule):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def test_error_with_fused_optimizer_under_16_mixed(tmp_path: Path) -> None:
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    trainer = make_trainer(tmp_path, max_steps=1, plugins=[plugin], callbacks=[AutoClip()])
    with pytest.raises(MisconfigurationException, match="fused"):
        trainer.fit(FusedAdam(), make_loader())


def test_error_under_sharded_strategy() -> None:
    class FakeTrainer:
        gradient_clip_val = None
        strategy = FSDPStrategy()

    with pytest.raises(MisconfigurationException, match="FSDPStrategy"):
        check_clipping_setup(FakeTrainer(), "ZClip")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Logging and host syncs
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_logs_the_five_keys_on_logging_steps_and_never_syncs_otherwise(tmp_path: Path, cls: type) -> None:
    callback = cls(log_every_n_steps=3)
    with host_syncs_per_step(callback) as calls_per_step:
        trainer = make_trainer(
            tmp_path,
            max_steps=7,
            max_epochs=None,
            log_every_n_steps=50,
            logger=CSVLogger(tmp_path),
            callbacks=[callback],
        )
        trainer.fit(MLPModule(), make_loader())
    assert len(calls_per_step) == 7
    for step, calls in enumerate(calls_per_step):
        if (step + 1) % 3 == 0:
            assert calls == ["tolist"], (step, calls)  # one transfer for all values
        else:
            assert calls == [], (step, calls)
    path = Path(trainer.logger.log_dir) / "metrics.csv"  # type: ignore[union-attr]
    rows = list(csv.DictReader(path.open()))
    keys = {"clip/norm_pre", "clip/norm_post", "clip/threshold", "clip/coef", "clip/clipped"}
    logged = [r for r in rows if r.get("clip/norm_pre")]
    assert keys <= set(rows[0]) and [int(r["step"]) for r in logged] == [2, 5]


# ---------------------------------------------------------------------------------------------------
# Resume equality
# ---------------------------------------------------------------------------------------------------


def _fit_weights(tmp_path: Path, callback: Callback, epochs: int, ckpt: Path | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    model = MLPModule(lr=0.5)
    trainer = make_trainer(tmp_path, max_epochs=epochs, callbacks=[callback])
    trainer.fit(model, make_loader(n=96), ckpt_path=ckpt)
    return trainer


def _weights(trainer: pl.Trainer) -> list[Tensor]:
    return [p.detach().clone() for p in trainer.lightning_module.parameters()]


@pytest.mark.parametrize(
    ("factory", "stateful"),
    [
        (lambda: AutoClip(percentile=30.0, history=4), True),
        (lambda: ZClip(warmup_steps=3, z_thresh=0.5), True),
        (lambda: AGC(clip_factor=0.02), False),
    ],
    ids=["AutoClip", "ZClip", "AGC"],
)
def test_resume_equals_uninterrupted_run(tmp_path: Path, factory: Any, stateful: bool) -> None:
    full = _fit_weights(tmp_path / "full", factory(), epochs=3)
    first = _fit_weights(tmp_path / "first", factory(), epochs=1)
    ckpt = tmp_path / "epoch1.ckpt"
    first.save_checkpoint(ckpt)
    resumed_cb = factory()
    resumed = _fit_weights(tmp_path / "resumed", resumed_cb, epochs=3, ckpt=ckpt)
    assert all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(resumed), strict=True))
    assert resumed_cb.state_dict() == full.callbacks[0].state_dict()  # type: ignore[attr-defined]
    assert full.callbacks[0].state_dict()["clipped"] > 0  # type: ignore[attr-defined]
    if not stateful:
        return
    # Control: the same resume with the callback's state dropped ends elsewhere.
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["callbacks"] = {}
    torch.save(checkpoint, tmp_path / "stateless.ckpt")
    fresh = _fit_weights(tmp_path / "fresh", factory(), epochs=3, ckpt=tmp_path / "stateless.ckpt")
    assert not all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(fresh), strict=True))


# ---------------------------------------------------------------------------------------------------
# AGC: which layer is left out
# ---------------------------------------------------------------------------------------------------


class HeadFirst(pl.LightningModule):
    """The classifier is declared first but runs last: exclusion must follow forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 3)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y) * 100.0  # large gradients: AGC clips

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


class GradSpy(Callback):
    """Copies the gradients it sees at the first optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[str, Tensor] = {}

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not self.grads:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}  # type: ignore[union-attr]


@pytest.mark.parametrize(("exclude", "head_clipped"), [(None, False), ([], True), (["body.*"], True)])
def test_agc_exclusion(tmp_path: Path, exclude: list[str] | None, head_clipped: bool) -> None:
    before, after = GradSpy(), GradSpy()
    agc = AGC(clip_factor=0.01, exclude=exclude)
    trainer = make_trainer(tmp_path, max_steps=1, max_epochs=None, callbacks=[before, agc, after])
    torch.manual_seed(0)
    trainer.fit(HeadFirst(), make_loader())
    if exclude is None:
        assert agc.excluded_names == ["head.weight", "head.bias"]
    body_clipped = exclude != ["body.*"]
    assert (not torch.equal(before.grads["head.weight"], after.grads["head.weight"])) == head_clipped
    assert (not torch.equal(before.grads["body.0.weight"], after.grads["body.0.weight"])) == body_clipped


# ---------------------------------------------------------------------------------------------------
# An exploding vanilla RNN
# ---------------------------------------------------------------------------------------------------


class ExplodingRNN(pl.LightningModule):
    """tanh RNN with an orthogonal recurrent matrix of gain 1.5 and SGD at lr 0.5: gradients explode."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(4, 32, nonlinearity="tanh", batch_first=True)
        with torch.no_grad():
            nn.init.orthogonal_(self.rnn.weight_hh_l0, gain=1.5)
        self.head = nn.Linear(32, 1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out, _ = self.rnn(x)
        return nn.functional.mse_loss(self.head(out[:, -1]).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _sum_task() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 40, 4, generator=g)
    return DataLoader(TensorDataset(x, x[:, :, 0].sum(1) / 6), batch_size=16)


@pytest.mark.parametrize(
    "factory", [None, AutoClip, lambda: ZClip(warmup_steps=5)], ids=["none", "AutoClip", "ZClip"]
)
def test_exploding_rnn_is_kept_finite_by_adaptive_clipping(tmp_path: Path, factory: Any) -> None:
    model = ExplodingRNN()
    callbacks = [] if factory is None else [factory()]
    make_trainer(tmp_path, max_epochs=5, callbacks=callbacks).fit(model, _sum_task())
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    assert finite == (factory is not None)


def test_huge_finite_gradients_are_clipped_not_skipped_on_cpu() -> None:
    # 1e20 overflows a float32 sum of squares; on the CPU the overflowed tensor is redone in float64.
    grads = [torch.full((1000,), 1e20), torch.ones(3)]
    expected = math.sqrt(1000 * 1e40 + 3)
    assert total_norm(grads).item() == pytest.approx(expected, rel=1e-6)
    decision = clip_grad_norm_to(grads, 1.0)
    assert bool(decision.finite) and decision.norm_pre.item() == pytest.approx(expected, rel=1e-6)
    assert total_norm(grads).item() == pytest.approx(1.0, rel=1e-5)
    assert grads[1][0].item() == pytest.approx(1.0 / expected, rel=1e-5)


@pytest.mark.parametrize("cls", ALL)
def test_counters_count_every_step_not_only_logging_steps(tmp_path: Path, cls: type) -> None:
    """``clipped_steps`` after a fit that never logs equals the sum of ``clip/clipped`` logged every step."""
    kwargs = {
        NormClip: {"max_norm": 0.5},
        ValueClip: {"max_value": 0.05},
        ZClip: {"warmup_steps": 3, "z_thresh": 0.1},
    }.get(cls, {})
    totals = []
    for every in (1, 100):
        torch.manual_seed(0)
        callback = cls(log_every_n_steps=every, **kwargs)
        trainer = make_trainer(
            tmp_path / str(every),
            max_steps=8,
            max_epochs=None,
            logger=CSVLogger(tmp_path / str(every)),
            callbacks=[callback],
        )
        trainer.fit(MLPModule(), make_loader())
        assert callback.steps == 8 and callback.skipped_steps.item() == 0
        totals.append(callback.clipped_steps.item())
        if every == 1:
            rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))  # type: ignore[union-attr]
            logged = sum(float(r["clip/clipped"]) for r in rows if r.get("clip/clipped"))
            assert totals[0] == pytest.approx(logged, rel=1e-6)
    assert totals[0] > 0  # the settings clip some steps
    assert totals[1] == pytest.approx(totals[0], rel=1e-6)


def test_unitwise_plan_scales_each_unit_of_each_tensor() -> None:
    torch.manual_seed(0)
    tensors = [torch.randn(3, 2), torch.randn(4), torch.randn(2, 5), torch.randn(70000, 2)]
    plan = UnitwisePlan(tensors)
    factors = torch.rand(plan.num_units) + 0.5
    expected = [t.clone() for t in tensors]
    offset = 0
    for j, i in enumerate(plan.order):  # plan order: the units of tensor i are consecutive
        rows, ndim = plan.rows[j], tensors[i].ndim
        f = factors[offset : offset + rows]
        expected[i] = expected[i] * (f.view(rows, *([1] * (ndim - 1))) if ndim > 1 else f)
        offset += rows
    plan.mul_(tensors, plan.scale_views(factors))
    for got, want in zip(tensors, expected, strict=True):
        torch.testing.assert_close(got, want)
