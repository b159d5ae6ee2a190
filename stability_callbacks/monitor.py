"""Per-layer gradient norms and a plain-words diagnosis of vanishing, exploding and non-finite gradients.

Layer 1: :func:`layer_index_for` (the optimizer's parameters grouped in layers, in forward order),
:func:`measure_gradients` (total and per-layer norms from the fused statistics of
:mod:`stability_callbacks.stats`) and :class:`GradientDiagnostician` (host-side rules fed with Python
floats on logging steps). Layer 2 is :class:`GradientMonitor`: on logging steps only, it measures the
gradients in ``on_before_optimizer_step``, logs them with one host transfer, asks the diagnostician and
warns when the diagnosis changes.

The depth ratio (first layer's gradient norm over the last layer's, in forward order) is the classic
symptom of Glorot & Bengio (2010) and Hochreiter (1991): ``<< 1`` means the gradient dies on its way
back to the input.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks._checks import check_bool, check_choice, check_int, check_number
from stability_callbacks._trainer import (
    ForwardOrder,
    StabilityCallback,
    check_reads_before_modifiers,
    is_logging_step,
    log_every,
    log_scalars,
    optimizer_params,
)
from stability_callbacks.stats import LayerIndex, combine_norms, layer_norms, tensor_norms

__all__ = [
    "Diagnosis",
    "GradientDiagnostician",
    "GradientMonitor",
    "OptimizerLayers",
    "layer_index_for",
    "measure_gradients",
]

_VANISHING_REMEDIES = (
    "InitSwap(scheme='auto') or InitSwap(scheme='lsuv') to re-initialise for the activations in use, "
    "ReLU-family activations instead of sigmoid/tanh, normalisation layers (BatchNorm/LayerNorm), "
    "or residual connections"
)
_EXPLODING_REMEDIES = (
    "ZClip() or AutoClip() for adaptive clipping, AGC() for unit-wise clipping, NormClip(max_norm), "
    "a lower learning rate or a warm-up, and InitSwap(scheme='auto') if it starts at initialisation"
)
_NONFINITE_REMEDIES = (
    "NonFiniteGuard(action='skip') to skip such steps, ZClip()/AutoClip() to stop the growth that "
    "precedes them, a lower learning rate, and bf16 instead of fp16 precision"
)


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class Diagnosis:
    """What the gradients of one logging step show.

    Attributes:
        total_norm: L2 norm of all gradients.
        depth_ratio: first layer's norm over the last layer's (``None`` with fewer than two layers).
        vanishing: the vanishing rule has held for ``patience`` logging steps.
        exploding: the total norm is above the absolute bound or ``spike_factor`` x its running median.
        nonfinite: some gradient is NaN or infinite.
        first_layer, last_layer: the layers of the depth ratio.
        small_layers: layers whose norm is below ``vanishing_norm``.
        nonfinite_layers: layers with a non-finite norm.
        median: running median of past finite total norms (``None`` before it has enough values).
    """

    total_norm: float
    depth_ratio: float | None = None
    vanishing: bool = False
    exploding: bool = False
    nonfinite: bool = False
    first_layer: str | None = None
    last_layer: str | None = None
    small_layers: list[str] = field(default_factory=list)
    nonfinite_layers: list[str] = field(default_factory=list)
    median: float | None = None

    def message(self, kind: str) -> str:
        """A plain-words explanation of one diagnosis (``"vanishing"``, ``"exploding"``, ``"nonfinite"``)."""
        if kind == "vanishing":
            parts = []
            if self.depth_ratio is not None:
                parts.append(
                    f"the gradient norm of the first layer '{self.first_layer}' is {_fmt(self.depth_ratio)} "
                    f"times that of the last layer '{self.last_layer}'"
                )
            if self.small_layers:
                parts.append(
                    f"{len(self.small_layers)} layer(s) have tiny gradients: {_names(self.small_layers)}"
                )
            return (
                "Gradients are vanishing toward the input: "
                + "; ".join(parts)
                + f". Early layers barely learn. Try: {_VANISHING_REMEDIES}."
            )
        if kind == "exploding":
            why = f"total gradient norm is {_fmt(self.total_norm)}"
            if self.median:
                why += f", {_fmt(self.total_norm / self.median)} times its running median {_fmt(self.median)}"
            return f"Gradients are exploding: {why}. Try: {_EXPLODING_REMEDIES}."
        if kind == "nonfinite":
            where = f" in {_names(self.nonfinite_layers)}" if self.nonfinite_layers else ""
            return f"Gradients contain NaN or inf{where}. Try: {_NONFINITE_REMEDIES}."
        raise ValueError(f"unknown diagnosis kind {kind!r}")


def layer_index_for(
    module: nn.Module, optimizer: Optimizer, order: Sequence[str] | None = None, per: str = "layer"
) -> LayerIndex:
    """The optimizer's trainable parameters of ``module`` grouped in layers, in forward order.

    Args:
        module: the model.
        optimizer: only its parameters (those that require a gradient) are indexed.
        order: module names in forward order (:class:`~stability_callbacks._trainer.ForwardOrder`);
            ``None`` or empty keeps the order of ``named_modules()``.
        per: ``"layer"`` (modules that own parameters) or ``"parameter"``.

    Layers with no parameter in the optimizer are left out.
    """
    index = LayerIndex.build(module, per=per)
    wanted = {id(p) for p in optimizer_params(optimizer) if p.requires_grad}
    keep = [i for i, p in enumerate(index.params) if id(p) in wanted]
    index = LayerIndex(
        index.layer_names,
        [index.param_names[i] for i in keep],
        [index.params[i] for i in keep],
        [index.layer_of[i] for i in keep],
    )
    if order:
        if per == "parameter":  # parameters follow their module's place
            module_rank = {m: r for r, m in enumerate(order)}
            order = sorted(
                index.layer_names, key=lambda n: module_rank.get(n.rpartition(".")[0], len(module_rank))
            )
        index = index.reorder(order)
    used = sorted(set(index.layer_of))
    remap = {old: new for new, old in enumerate(used)}
    return LayerIndex(
        [index.layer_names[i] for i in used],
        index.param_names,
        index.params,
        [remap[i] for i in index.layer_of],
    )


class OptimizerLayers:
    """:func:`layer_index_for` of an optimizer, built again only when its trainable parameters or the
    forward order change, so a caller on every step does not rebuild it every step.

    Args:
        per: ``"layer"`` or ``"parameter"`` (see :func:`layer_index_for`).
    """

    def __init__(self, per: str = "layer") -> None:
        self.per = per
        self._cached: tuple[tuple[Any, ...], LayerIndex] | None = None

    def index(self, module: nn.Module, optimizer: Optimizer, order: Sequence[str] | None) -> LayerIndex:
        """The layer index of ``optimizer``'s trainable parameters in ``module``, in ``order``."""
        # the cached index holds the parameters, so their ids cannot be reused while it is cached
        trainable = tuple(id(p) for p in optimizer_params(optimizer) if p.requires_grad)
        key = (id(optimizer), tuple(order or ()), trainable)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, layer_index_for(module, optimizer, order, self.per))
        return self._cached[1]

    def clear(self) -> None:
        """Forget the cached index (and the parameters it holds)."""
        self._cached = None


