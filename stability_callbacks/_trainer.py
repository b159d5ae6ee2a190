"""Helpers every callback shares: parameters, loggers, cadence, flushing, forward order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from weakref import WeakKeyDictionary

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "StabilityCallback",
    "flush_loggers",
    "forward_order",
    "is_logging_step",
    "log_scalars",
    "optimizer_grads",
    "optimizer_params",
    "tensorboard_writer",
]


# optimizer -> (the (id, length) of each param group's list, its parameters once each)
_OPTIMIZER_PARAMS: WeakKeyDictionary[Optimizer, tuple[tuple[tuple[int, int], ...], list[Tensor]]] = (
    WeakKeyDictionary()
)


def optimizer_params(optimizer: Optimizer) -> list[Tensor]:
    """Every parameter the optimizer updates, once each, in param-group order (a new list).

    Remembered per optimizer as long as each param group keeps the same list of parameters at the same
    length, so per-step callers do not deduplicate thousands of parameters every step;
    ``add_param_group`` or a group given a new list is seen at the next call.
    """
    groups = optimizer.param_groups
    signature = tuple((id(group["params"]), len(group["params"])) for group in groups)
    seen = _OPTIMIZER_PARAMS.get(optimizer)
    if seen is None or seen[0] != signature:
        params = list({id(p): p for group in groups for p in group["params"]}.values())
        seen = _OPTIMIZER_PARAMS[optimizer] = (signature, params)
    return list(seen[1])


def optimizer_grads(optimizer: Optimizer) -> tuple[list[Tensor], list[Tensor]]:
    """The optimizer's parameters that have a gradient and those gradients, in the same order."""
    params = optimizer_params(optimizer)
    grads = [g for p in params if (g := p.grad) is not None]
    if len(grads) < len(params):
        params = [p for p in params if p.grad is not None]
    return params, grads


def tensorboard_writer(trainer: pl.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoardLogger, on global rank zero; else ``None``."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def is_logging_step(trainer: pl.Trainer, every_n_steps: int) -> bool:
    """Whether the optimizer step about to happen is a logging step.

    Uses Lightning's own convention (steps ``n-1, 2n-1, ...``, counted from 0), so a callback that
    logs every ``trainer.log_every_n_steps`` steps writes on the same steps as the LightningModule.
    """
    return (trainer.global_step + 1) % every_n_steps == 0


def log_scalars(
    trainer: pl.Trainer, metrics: Mapping[str, Tensor | float], step: int | None = None
) -> dict[str, float]:
    """Write scalars to every logger of the trainer with one host transfer; returns them as floats.

    Like Lightning's ``LearningRateMonitor``, this calls each logger's ``log_metrics`` directly rather
    than ``LightningModule.log``: it is about four times cheaper per key (hundreds of per-layer keys
    stay cheap), follows the callback's own cadence, and never re-emits a stale value on a later step
    (``self.log`` values logged on one step are written again at Lightning's next logging step).

    Args:
        trainer: the trainer whose loggers receive the values (global rank zero writes).
        metrics: key to number or 0-d tensor.
        step: the step to log at; ``trainer.global_step`` by default.
    """
    out = dict(zip(metrics, _to_floats(list(metrics.values())), strict=True))
    if out and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(out, step=trainer.global_step if step is None else step)
    return out


def _to_floats(values: list[Tensor | float]) -> list[float]:
    """Python floats of a mix of numbers and 0-d tensors, with one device-to-host copy."""
    tensors = [v for v in values if isinstance(v, Tensor)]
    if not tensors:
        return [float(v) for v in values]
    host = torch.stack(
        [t.detach().reshape(()).to(tensors[0].device, torch.float32) for t in tensors]
    ).tolist()
    it = iter(host)
    return [next(it) if isinstance(v, Tensor) else float(v) for v in values]


def flush_loggers(trainer: pl.Trainer) -> None:
    """Write buffered events and rows to disk (TensorBoard and CSV loggers), on rank zero."""
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.flush()
        elif isinstance(logger, CSVLogger):
            logger.save()


class StabilityCallback(Callback):
    """Base of the library's callbacks: flushes the loggers on checkpoint save, on exception and at teardown,
    so nothing a callback logged is lost when a run stops.

    Callbacks that rescale or zero gradients set ``modifies_gradients = True``; measuring callbacks
    (``GradientMonitor``) place themselves before those so they see the gradients before any clipping.
    """

    modifies_gradients: bool = False

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        flush_loggers(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        flush_loggers(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        flush_loggers(trainer)


@contextmanager
def forward_order(module: nn.Module) -> Iterator[list[str]]:
    """Record the order in which the modules that own parameters run in a forward pass.

    Usage::

        with forward_order(model) as order:
            model(batch)
        # order == ["embed", "layers.0", ..., "head"]

    Each module is listed once, at its first call. The hooks are removed on exit.
    """
    order: list[str] = []
    seen: set[str] = set()
    handles = []

    def make_hook(name: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)

        return hook

    for name, mod in module.named_modules():
        if any(True for _ in mod.parameters(recurse=False)):
            handles.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        yield order
    finally:
        for h in handles:
            h.remove()
