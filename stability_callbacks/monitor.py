"""Per-layer gradient norms and a plain-words diagnosis of vanishing, exploding, diverging and non-finite.

Layer 1: :func:`layer_index_for` (the optimizer's parameters grouped in layers, in forward order),
:func:`endpoint_layers` (which layers may end the depth ratio), :class:`OptimizerLayers` (both, cached),
:func:`measure_gradients` (total and per-layer norms from the fused statistics of
:mod:`stability_callbacks.stats`); the rules are :class:`~stability_callbacks.diagnosis.GradientDiagnostician`
(device state). Layer 2 is :class:`GradientMonitor`: every ``sample_every_n_steps`` optimizer steps it
measures the gradients in ``on_before_optimizer_step`` and gives the norms (and, at the end of the
batch, the mean loss of the steps since the last such step) to the diagnostician without a host sync;
on logging steps it copies the norms and the rules' state to the host once, logs them, and warns when a
rule has fired since the last logging step.

The depth ratio (first layer's gradient norm over the last layer's, in forward order) is the classic
symptom of Glorot & Bengio (2010) and Hochreiter (1991): ``<< 1`` means the gradient dies on its way
back to the input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks._checks import check_bool, check_choice, check_int
from stability_callbacks._trainer import (
    ForwardOrder,
    StabilityCallback,
    check_reads_before_modifiers,
    is_logging_step,
    log_every,
    log_scalars,
    optimizer_params,
    refuse_sharded,
)
from stability_callbacks.diagnosis import RULES, Diagnosis, GradientDiagnostician, pick_endpoints
from stability_callbacks.stats import LayerIndex, combine_norms, layer_norms, tensor_norms, user_name

__all__ = [
    "Diagnosis",
    "GradientDiagnostician",
    "GradientMonitor",
    "OptimizerLayers",
    "endpoint_layers",
    "layer_index_for",
    "measure_gradients",
]


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


def _parents(name: str) -> list[str]:
    """The dotted names above a module's name, up to the root ``""``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)] if name else []


def endpoint_layers(module: nn.Module, index: LayerIndex, order: Sequence[str] | None = None) -> list[bool]:
    """Per layer of ``index``, whether it may be an end of the depth ratio: a layer of the network itself.

    Left out are layers with a tied parameter (one held by two modules, or by a module registered twice:
    GPT-2's ``wte`` tied to ``lm_head``, whose gradient includes the output layer's), parameters a module
    holds beside sub-modules that hold parameters (the root's, a ViT's ``cls_token`` and ``pos_embed``,
    a learnable temperature; ``nn.MultiheadAttention``'s ``in_proj_weight``), and, when ``order`` was
    recorded (:class:`~stability_callbacks._trainer.ForwardOrder`), modules that never ran as a module in
    the forward pass (``nn.MultiheadAttention.out_proj``, whose weight is used functionally).

    Args:
        module: the model.
        index: its layer index (:func:`layer_index_for`), by layer or by parameter.
        order: the modules in forward order; ``None`` or empty: not known, so not used.
    """
    owners: dict[int, int] = {}
    owner: dict[int, str] = {}
    holders: list[str] = []
    for raw_name, mod in module.named_modules(remove_duplicate=False):
        name = user_name(raw_name)  # the names of ForwardOrder
        own = [p for _, p in mod.named_parameters(recurse=False)]
        if own:
            holders.append(name)
        for p in own:
            owners[id(p)] = owners.get(id(p), 0) + 1
            owner.setdefault(id(p), name)
    containers = {parent for name in holders for parent in _parents(name)}
    ran = set(order) if order else None
    eligible = [True] * len(index.layer_names)
    for p, layer in zip(index.params, index.layer_of, strict=True):
        name = owner.get(id(p), "")
        tied = owners.get(id(p), 0) > 1
        if tied or name == "" or name in containers or (ran is not None and name not in ran):
            eligible[layer] = False
    return eligible


