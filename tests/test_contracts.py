"""One contract suite over every callback the package exports (discovered from ``__all__``).

Each callback, default-constructed, must survive the situations a real run meets: pickling, fitting
twice, every logger, checkpoints (with ``weights_only=True``), resuming from a checkpoint written
without it, gradient accumulation, frozen and unused parameters, ``training_step`` returning None,
sparse gradients, mixed precision with a real GradScaler, and layers frozen or unfrozen mid-fit.
"""

from __future__ import annotations

import inspect
import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MLPModule, make_loader, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import Tensor, nn

import stability_callbacks

CALLBACKS = sorted(
    name
    for name in stability_callbacks.__all__
    if inspect.isclass(obj := getattr(stability_callbacks, name)) and issubclass(obj, Callback)
)


def make(name: str) -> Callback:
    cls = getattr(stability_callbacks, name)
    return cls()


@pytest.fixture(params=CALLBACKS)
def cb_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fit(tmp_path: Path, callback: Callback, model: pl.LightningModule | None = None, **kw: Any) -> pl.Trainer:
    trainer_kw: dict[str, Any] = dict(max_steps=4, max_epochs=None, log_every_n_steps=1, callbacks=[callback])
    trainer_kw.update(kw)
    trainer = make_trainer(tmp_path, **trainer_kw)
    trainer.fit(model or MLPModule(), make_loader())
    return trainer


def finite_weights(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def test_every_exported_callback_is_covered() -> None:
    assert "GradientMonitor" in CALLBACKS
    for name in CALLBACKS:
        doc = getattr(stability_callbacks, name).__doc__ or ""
        assert "Args:" in doc, f"{name} documents no arguments"


def test_pickle_and_fit_twice(tmp_path: Path, cb_name: str) -> None:
    callback = pickle.loads(pickle.dumps(make(cb_name)))
    model = MLPModule()
    fit(tmp_path, callback, model)
    fit(tmp_path, callback, model, max_steps=8)
    assert finite_weights(model)
    pickle.dumps(callback)  # still picklable after a fit (ddp_spawn pickles callbacks)


def test_fast_dev_run(tmp_path: Path, cb_name: str) -> None:
    trainer = make_trainer(tmp_path, fast_dev_run=True, callbacks=[make(cb_name)])
    trainer.fit(MLPModule(), make_loader())
    assert trainer.global_step == 1


@pytest.mark.parametrize("logger_kind", ["none", "csv", "tensorboard"])
def test_loggers(tmp_path: Path, cb_name: str, logger_kind: str) -> None:
    logger: Any = {"none": False, "csv": CSVLogger(tmp_path), "tensorboard": TensorBoardLogger(tmp_path)}[
        logger_kind
    ]
    trainer = fit(tmp_path, make(cb_name), logger=logger)
    assert trainer.global_step == 4


def test_state_round_trip_through_weights_only_checkpoint(tmp_path: Path, cb_name: str) -> None:
    callback = make(cb_name)
    trainer = fit(tmp_path, callback)
    path = tmp_path / "c.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    restored = make(cb_name)
    restored.load_state_dict(checkpoint["callbacks"].get(callback.state_key, {}))
    assert_same_state(restored.state_dict(), callback.state_dict())


def assert_same_state(a: Any, b: Any) -> None:
    """Recursive equality of state dicts: tensors by value (and dtype), everything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or bool(torch.all((a == b) | (a.isnan() & b.isnan())))
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN equals NaN here


def test_resume_from_checkpoint_written_without_the_callback(tmp_path: Path, cb_name: str) -> None:
    trainer = make_trainer(tmp_path, max_epochs=1)
    model = MLPModule()
    trainer.fit(model, make_loader())
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    resumed = make_trainer(tmp_path, max_epochs=2, callbacks=[make(cb_name)])
    resumed.fit(MLPModule(), make_loader(), ckpt_path=path)
    assert resumed.current_epoch == 2


def test_gradient_accumulation(tmp_path: Path, cb_name: str) -> None:
    trainer = fit(tmp_path, make(cb_name), accumulate_grad_batches=3, max_steps=2)
    assert trainer.global_step == 2


class Awkward(MLPModule):
    """Frozen first layer, an unused layer, a sparse embedding and a step that returns None."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)
        self.unused = nn.Linear(3, 3)
        self.emb = nn.Embedding(10, 3, sparse=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if batch_idx == 1:
            return None
        x, y = batch
        idx = (x[:, 0].abs() * 3).long().clamp_max(9)
        return nn.functional.cross_entropy(self(x) + self.emb(idx), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


def test_frozen_unused_sparse_and_none_steps(tmp_path: Path, cb_name: str) -> None:
    model = Awkward()
    with warnings.catch_warnings(record=True) as caught:  # a step without a loss may be worth one warning
        warnings.simplefilter("always")
        fit(tmp_path, make(cb_name), model)
    assert finite_weights(model)
    ours = [str(w.message) for w in caught if str(w.message).startswith(cb_name)]
    assert len(ours) <= 1, ours


class NoTrainable(MLPModule):
    """Every parameter frozen: there is nothing to measure, clip or initialise."""

    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y).requires_grad_()


def test_model_with_no_trainable_parameters_warns_at_most_once(tmp_path: Path, cb_name: str) -> None:
    model = NoTrainable()
    before = [p.clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, make(cb_name), model, max_steps=6)
    ours = [w for w in caught if str(w.message).startswith(cb_name)]
    assert len(ours) <= 1, [str(w.message) for w in ours]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(tmp_path: Path, cb_name: str, precision: str) -> None:
    kw: dict[str, Any] = {"precision": precision}
    if precision == "16-mixed":  # a real GradScaler on CPU
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    model = MLPModule()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(tmp_path, make(cb_name), model, **kw)
    assert finite_weights(model)


class Unfreezer(Callback):
    """Freezes the first layer for two steps, then unfreezes it (fine-tuning style)."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        pl_module.net[0].requires_grad_(trainer.global_step not in (1, 2))


def test_freezing_and_unfreezing_mid_fit(tmp_path: Path, cb_name: str) -> None:
    model = MLPModule()
    fit(tmp_path, make(cb_name), model, callbacks=[make(cb_name), Unfreezer()], max_steps=5)
    assert finite_weights(model)


def test_optimizer_params_once_each_in_group_order_and_follows_new_groups() -> None:
    from stability_callbacks._trainer import optimizer_params

    a, b, c, d = (nn.Parameter(torch.zeros(2)) for _ in range(4))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [c]}], lr=0.1)
    first = optimizer_params(opt)
    assert [id(p) for p in first] == [id(a), id(b), id(c)]
    first.append(d)  # callers get their own list
    assert [id(p) for p in optimizer_params(opt)] == [id(a), id(b), id(c)]
    opt.param_groups[1]["params"].append(a)  # a group's list grew; `a` still counts once
    assert [id(p) for p in optimizer_params(opt)] == [id(a), id(b), id(c)]
    opt.add_param_group({"params": [d]})
    assert [id(p) for p in optimizer_params(opt)] == [id(a), id(b), id(c), id(d)]
    opt.param_groups[0]["params"] = [b]  # a group given a new list
    assert [id(p) for p in optimizer_params(opt)] == [id(b), id(c), id(a), id(d)]
