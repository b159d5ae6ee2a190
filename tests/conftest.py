"""Shared test fixtures: tiny models, a data loader, and a host-sync counter."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class MLPModule(pl.LightningModule):
    """A small classifier: ``depth`` Linear layers of ``width`` with an activation between them."""

    def __init__(
        self,
        depth: int = 3,
        width: int = 16,
        in_features: int = 8,
        classes: int = 3,
        activation: type[nn.Module] = nn.Tanh,
        lr: float = 0.1,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        features = in_features
        for _ in range(depth - 1):
            layers += [nn.Linear(features, width), activation()]
            features = width
        layers.append(nn.Linear(features, classes))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_loader(
    n: int = 64, in_features: int = 8, classes: int = 3, batch_size: int = 16, seed: int = 0
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_trainer(tmp_path: Any, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer writing under ``tmp_path``."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        logger=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class SyncCounter:
    """Counts calls that copy a tensor's value to the host (``item``, ``tolist``, ``__float__``,
    ``__int__``, ``__bool__``) while active."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.active = False


@contextmanager
def count_host_syncs() -> Iterator[SyncCounter]:
    """Patch ``torch.Tensor``'s host-copy methods to count their calls inside the ``with`` block."""
    counter = SyncCounter()
    names = ["item", "tolist", "__float__", "__int__", "__bool__"]
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def wrap(name: str) -> Any:
        original = originals[name]

        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter.active:
                counter.calls.append(name)
            return original(self, *args, **kwargs)

        return counted

    for name in names:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextmanager
def host_syncs_per_step(callback: Any) -> Iterator[list[list[str]]]:
    """Record, for each call of ``callback.on_before_optimizer_step`` inside the ``with`` block, the
    host copies it made (a list of method names per optimizer step)."""
    per_step: list[list[str]] = []
    original = callback.on_before_optimizer_step
    with count_host_syncs() as counter:

        def counted(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            counter.calls, counter.active = [], True
            try:
                original(trainer, pl_module, optimizer)
            finally:
                counter.active = False
                per_step.append(list(counter.calls))

        callback.on_before_optimizer_step = counted
        try:
            yield per_step
        finally:
            callback.on_before_optimizer_step = original


@pytest.fixture
def mlp() -> MLPModule:
    torch.manual_seed(0)
    return MLPModule()