def measure_gradients(index: LayerIndex, grads: Sequence[Tensor | None]) -> tuple[Tensor, Tensor, list[bool]]:
    """Total and per-layer L2 norms of the gradients of ``index.params``, without a host sync.

    Args:
        index: the layer index (:func:`layer_index_for`).
        grads: the gradient of each of ``index.params`` (``None``: no gradient).

    Returns:
        The total norm (0-d float32), the per-layer norms (float32, one per ``index.layer_names``) and,
        per layer, whether any of its parameters has a gradient.
    """
    per_param = tensor_norms(grads)
    has_grad = [False] * len(index.layer_names)
    for g, layer in zip(grads, index.layer_of, strict=True):
        has_grad[layer] = has_grad[layer] or g is not None
    return combine_norms(per_param), layer_norms(per_param, index), has_grad


class GradientDiagnostician:
    """Rules that turn per-layer gradient norms into a diagnosis; plain Python, fed once per logging step.

    Vanishing: the depth ratio is below ``vanishing_ratio``, or some layer's norm is below
    ``vanishing_norm``, for ``patience`` consecutive updates. Layers without a gradient (frozen, unused)
    are "no gradient", not vanishing. Exploding: the total norm is above ``exploding_norm``, or above
    ``spike_factor`` times the median of the last ``window`` finite total norms (once it has
    ``min_history`` of them). Non-finite: any NaN or inf.

    Args:
        vanishing_ratio: depth-ratio threshold (first/last layer norm).
        vanishing_norm: absolute per-layer norm threshold (0 turns it off).
        exploding_norm: absolute bound on the total norm (``math.inf`` turns it off).
        spike_factor: a total norm this many times its running median is a spike.
        window: number of past total norms in the running median.
        patience: consecutive updates the vanishing rule must hold.
        min_history: values the median needs before spikes are judged.
    """

    def __init__(
        self,
        vanishing_ratio: float = 1e-3,
        vanishing_norm: float = 1e-8,
        exploding_norm: float = 1e4,
        spike_factor: float = 10.0,
        window: int = 50,
        patience: int = 3,
        min_history: int = 5,
    ) -> None:
        check_number("vanishing_ratio", vanishing_ratio, 0, low_open=True)
        check_number("vanishing_norm", vanishing_norm, 0)
        check_number("exploding_norm", exploding_norm, 0, low_open=True)
        check_number("spike_factor", spike_factor, 1, low_open=True)
        for name, value in (("window", window), ("patience", patience), ("min_history", min_history)):
            check_int(name, value)
        self.vanishing_ratio = vanishing_ratio
        self.vanishing_norm = vanishing_norm
        self.exploding_norm = exploding_norm
        self.spike_factor = spike_factor
        self.window = window
        self.patience = patience
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)
        self.vanishing_streak = 0

    def update(self, total: float, norms: Sequence[float | None], names: Sequence[str]) -> Diagnosis:
        """Diagnose one step from its total and per-layer norms in forward order (``None``: no gradient)."""
        d = Diagnosis(total_norm=total)
        present = [(n, v) for n, v in zip(names, norms, strict=True) if v is not None]
        d.nonfinite_layers = [n for n, v in present if not math.isfinite(v)]
        d.nonfinite = bool(d.nonfinite_layers) or not math.isfinite(total)
        if len(present) >= 2:
            (d.first_layer, first), (d.last_layer, last) = present[0], present[-1]
            if math.isfinite(first) and math.isfinite(last) and last > 0:
                d.depth_ratio = first / last
        d.small_layers = [n for n, v in present if math.isfinite(v) and v < self.vanishing_norm]

        vanishing_now = not d.nonfinite and (
            (d.depth_ratio is not None and d.depth_ratio < self.vanishing_ratio) or bool(d.small_layers)
        )
        self.vanishing_streak = self.vanishing_streak + 1 if vanishing_now else 0
        d.vanishing = self.vanishing_streak >= self.patience

        if len(self.history) >= self.min_history:
            d.median = statistics.median(self.history)
        if math.isfinite(total):
            d.exploding = total > self.exploding_norm or (
                d.median is not None and total > self.spike_factor * d.median
            )
            self.history.append(total)
        return d

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "vanishing_streak": self.vanishing_streak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque((float(v) for v in state.get("history", [])), maxlen=self.window)
        self.vanishing_streak = int(state.get("vanishing_streak", 0))


