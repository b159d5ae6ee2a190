"""Activation health: dead units, saturated units and the spread of each activation's output.

Two failure modes of activations starve the gradient of the layers below them:

* **dead units** (ReLU family): a unit whose output is exactly zero for every example of a batch
  passes no gradient at all; a large negative bias or a big learning-rate step can kill many of them
  at once (Lu et al., "Dying ReLU and Initialization: Theory and Numerical Examples", 2019);
* **saturated units** (sigmoid, tanh and other bounded activations): outputs pinned near the bounds,
  where the derivative is close to zero, which compounds with depth into vanishing gradients
  (Glorot & Bengio, "Understanding the difficulty of training deep feedforward neural networks", 2010).

The functions here are plain PyTorch and never sync with the host; :class:`ActivationMonitor`
computes them from forward hooks that exist only during the first micro-batch of a logging step. It
sees what a real training step runs (a
:class:`~stability_callbacks.activation_graph.ForwardRecorder`): activation modules of torch, timm and
transformers, functional activations (``F.relu`` inside ``nn.TransformerEncoderLayer``), the hidden
states of recurrent layers, and compiled modules (run eagerly on that micro-batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks._checks import check_int
from stability_callbacks._trainer import StabilityCallback, is_logging_step, log_scalars
from stability_callbacks.activation_kinds import module_activation
from stability_callbacks.forward_recorder import (
    ActivationEvent,
    ForwardRecorder,
    compiled_modules,
    eager_compiled,
)
from stability_callbacks.init_schemes import Activation
from stability_callbacks.stats import user_name

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
    """Whether ``module`` is an activation: one of :data:`ACTIVATION_TYPES` (or a subclass), or one that
    :func:`~stability_callbacks.activation_graph.module_activation` knows (timm's and transformers'
    activation classes, by name)."""
    return isinstance(module, ACTIVATION_TYPES) or module_activation(module) is not None


def _kind_rule(activation: Activation) -> Callable[[Tensor], Tensor] | None:
    """Saturation by activation kind, for functions and for modules known by name (default bounds)."""
    if activation.kind == "tanh":
        return lambda y: y.abs() > SATURATION
    if activation.kind == "sigmoid":
        return lambda y: (y < 1.0 - SATURATION) | (y > SATURATION)
    if activation.kind in ("elu", "celu"):
        return lambda y: y < -SATURATION
    if activation.kind == "selu":
        return lambda y: y < -SATURATION * 1.0507009873554805 * 1.6732632423543772
    return None


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
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):  # hidden states, bounded by tanh
        return None if getattr(module, "nonlinearity", "tanh") == "relu" else lambda y: y.abs() > SATURATION
    if type(module).__module__.startswith("torch.nn."):
        return None
    act = module_activation(module)  # timm's and transformers' classes, by name
    return None if act is None else _kind_rule(act)


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


def activation_stats(y: Tensor, module: nn.Module | Activation) -> Tensor:
    """Dead fraction, saturated fraction and standard deviation of an activation output.

    Args:
        y: the output (any float dtype; computed in float32).
        module: the module that produced it, or the :class:`~stability_callbacks.init_schemes.Activation`
            a function applied (``F.relu``: kind ``"relu"``).

    Returns:
        A float32 tensor ``[dead, saturated, std]`` on ``y``'s device; ``saturated`` is NaN when the
        activation has no saturated range, ``std`` is the population standard deviation of all values.
    """
    y = y.detach()
    rule = _kind_rule(module) if isinstance(module, Activation) else _saturation_rule(module)
    none = torch.full((), float("nan"), device=y.device)
    sat = none if rule is None else rule(y.float()).float().mean()
    std = y.float().std(correction=0)
    return torch.stack([dead_fraction(y), sat, std])


class ActivationMonitor(StabilityCallback):
    """Dead and saturated units and output spread of each activation, every ``n`` steps.

    On a logging step it watches the forward pass of the first micro-batch of that optimizer step
    (from ``on_train_batch_start`` to ``on_before_backward``) and computes :func:`activation_stats` on
    the device for every activation that runs; the values are logged in ``on_before_optimizer_step``
    with one host transfer for all of them. Other steps have no hooks and no cost. If an activation
    runs several times in one forward pass, its first call counts. Computed and logged on global rank
    zero. What it watches, with ``modules=None``:

    - activation modules: torch's (:data:`ACTIVATION_TYPES`) and, by class name, timm's and
      transformers' (``NewGELUActivation``, ``QuickGELU``, ``Swish``...); a function called inside one
      (HF's GELU calls ``torch.tanh``) is part of it, not a second activation;
    - functional activations (``F.relu``, ``torch.tanh``, ``x.sigmoid()``...) called in ``forward``, seen
      by a ``TorchFunctionMode``: ``nn.TransformerEncoderLayer``'s ``F.relu`` is
      ``act/*/<that layer>.relu`` (a second call in the same module ``relu_1``...);
    - recurrent layers (LSTM, GRU, RNN and their cells): their gates run inside one fused kernel and
      cannot be seen, which it says once; their hidden states (bounded by tanh) are logged under the
      layer's name instead.

    Under ``torch.compile`` the watched micro-batch runs eagerly (``torch.compiler.set_stance``), so
    compiled and eager runs log the same keys; where torch has no ``set_stance`` it says once that it
    cannot see inside compiled modules. When nothing ran under its hooks it says so once, too. Names
    are the user's: a compiled submodule's ``_orig_mod.`` is left out.

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
        modules: dotted names of the modules to watch (any module: its output is measured); ``None``
            for every activation, as above. Unknown names raise ``ValueError`` at setup.
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
        self._stack: ExitStack | None = None
        self._recorder: ForwardRecorder | None = None
        self._stats: dict[str, Tensor] = {}
        self._bounded: dict[str, bool] = {}
        self._step = -1
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, modules=self.modules)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_stack=None, _recorder=None, _stats={}, _watched=[])
        return state

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(f"ActivationMonitor: {message}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._watched = []
        if self.modules is None:
            return
        named = {user_name(n): m for n, m in pl_module.named_modules()}
        named.update(pl_module.named_modules())
        missing = [n for n in self.modules if n not in named]
        if missing:
            raise ValueError(
                f"`modules` names modules that {type(pl_module).__name__} does not have: {missing}"
            )
        self._watched = [(user_name(n), named[n]) for n in self.modules]

    # -- the watched forward pass ------------------------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if (
            not trainer.is_global_zero
            or not is_logging_step(trainer, self.every_n_steps)
            or self._step == trainer.global_step  # a later micro-batch of the same optimizer step
        ):
            return
        self._step = trainer.global_step
        self._stats, self._bounded = {}, {}
        compiled = compiled_modules(pl_module)
        self._stack = ExitStack()
        if self.modules is None:
            self._recorder = ForwardRecorder(self._record, recurrent=True, watch=is_activation)
            self._stack.enter_context(self._recorder.start(pl_module))
            eager = self._recorder.recording and getattr(torch.compiler, "set_stance", None) is not None
        else:
            for name, module in self._watched:
                self._stack.callback(module.register_forward_hook(self._make_hook(name, module)).remove)
            eager = self._stack.enter_context(eager_compiled())
        if compiled and not eager:
            self._warn_once(
                "compiled",
                f"cannot see inside the compiled modules {compiled} (this torch has no "
                "torch.compiler.set_stance to run them eagerly while it watches); their activations are "
                "not logged.",
            )

    def _record(self, event: ActivationEvent) -> None:
        y = event.output
        if event.name in self._stats or y is None or y.numel() == 0 or not y.is_floating_point():
            return
        source: nn.Module | Activation = event.module if event.module is not None else event.activation
        self._stats[event.name] = activation_stats(y, source)
        rule = _kind_rule(source) if isinstance(source, Activation) else _saturation_rule(source)
        self._bounded[event.name] = rule is not None

    def _make_hook(self, name: str, module: nn.Module) -> Callable[[nn.Module, Any, Any], None]:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) and output else output
            if name in self._stats or not isinstance(out, Tensor) or out.numel() == 0:
                return
            if not (out.is_floating_point() or out.dtype == torch.bool):
                return
            self._stats[name] = activation_stats(out, module)
            self._bounded[name] = has_saturation(module)

        return hook

    def _end_forward(self) -> None:
        """Remove the hooks (and leave the ``TorchFunctionMode``); the statistics stay."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._end_forward()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_forward()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_forward()
        self._stats = {}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Drop references to the model so a pickled callback does not carry it.
        self._end_forward()
        self._watched, self._stats, self._recorder = [], {}, None
        super().teardown(trainer, pl_module, stage)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._end_forward()
        super().on_exception(trainer, pl_module, exception)

    # -- the logging step --------------------------------------------------------------------------

    def _explain(self, pl_module: nn.Module) -> None:
        """Say once what the watched forward pass could not show."""
        rec = self._recorder
        if rec is None:
            if self._watched and not self._stats:
                self._warn_once(
                    "none", f"none of the modules {[n for n, _ in self._watched]} ran in the step."
                )
            return
        if rec.error is not None:
            self._warn_once("error", f"stopped watching after an error in its own hooks ({rec.error}).")
        recurrent = [
            user_name(n) for n, m in pl_module.named_modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))
        ]
        if recurrent:
            self._warn_once(
                "gates",
                f"the gates of the recurrent layers {recurrent} run inside one fused kernel and cannot be "
                "seen; act/*/<layer> are their hidden states instead.",
            )
        if not self._stats:
            how = "no module ran under its hooks" if not rec.modules_run else "no activation ran"
            self._warn_once(
                "none", f"found no activation in the training step of {type(pl_module).__name__} ({how})."
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._end_forward()
        if self._step != trainer.global_step or (self._recorder is None and not self._watched):
            return
        self._explain(pl_module)
        self._recorder = None
        stats, self._stats = self._stats, {}
        detail: dict[str, Tensor] = {}
        for name, values in stats.items():
            detail[f"act/dead/{name}"] = values[0]
            if self._bounded.get(name, False):
                detail[f"act/saturated/{name}"] = values[1]
            detail[f"act/std/{name}"] = values[2]
        if detail:
            log_scalars(trainer, detail)
