"""Activation health: dead units, saturated units and the spread of each activation's output.

Two failure modes of activations starve the gradient of the layers below them:

* **dead units** (ReLU family): a unit whose output is exactly zero for every example of a batch
  passes no gradient at all; a large negative bias or a big learning-rate step can kill many of them
  at once (Lu et al., "Dying ReLU and Initialization: Theory and Numerical Examples", 2019);
* **saturated units** (sigmoid, tanh and other bounded activations): outputs pinned near the bounds,
  where the derivative is close to zero, which compounds with depth into vanishing gradients
  (Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks", 2010).

The functions here are plain PyTorch and never sync with the host; :class:`ActivationMonitor`
computes them from forward hooks that exist only during the first micro-batch of a logging step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from stability_callbacks._checks import check_int
from stability_callbacks._trainer import StabilityCallback, is_logging_step, log_scalars

__all__ = [
    "ACTIVATION_TYPES",
    "ActivationMonitor",
    "activation_stats",
    "dead_fraction",
    "has_saturation",
    "is_activation",
    "saturated_fraction",
]

#: Module types treated as activations when :class:`ActivationMonitor` picks modules by itself.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.LogSigmoid,
    nn.Threshold,
)

#: Saturation threshold: a sigmoid output below 0.01 or above 0.99, a tanh output beyond +-0.99.
SATURATION = 0.99


def is_activation(module: nn.Module) -> bool:
    """Whether ``module`` is one of :data:`ACTIVATION_TYPES` (or a subclass of one)."""
    return isinstance(module, ACTIVATION_TYPES)


def _saturation_rule(module: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """A function marking saturated outputs of ``module``, or ``None`` where saturation is undefined."""
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return lambda y: y.abs() > SATURATION
    if isinstance(module, nn.Sigmoid):
        return lambda y: (y < 1.0 - SATURATION) | (y > SATURATION)
    if isinstance(module, nn.Hardtanh):  # includes ReLU6; the derivative is zero at the bounds
        low, high = float(module.min_val), float(module.max_val)
        return lambda y: (y <= low) | (y >= high)
    if isinstance(module, nn.Hardsigmoid):
        return lambda y: (y <= 0.0) | (y >= 1.0)
    if isinstance(module, (nn.ELU, nn.CELU)):  # the negative side tends to -alpha
        floor = -SATURATION * float(module.alpha)
        return lambda y: y < floor
    if isinstance(module, nn.SELU):  # tends to -scale * alpha
        floor = -SATURATION * 1.0507009873554805 * 1.6732632423543772
        return lambda y: y < floor
    return None


def has_saturation(module: nn.Module) -> bool:
    """Whether :func:`saturated_fraction` is defined for ``module`` (bounded activations).

    Defined for Tanh and Softsign (``|y| > 0.99``), Sigmoid (``y < 0.01`` or ``y > 0.99``),
    Hardtanh and ReLU6 (at a bound), Hardsigmoid (at 0 or 1), ELU and CELU (``y < -0.99 alpha``) and
    SELU (``y < -0.99 scale alpha``). ReLU, GELU, SiLU and other unbounded activations have none.
    """
    return _saturation_rule(module) is not None


def _per_unit(y: Tensor) -> Tensor:
    """``y`` as ``(batch, units)``: dim 0 is the batch, every other position is a unit."""
    if y.dim() == 0:
        return y.reshape(1, 1)
    return y.reshape(y.shape[0], -1)


def dead_fraction(y: Tensor) -> Tensor:
    """Fraction of units whose output is exactly zero for every example of the batch.

    A unit is one position of the output without its batch dimension (dim 0): a feature of a
    ``(batch, features)`` output, a channel at one position of a ``(batch, channels, H, W)`` one.

    Args:
        y: an activation output.

    Returns:
        A 0-d float32 tensor on ``y``'s device.
    """
    units = _per_unit(y.detach())
    alive = (units != 0).any(dim=0)
    return alive.logical_not().float().mean()


def saturated_fraction(y: Tensor, module: nn.Module) -> Tensor | None:
    """Fraction of the output values of ``module`` in its saturated range (see :func:`has_saturation`).

    Args:
        y: the module's output.
        module: the activation module (its type and bounds define saturation).

    Returns:
        A 0-d float32 tensor, or ``None`` when ``module`` has no saturated range.
    """
    rule = _saturation_rule(module)
    if rule is None:
        return None
    return rule(y.detach().float()).float().mean()


def activation_stats(y: Tensor, module: nn.Module) -> Tensor:
    """Dead fraction, saturated fraction and standard deviation of an activation output.

    Args:
        y: the module's output (any float dtype; computed in float32).
        module: the module that produced it.

    Returns:
        A float32 tensor ``[dead, saturated, std]`` on ``y``'s device; ``saturated`` is NaN when the
        module has no saturated range, ``std`` is the population standard deviation of all values.
    """
    y = y.detach()
    sat = saturated_fraction(y, module)
    if sat is None:
        sat = torch.full((), float("nan"), device=y.device)
    std = y.float().std(correction=0)
    return torch.stack([dead_fraction(y), sat, std])


class ActivationMonitor(StabilityCallback):
    """Dead and saturated units and output spread of each activation module, every ``n`` steps.

    On a logging step, forward hooks on the chosen modules compute :func:`activation_stats` on the
    device during the first micro-batch of that optimizer step; the hooks are removed right after
    it, and the values are logged in ``on_before_optimizer_step`` with one host transfer for all of
    them. Other steps have no hooks and no cost. If a module runs several times in one forward pass,
    its first call counts. Computed and logged on global rank zero.

    The keys are per-module detail, written straight to every logger (``logger.log_metrics``), so
    their number does not slow down the step through ``self.log``:

    ===============================  ===========================================================
    key                              meaning
    ===============================  ===========================================================
    ``act/dead/<module>``            fraction of units that output exactly zero for the whole batch
    ``act/saturated/<module>``       fraction of outputs in the saturated range (bounded activations
                                     only: sigmoid outside [0.01, 0.99], ``|tanh| > 0.99``, ...)
    ``act/std/<module>``             standard deviation of the module's output
    ===============================  ===========================================================

    Args:
        every_n_steps: log on optimizer steps ``n-1, 2n-1, ...`` (Lightning's convention).
        modules: dotted names of the modules to watch; ``None`` for every activation module
            (:data:`ACTIVATION_TYPES`). Unknown names raise ``ValueError`` at setup.
    """

    def __init__(self, every_n_steps: int = 50, modules: str | Sequence[str] | None = None) -> None:
        check_int("every_n_steps", every_n_steps)
        names = [modules] if isinstance(modules, str) else modules
        if names is not None and (
            not isinstance(names, Sequence) or not names or not all(isinstance(n, str) for n in names)
        ):
            raise ValueError(f"`modules` must be None or a non-empty list of module names, got {modules!r}")
        self.every_n_steps = every_n_steps
        self.modules = None if names is None else list(names)
        self._watched: list[tuple[str, nn.Module]] = []
        self._handles: list[RemovableHandle] = []
        self._stats: dict[str, Tensor] = {}
        self._step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, modules=self.modules)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        named = dict(pl_module.named_modules())
        if self.modules is None:
            self._watched = [(n, m) for n, m in named.items() if n and is_activation(m)]
            return
        missing = [n for n in self.modules if n not in named]
        if missing:
            raise ValueError(
                f"`modules` names modules that {type(pl_module).__name__} does not have: {missing}"
            )
        self._watched = [(n, named[n]) for n in self.modules]

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            not trainer.is_global_zero
            or not self._watched
            or not is_logging_step(trainer, self.every_n_steps)
            or self._step == trainer.global_step  # a later micro-batch of the same optimizer step
        ):
            return
        self._step = trainer.global_step
        self._stats = {}
        for name, module in self._watched:
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        stats = self._stats

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in stats or not isinstance(output, Tensor) or output.numel() == 0:
                return
            if not (output.is_floating_point() or output.dtype == torch.bool):
                return
            stats[name] = activation_stats(output, module)

        return hook

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._remove_hooks()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        self._stats = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Drop references to the model so a pickled callback does not carry it.
        self._remove_hooks()
        self._watched, self._stats = [], {}
        super().teardown(trainer, pl_module, stage)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()
        super().on_exception(trainer, pl_module, exception)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._remove_hooks()
        if self._step != trainer.global_step or not self._stats:
            return
        stats, self._stats = self._stats, {}
        modules = dict(self._watched)
        detail: dict[str, Tensor] = {}
        for name, values in stats.items():
            detail[f"act/dead/{name}"] = values[0]
            if has_saturation(modules[name]):
                detail[f"act/saturated/{name}"] = values[1]
            detail[f"act/std/{name}"] = values[2]
        log_scalars(trainer, detail)