class OptimizerLayers:
    """:func:`layer_index_for` of an optimizer and its :func:`endpoint_layers`, built again only when its
    trainable parameters or the forward order change, so a caller on every step does not rebuild them.

    Args:
        per: ``"layer"`` or ``"parameter"`` (see :func:`layer_index_for`).
    """

    def __init__(self, per: str = "layer") -> None:
        self.per = per
        self._cached: tuple[tuple[Any, ...], LayerIndex] | None = None
        self._ends: tuple[tuple[Any, ...], list[bool]] | None = None

    def _key(self, optimizer: Optimizer, order: Sequence[str] | None) -> tuple[Any, ...]:
        # the cached index holds the parameters, so their ids cannot be reused while it is cached
        trainable = tuple(id(p) for p in optimizer_params(optimizer) if p.requires_grad)
        return (id(optimizer), tuple(order or ()), trainable)

    def index(self, module: nn.Module, optimizer: Optimizer, order: Sequence[str] | None) -> LayerIndex:
        """The layer index of ``optimizer``'s trainable parameters in ``module``, in ``order``."""
        key = self._key(optimizer, order)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, layer_index_for(module, optimizer, order, self.per))
        return self._cached[1]

    def endpoints(self, module: nn.Module, optimizer: Optimizer, order: Sequence[str] | None) -> list[bool]:
        """:func:`endpoint_layers` of :meth:`index`'s layers."""
        return self.index_and_endpoints(module, optimizer, order)[1]

    def index_and_endpoints(
        self, module: nn.Module, optimizer: Optimizer, order: Sequence[str] | None
    ) -> tuple[LayerIndex, list[bool]]:
        """:meth:`index` and :meth:`endpoints` together (the parameters are looked at once)."""
        index = self.index(module, optimizer, order)
        assert self._cached is not None
        key = self._cached[0]
        if self._ends is None or self._ends[0] != key:
            self._ends = (key, endpoint_layers(module, index, order))
        return index, self._ends[1]

    def clear(self) -> None:
        """Forget the cached index (and the parameters it holds)."""
        self._cached = None
        self._ends = None


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


