"""The LightningModule base every recipe's model shares (loss, metric, optimizer, warm-up schedule) and the
activations the models choose from by name."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

__all__ = ["OPTIMIZERS", "RecipeModule", "activation_module"]

OPTIMIZERS = ("sgd", "adam", "rmsprop", "adagrad")

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "elu": nn.ELU,
    "silu": nn.SiLU,
}


def activation_module(name: str) -> nn.Module:
    """A fresh activation module: sigmoid, tanh, relu, leaky_relu (slope 0.2), elu or silu (swish)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class RecipeModule(pl.LightningModule):
    """Base of the recipes' LightningModules: a task (classification or regression), the optimizer and
    an optional linear warm-up followed by a cosine decay.

    Logs ``train_loss`` every step and ``val_loss`` plus ``val_acc`` (classification) or ``val_mse``
    (regression) every validation.

    Args:
        task: ``"classification"`` (cross-entropy, accuracy) or ``"regression"`` (mean squared error).
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"``, ``"rmsprop"`` or ``"adagrad"``.
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty (the optimizer's ``weight_decay``).
        warmup_steps: linear warm-up from 0 over this many steps.
        cosine: cosine decay of the learning rate to 0 at the end of training (after the warm-up);
            with neither, the learning rate is constant.
    """

    def __init__(
        self,
        task: str = "classification",
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"`task` must be 'classification' or 'regression', got {task!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay!r}")
        if warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be >= 0, got {warmup_steps!r}")
        self.task = task
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.cosine = cosine

    @property
    def val_metric_name(self) -> str:
        return "val_acc" if self.task == "classification" else "val_mse"

    def _loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.task == "classification":
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self._loss(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        loss = self._loss(out.float(), y)
        self.log("val_loss", loss, prog_bar=False)
        if self.task == "classification":
            acc = (out.argmax(-1) == y).float().mean()
            self.log("val_acc", acc, prog_bar=True)
        else:
            self.log("val_mse", loss, prog_bar=True)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        wd = self.weight_decay
        opt: torch.optim.Optimizer
        if self.optimizer_name == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=wd)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=wd)
        elif self.optimizer_name == "rmsprop":
            opt = torch.optim.RMSprop(params, lr=self.lr, weight_decay=wd)
        else:
            opt = torch.optim.Adagrad(params, lr=self.lr, weight_decay=wd)
        if not self.warmup_steps and not self.cosine:
            return opt
        warmup = self.warmup_steps
        total = max(int(self.trainer.estimated_stepping_batches), warmup + 1)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not self.cosine:
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