class GradientMonitor(StabilityCallback):
    """Logs gradient norms per layer and diagnoses vanishing, exploding and non-finite gradients.

    Nothing runs on steps that do not log: on a logging step the norms of all gradients are computed
    in one fused pass, copied to the host once, diagnosed, and logged. On each change of diagnosis one
    warning (rank zero) says what is wrong, where, and which remedies of this library to try.

    It measures the gradients before any callback changes them, so it goes before the clippers, the
    guard and the autopilot in ``Trainer(callbacks=[...])``; setup raises a clear error otherwise.

    Args:
        log_every_n_steps: optimizer steps between logging steps; the trainer's ``log_every_n_steps``
            if ``None``.
        group_by: ``"layer"`` (modules that own parameters) or ``"parameter"``.
        per_layer: log one ``grad_norm/<layer>`` key per layer (off: only the total and health keys).
        update_ratio: also log ``update_ratio/<layer>`` = ||Δw|| / ||w|` of the step (copies the
            weights on logging steps only).
        vanishing_ratio, vanishing_norm, exploding_norm, spike_factor, window, patience: the rules of
            :class:`GradientDiagnostician`, counted in logging steps.
        warn: emit the plain-words warnings.

    Logged keys (on logging steps):

    ==============================  ==================================================================
    key                             meaning
    ==============================  ==================================================================
    ``grad_norm/total``             L2 norm of all gradients, before any clipping
    ``grad_norm/<layer>``           L2 norm of one layer's gradients
    ``grad_health/depth_ratio``     first layer's norm / last layer's norm, in forward order
    ``grad_health/vanishing``       1.0 while gradients are diagnosed as vanishing, else 0.0
    ``grad_health/exploding``       1.0 while the total norm is above its bound or spiking
    ``grad_health/nonfinite``       1.0 when a gradient holds NaN or inf
    ``update_ratio/<layer>``        ||Δw|| / ||w|| of the optimizer step (``update_ratio=True``)
    ==============================  ==================================================================
    """

    reads_gradients = True

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        group_by: str = "layer",
        per_layer: bool = True,
        update_ratio: bool = False,
        vanishing_ratio: float = 1e-3,
        vanishing_norm: float = 1e-8,
        exploding_norm: float = 1e4,
        spike_factor: float = 10.0,
        window: int = 50,
        patience: int = 3,
        warn: bool = True,
    ) -> None:
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_choice("group_by", group_by, ("layer", "parameter"))
        for name, flag in (("per_layer", per_layer), ("update_ratio", update_ratio), ("warn", warn)):
            check_bool(name, flag)
        self.log_every_n_steps = log_every_n_steps
        self.group_by = group_by
        self.per_layer = per_layer
        self.update_ratio = update_ratio
        self.warn = warn
        self.diagnostician = GradientDiagnostician(
            vanishing_ratio=vanishing_ratio,
            vanishing_norm=vanishing_norm,
            exploding_norm=exploding_norm,
            spike_factor=spike_factor,
            window=window,
            patience=patience,
        )
        self.state: dict[str, bool] = {"vanishing": False, "exploding": False, "nonfinite": False}
        self.last_diagnosis: Diagnosis | None = None
        self._order = ForwardOrder()
        self._layers = OptimizerLayers(group_by)
        self._before: tuple[LayerIndex, list[Tensor]] | None = None
        self._warned_empty = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(group_by=self.group_by, log_every_n_steps=self.log_every_n_steps)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_reads_before_modifiers(trainer, self)
        self._order.reset()
        self._layers.clear()

    # -- forward order, recorded once on the first training batch ---------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._order.start(pl_module)

    # -- the logging step ------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._order.stop()
        if is_logging_step(trainer, log_every(trainer, self.log_every_n_steps)):
            self.diagnose(trainer, pl_module, optimizer)

    def diagnose(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> Diagnosis | None:
        """Measure, diagnose, warn and log the gradients of ``optimizer`` now (one host transfer).

        Called by ``on_before_optimizer_step`` on logging steps; a composing callback may call it on the
        steps it chooses. Returns the :class:`Diagnosis`, or ``None`` when there is nothing to measure.
        """
        index = self._layers.index(pl_module, optimizer, self._order.order)
        if not index.params:
            if not self._warned_empty:
                self._warned_empty = True
                rank_zero_warn(
                    "GradientMonitor: the optimizer has no trainable parameters; nothing to monitor."
                )
            return None
        grads = [p.grad for p in index.params]
        if all(g is None for g in grads):  # e.g. training_step returned None: nothing to measure
            return None
        total, per_layer, has_grad = measure_gradients(index, grads)
        host = torch.cat([total.reshape(1), per_layer]).tolist()  # the one host transfer of this step
        norms = [v if has_grad[i] else None for i, v in enumerate(host[1:])]
        d = self.diagnostician.update(host[0], norms, index.layer_names)
        self.last_diagnosis = d
        self._announce(d)

        summary: dict[str, float] = {"grad_norm/total": host[0]}
        if d.depth_ratio is not None:
            summary["grad_health/depth_ratio"] = d.depth_ratio
        summary |= {f"grad_health/{k}": float(getattr(d, k)) for k in ("vanishing", "exploding", "nonfinite")}
        detail: dict[str, float] = {}
        if self.per_layer:
            detail = {
                f"grad_norm/{n}": v for n, v in zip(index.layer_names, norms, strict=True) if v is not None
            }
        log_scalars(trainer, summary | detail)

        if self.update_ratio:
            self._before = (index, [p.detach().clone() for p in index.params])
        return d

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._before is None:
            return
        index, before = self._before
        self._before = None
        after = [p.detach() for p in index.params]
        delta = layer_norms(tensor_norms(torch._foreach_sub(after, before)), index)
        weight = layer_norms(tensor_norms(before), index)
        ratio = delta / weight.clamp_min(1e-12)
        detail = {f"update_ratio/{n}": ratio[i] for i, n in enumerate(index.layer_names)}
        log_scalars(trainer, detail, step=trainer.global_step - 1)

    def _announce(self, d: Diagnosis) -> None:
        for kind in ("vanishing", "exploding", "nonfinite"):
            now = bool(getattr(d, kind))
            if now == self.state[kind]:
                continue
            self.state[kind] = now
            if not self.warn:
                continue
            if now:
                rank_zero_warn(f"GradientMonitor: {d.message(kind)}", category=UserWarning)
            else:
                label = {"nonfinite": "non-finite"}.get(kind, kind)
                rank_zero_info(
                    f"GradientMonitor: gradients are no longer {label} (total norm {_fmt(d.total_norm)})."
                )

    # -- lifecycle and state ---------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._order.stop()
        self._before = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._order.stop()
        super().on_exception(trainer, pl_module, exception)

    def state_dict(self) -> dict[str, Any]:
        return {"diagnostician": self.diagnostician.state_dict(), "state": dict(self.state)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diagnostician.load_state_dict(state_dict.get("diagnostician", {}))
        self.state.update({k: bool(v) for k, v in state_dict.get("state", {}).items() if k in self.state})