class GradientMonitor(StabilityCallback):
    """Logs gradient norms per layer and diagnoses vanishing, exploding, diverging and non-finite training.

    On every optimizer step (every ``sample_every_n_steps``-th, if set) the gradients are measured in one
    fused pass and given, with the training loss (``outputs["loss"]`` of ``training_step``, averaged over
    the micro-batches since the last such step and, under DDP, over the ranks), to the rules of
    :class:`~stability_callbacks.diagnosis.GradientDiagnostician`, which keep their statistics and flags
    on the device: nothing is read to the host on a step that does not log. On a logging step the norms
    and the rules' state are copied to the host once and logged, and one warning (rank zero) says for
    each rule that fired since the last logging step what it saw, with its numbers, and which remedies of
    this library to try. Windows and patience count optimizer steps, and the steps the rules see do not
    depend on the logging cadence, so neither do the flags at a step. The rules and their hysteresis are
    described in :mod:`stability_callbacks.diagnosis`; at the end of the fit the last step's diagnosis is
    read once more (``last_diagnosis``), with the loss of that step.

    The depth ratio's ends are the first and the last layer of the network in forward order, leaving out
    tied parameters, parameters held beside sub-modules (the root's, a ViT's ``cls_token``) and modules
    that never run as a module (:func:`endpoint_layers`); the messages name them.

    It measures the gradients before any callback changes them, so it goes before the clippers, the
    guard and the autopilot in ``Trainer(callbacks=[...])``; setup raises a clear error otherwise.

    Args:
        log_every_n_steps: optimizer steps between logging steps; the trainer's ``log_every_n_steps``
            if ``None``.
        group_by: ``"layer"`` (modules that own parameters) or ``"parameter"``.
        per_layer: log one ``grad_norm/<layer>`` key per layer (off: only the total and health keys).
        update_ratio: also log ``update_ratio/<layer>`` = ||Δw|| / ||w||` of the step (copies the
            weights on logging steps only).
        vanishing_ratio, vanishing_norm: the vanishing rule (depth ratio; tiny layers).
        exploding_norm: an absolute bound on the total norm, off (``None``) by default: the exploding
            rule compares the norm with the run's own level instead, which does not depend on the loss's
            reduction. Formerly ``1e4`` and always on.
        spike_factor: exploding on-threshold, a multiple of the run's own level of the total norm.
        window: optimizer steps in the running medians of the total norm and of the loss (formerly
            logging steps).
        patience: consecutive optimizer steps a rule must hold before its flag turns on (formerly
            logging steps, and the vanishing rule only).
        warn: emit the plain-words warnings.
        recovery: consecutive optimizer steps under a rule's off-threshold before its flag turns off.
        min_history: accepted norms (losses) before the exploding (diverging) rule judges.
        diverging_factor: the diverging rule's threshold, a multiple of the median of recent losses.
        sample_every_n_steps: the rules see optimizer steps ``n-1, 2n-1, ...`` only (1: every step).
            Each such step costs one pass over the gradients, as a clipper's step does (on a CPU, where
            norms accumulate in float64, a sizeable part of a step: see the README's "Diagnosis"); at
            ``n=10`` a tenth of that. ``window``, ``patience``, ``recovery`` and ``min_history`` stay in
            optimizer steps (a rule holds on at least two consecutive samples when ``patience >= 2``).
            Sampled rules raise no false alarm on the labelled suite either, but they miss what starts
            and ends between two samples (an explosion that turns into NaN within ``n`` steps is then
            reported as non-finite and diverging only).

    Logged keys (on logging steps):

    ==============================  ==================================================================
    key                             meaning
    ==============================  ==================================================================
    ``grad_norm/total``             L2 norm of all gradients, before any clipping
    ``grad_norm/<layer>``           L2 norm of one layer's gradients
    ``grad_health/depth_ratio``     first layer's norm / last layer's norm, in forward order
    ``grad_health/vanishing``       1.0 while gradients are diagnosed as vanishing, else 0.0
    ``grad_health/exploding``       1.0 while the total norm is far above the run's own level and the
                                    loss does not fall, else 0.0
    ``grad_health/diverging``       1.0 while the training loss is far above its recent level or
                                    non-finite, else 0.0
    ``grad_health/nonfinite``       1.0 when a gradient of this step holds NaN or inf
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
        exploding_norm: float | None = None,
        spike_factor: float = 10.0,
        window: int = 50,
        patience: int = 3,
        warn: bool = True,
        recovery: int = 10,
        min_history: int = 5,
        diverging_factor: float = 2.0,
        sample_every_n_steps: int = 1,
    ) -> None:
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_int("sample_every_n_steps", sample_every_n_steps)
        self.sample_every_n_steps = sample_every_n_steps
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
            min_history=min_history,
            recovery=recovery,
            diverging_factor=diverging_factor,
            sample_every=sample_every_n_steps,
        )
        self.state: dict[str, bool] = {k: False for k in (*RULES, "nonfinite")}
        self.last_diagnosis: Diagnosis | None = None
        self._seen: dict[str, int] = {k: 0 for k in (*RULES, "nonfinite")}
        self._order = ForwardOrder()
        self._layers = OptimizerLayers(group_by)
        self._before: tuple[LayerIndex, list[Tensor]] | None = None
        self._measured: tuple[int, LayerIndex, Tensor, Tensor, list[bool], tuple[int, int] | None] | None = (
            None
        )
        self._batch_step = -1
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._warned_empty = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            group_by=self.group_by,
            log_every_n_steps=self.log_every_n_steps,
            sample_every_n_steps=self.sample_every_n_steps,
        )

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        refuse_sharded(
            trainer,
            type(self).__name__,
            "each rank holds a flat shard of the gradients, so the local norms are not the global ones",
            "Use DDP, or ModelParallelStrategy (FSDP2, TP), whose DTensor gradients it measures exactly.",
            dtensor_ok=True,
        )
        check_reads_before_modifiers(trainer, self)
        self._order.reset()
        self._layers.clear()
        self._measured = None

    # -- every step: forward order, gradients, loss --------------------------------------------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._order.start(pl_module)
        self._batch_step = trainer.global_step

    def _sampled(self, step: int) -> bool:
        """Whether the rules observe optimizer step ``step`` (a fixed grid, whatever the logging cadence:
        steps ``n-1, 2n-1, ...`` for ``sample_every_n_steps=n``, like Lightning's logging steps)."""
        return (step + 1) % self.sample_every_n_steps == 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._order.stop()
        if is_logging_step(trainer, log_every(trainer, self.log_every_n_steps)):
            self.diagnose(trainer, pl_module, optimizer)
        elif self._sampled(trainer.global_step):
            self._observe(trainer, pl_module, optimizer)

    def _observe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> tuple[int, LayerIndex, Tensor, Tensor, list[bool], tuple[int, int] | None] | None:
        """Measure this step's gradients, and give them to the rules on a sampled step; once per step
        (no host sync)."""
        step = trainer.global_step
        if self._measured is not None and self._measured[0] == step:
            return self._measured
        index, eligible = self._layers.index_and_endpoints(pl_module, optimizer, self._order.order)
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
        ends = pick_endpoints(eligible, has_grad)
        if self._sampled(step):
            self.diagnostician.observe(total, per_layer, has_grad, ends, step)
        self._measured = (step, index, total, per_layer, has_grad, ends)
        return self._measured

    def diagnose(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> Diagnosis | None:
        """Measure, diagnose, warn and log the gradients of ``optimizer`` now (one host transfer).

        Called by ``on_before_optimizer_step`` on logging steps; a composing callback may call it on the
        steps it chooses (a step is given to the rules once, however often it is diagnosed). Returns the
        :class:`~stability_callbacks.diagnosis.Diagnosis`, or ``None`` when there is nothing to measure.
        """
        measured = self._observe(trainer, pl_module, optimizer)
        if measured is None:
            return None
        d, norms = self._read(measured)
        index = measured[1]

        summary: dict[str, float] = {"grad_norm/total": d.total_norm}
        if d.depth_ratio is not None:
            summary["grad_health/depth_ratio"] = d.depth_ratio
        summary |= {f"grad_health/{k}": float(v) for k, v in d.flags().items()}
        detail: dict[str, float] = {}
        if self.per_layer:
            detail = {
                f"grad_norm/{n}": v for n, v in zip(index.layer_names, norms, strict=True) if v is not None
            }
        log_scalars(trainer, summary | detail)

        if self.update_ratio:
            self._before = (index, [p.detach().clone() for p in index.params])
        return d

    def _read(
        self, measured: tuple[int, LayerIndex, Tensor, Tensor, list[bool], tuple[int, int] | None]
    ) -> tuple[Diagnosis, list[float | None]]:
        """Copy a measured step's norms and the rules' state to the host at once; diagnose and warn."""
        step, index, total, per_layer, has_grad, ends = measured
        state = self.diagnostician.readout()
        dtype = state.dtype if state.numel() else torch.float32
        host = torch.cat([total.reshape(1).to(dtype), per_layer.to(dtype), state.to(total.device)]).tolist()
        n = len(index.layer_names)
        norms = [v if has_grad[i] else None for i, v in enumerate(host[1 : n + 1])]
        d = self.diagnostician.diagnosis(host[n + 1 :], host[0], norms, index.layer_names, ends, step)
        self.last_diagnosis = d
        self._announce(d)
        return d, norms

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._add_loss(trainer, pl_module, outputs)
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

    def _add_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any) -> None:
        """Add the batch's loss to the mean of the steps since the last sampled step; give that mean to
        the rules once a sampled step is taken (Lightning divides the loss it returns by
        ``accumulate_grad_batches``)."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            value = loss.detach().reshape(()).float() * scale
            self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
            self._loss_count += 1
        if trainer.global_step == self._batch_step or not self._sampled(self._batch_step):
            return  # no optimizer step in this batch (accumulating), or not a step the rules observe
        measured, total, count = self._measured, self._loss_sum, self._loss_count
        self._loss_sum, self._loss_count = None, 0
        if measured is None or measured[0] != self._batch_step or total is None:
            return  # the step's gradients were not measured, or it had no loss
        mean = total / count
        if trainer.world_size > 1:  # every rank decides on the same loss
            mean = trainer.strategy.reduce(mean, reduce_op="mean")
        self.diagnostician.observe_loss(mean, measured[0])

    def _announce(self, d: Diagnosis) -> None:
        for kind in (*RULES, "nonfinite"):
            now = bool(getattr(d, kind))
            count = d.nonfinite_steps if kind == "nonfinite" else d.episodes.get(kind, 0)
            fired = count > self._seen[kind] and not (kind == "nonfinite" and self.state[kind])
            cleared = self.state[kind] and not now
            self.state[kind] = now
            self._seen[kind] = count
            if not self.warn:
                continue
            if fired:
                rank_zero_warn(f"GradientMonitor: {d.message(kind)}", category=UserWarning)
            elif cleared:
                what = {
                    "nonfinite": "gradients are no longer non-finite",
                    "diverging": "training is no longer diverging",
                }.get(kind, f"gradients are no longer {kind}")
                rank_zero_info(f"GradientMonitor: {what} (step {d.step}, total norm {d.total_norm:.3g}).")

    # -- lifecycle and state ---------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._order.stop()
        self._before = None
        if self._measured is not None:  # the rules have seen the last loss since the last read
            self._read(self._measured)
        self._measured = None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._order.stop()
        super().on_exception(trainer, pl_module, exception)

    def state_dict(self) -> dict[str, Any]:
        return {
            "diagnostician": self.diagnostician.state_dict(),
            "state": dict(self.state),
            "seen": dict(self._seen),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diagnostician.load_state_dict(state_dict.get("diagnostician", {}))
        self.state.update({k: bool(v) for k, v in state_dict.get("state", {}).items() if k in self.state})
        self._seen.update({k: int(v) for k, v in state_dict.get("seen", {}).items() if k in self._seen})
