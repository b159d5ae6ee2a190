"""Helpers every callback shares: parameters, loggers, cadence, flushing, strategy checks, forward order."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks.forward_recorder import eager_compiled
from stability_callbacks.stats import user_name

__all__ = [
    "ForwardOrder",
    "StabilityCallback",
    "UnsupportedStrategyError",
    "check_one_clipper",
    "check_reads_before_modifiers",
    "flush_loggers",
    "forward_order",
    "is_logging_step",
    "log_every",
    "log_scalars",
    "optimizer_grads",
    "optimizer_params",
    "refuse_sharded",
    "tensorboard_writer",
]

DEFAULT_LOG_EVERY_N_STEPS = 50  # Lightning's own default
_SHARDED_STRATEGIES = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def optimizer_params(optimizer: Optimizer) -> list[Tensor]:
    """Every parameter the optimizer updates, once each, in param-group order (a new list)."""
    return list({id(p): p for group in optimizer.param_groups for p in group["params"]}.values())


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


def log_every(trainer: pl.Trainer, every_n_steps: int | None) -> int:
    """A callback's logging cadence: its own ``every_n_steps``, else the trainer's ``log_every_n_steps``
    (Lightning's default of 50 where the trainer has none)."""
    if every_n_steps:
        return every_n_steps
    return getattr(trainer, "log_every_n_steps", None) or DEFAULT_LOG_EVERY_N_STEPS


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


class UnsupportedStrategyError(MisconfigurationException, ValueError):
    """A callback cannot give exact results under the trainer's strategy (raised at setup)."""


def refuse_sharded(trainer: pl.Trainer, name: str, why: str, instead: str, dtensor_ok: bool = False) -> None:
    """Raise :class:`UnsupportedStrategyError` at setup when the trainer's strategy shards the model.

    Args:
        trainer: the trainer being set up.
        name: the callback's class name.
        why: what would go wrong under sharding.
        instead: what the user can do instead.
        dtensor_ok: the callback is exact on DTensor gradients, so ``ModelParallelStrategy`` (FSDP2 and
            tensor parallelism) is accepted; FSDP1 and DeepSpeed, whose gradients are plain tensors
            holding a flat shard, are still refused.
    """
    strategy = getattr(trainer, "strategy", None)
    if dtensor_ok and isinstance(strategy, ModelParallelStrategy):
        return
    if isinstance(strategy, _SHARDED_STRATEGIES):
        raise UnsupportedStrategyError(
            f"{name} does not support the sharded strategy {type(strategy).__name__}: {why}. {instead}"
        )


def check_reads_before_modifiers(trainer: pl.Trainer, callback: Callback) -> None:
    """Raise a clear error at setup when ``callback`` (which measures gradients) comes after a callback
    that changes them in ``trainer.callbacks``: Lightning calls ``on_before_optimizer_step`` in list order,
    so it would measure clipped or dropped gradients."""
    callbacks = list(getattr(trainer, "callbacks", []))
    if callback not in callbacks:
        return
    before = callbacks[: callbacks.index(callback)]
    modifiers = [type(c).__name__ for c in before if getattr(c, "modifies_gradients", False)]
    if modifiers:
        name = type(callback).__name__
        raise MisconfigurationException(
            f"{name} measures the gradients before any callback changes them, so it must come before "
            f"{', '.join(modifiers)} in `Trainer(callbacks=[...])`; move {name} to the front of the list."
        )


def check_one_clipper(trainer: pl.Trainer, callback: Callback) -> None:
    """Raise a clear error at setup when ``trainer.callbacks`` holds another callback that clips gradients.

    Two clippers (``ZClip`` and ``AutoClip``, ``NormClip`` and ``AGC``, ``StabilityAutopilot`` with its
    own clipper and ``ZClip``...) would both act on the same step, each on what the other left, and write
    the same ``clip/*`` keys at the same step. Callbacks with distinct roles and keys compose:
    ``NonFiniteGuard`` (``guard/*``) with one clipper (``clip/*``) is allowed. A callback that is not in
    ``trainer.callbacks`` (the clipper an autopilot drives) is not checked here; its owner is.
    """
    callbacks = list(getattr(trainer, "callbacks", []))
    if callback not in callbacks:
        return
    clippers = [c for c in callbacks if getattr(c, "clips_gradients", False)]
    if len(clippers) < 2:
        return
    names = [_clipper_name(c) for c in clippers]
    raise MisconfigurationException(
        f"{' and '.join(names)} both clip the gradients: each would act on what the other left, at the same "
        "step, and both write the `clip/*` keys. Keep one of them in `Trainer(callbacks=[...])`"
        " (NonFiniteGuard with one clipper is fine: the guard skips non-finite steps and logs `guard/*`)."
    )


def _clipper_name(callback: Callback) -> str:
    children = getattr(callback, "children", None)
    owned = children.get("clipper") if isinstance(children, dict) else None
    name = type(callback).__name__
    return f"{name} (which owns a {type(owned).__name__})" if owned is not None else name


class StabilityCallback(Callback):
    """Base of the library's callbacks: flushes the loggers on checkpoint save, on exception and at teardown,
    so nothing a callback logged is lost when a run stops.

    Class flags describe what a callback does to the gradients in ``on_before_optimizer_step``, so that
    the order of ``Trainer(callbacks=[...])`` can be checked at setup:

    - ``modifies_gradients``: rescales, clamps or drops gradients (clippers, the guard, the autopilot);
    - ``reads_gradients``: measures them and must come before every callback that modifies them
      (:func:`check_reads_before_modifiers`);
    - ``hides_nonfinite``: turns infinite gradient elements into finite ones (``ValueClip``), so a
      non-finite check must come before it;
    - ``clips_gradients``: clips them (the clippers, an autopilot that owns one): one such callback a
      trainer (:func:`check_one_clipper`).
    """

    modifies_gradients: bool = False
    clips_gradients: bool = False
    reads_gradients: bool = False
    hides_nonfinite: bool = False

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

    Each module is listed once, at its first call, by its user name (no ``_orig_mod.`` of a compiled
    submodule: :func:`~stability_callbacks.stats.user_name`). The hooks are removed on exit.
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
            handles.append(mod.register_forward_pre_hook(make_hook(user_name(name))))
    try:
        yield order
    finally:
        for h in handles:
            h.remove()


class ForwardOrder:
    """The forward order of the layers, learnt from the first real training step.

    ``start(module)`` in ``on_train_batch_start`` records the modules that own parameters as they run
    (:func:`forward_order`); ``stop()`` in ``on_before_optimizer_step``, ``on_train_batch_end`` or on an
    exception removes the hooks. While it records, ``torch.compile``'d code runs eagerly (its hooks would
    not run otherwise). Afterwards :attr:`order` is the recorded list (empty when no hook ran), ``None``
    before any recording.
    """

    def __init__(self) -> None:
        self.order: list[str] | None = None
        self._stack: ExitStack | None = None
        self._recording: list[str] = []

    @property
    def recording(self) -> bool:
        """Whether the hooks are in place."""
        return self._stack is not None

    def start(self, module: nn.Module) -> None:
        """Begin recording, once (a no-op while recording or after a recording)."""
        if self.order is None and self._stack is None:
            self._stack = ExitStack()
            self._recording = self._stack.enter_context(forward_order(module))
            self._stack.enter_context(eager_compiled())  # so that the hooks run in compiled modules too

    def stop(self) -> bool:
        """Remove the hooks; ``True`` when this call ended a recording."""
        if self._stack is None:
            return False
        self._stack.close()
        self._stack = None
        self.order = list(self._recording)
        return True

    def reset(self) -> None:
        """Remove the hooks and forget the order (a new fit records again)."""
        self.stop()
        self.order = None

    def __getstate__(self) -> dict[str, Any]:
        return {"order": self.order, "_stack": None, "_recording": []}
