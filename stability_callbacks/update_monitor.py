"""Early warning from the updates: the update-to-weight ratio and Adam's update norm, with a jump test.

Two signals rise before loss spikes in large runs (Wortsman et al. 2023, "Small-scale proxies for
large-scale Transformer training instabilities"; Molybog et al. 2023, "A Theory on Adam Instability in
Large-Scale Machine Learning"):

- the update-to-weight ratio ``||W_after - W_before|| / ||W_before||`` of an optimizer step, per layer
  and over all trainable weights (:func:`update_norms_` after :func:`snapshot_weights_`);
- Adam's update norm ``||m_hat / (sqrt(v_hat) + eps)||`` (the step before the learning rate), from the
  optimizer's state (:func:`adam_update_norms`).

:class:`UpdateJumpDetector` keeps a running median of the ratio on the device (the ratio rule of
:class:`~stability_callbacks.spikes.LossSpikeDetector`) and flags a *jump*: the ratio above ``factor``
times its median for ``patience`` consecutive samples. All of it is plain PyTorch without a host sync;
:class:`UpdateMonitor` is the callback.

Cost. ``||ΔW||`` needs the weights from before the step: a sampled step copies the trainable weights
into a buffer kept between samples (memory: one copy of the trainable parameters, in their dtype),
and after the step subtracts and takes norms in place, so a sample costs about four passes over the
weights (copy, subtract, two norms) and Adam's norm three more over the moments, in the buffer. A
step that is not sampled costs nothing. An Adam step itself makes about ten passes over weights and
moments, so sampling every step adds a fraction of the optimizer step, and much less of a whole
training step; ``sample_every_n_steps`` divides it.

DTensors (FSDP2 ``fully_shard``, tensor parallelism). The buffer holds each rank's local shards, and the
norms are those of the full tensors: each rank takes the norms of its shards and the squares are summed
over the mesh (:func:`~stability_callbacks.stats.reduce_over_shards`), for the weights, the update and
Adam's update of every tensor together in one collective a sampled step (one a process group).
:func:`update_norms_` and :func:`adam_update_norms` called alone reduce their own norms the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from stability_callbacks._checks import check_bool, check_int, check_number
from stability_callbacks._trainer import (
    StabilityCallback,
    is_logging_step,
    log_every,
    log_scalars,
    refuse_sharded,
)
from stability_callbacks.monitor import OptimizerLayers
from stability_callbacks.spikes import LossSpikeDetector
from stability_callbacks.stats import (
    LayerIndex,
    combine_norms,
    layer_norms,
    local_tensor,
    reduce_over_shards,
    shard_groups,
    tensor_norms,
    wide_dtype,
)

__all__ = [
    "UpdateJumpDetector",
    "UpdateMonitor",
    "UpdateResult",
    "adam_update_norms",
    "full_norms",
    "snapshot_weights_",
    "update_norms_",
    "update_ratios",
]

_TINY_WEIGHT = 1e-12  # floor of a weight norm in a ratio (zero-initialised layers)


def _stored(params: Sequence[Tensor]) -> list[Tensor]:
    """Detached views of the values this rank stores: a DTensor's local shard, else the tensor."""
    return [local_tensor(p.detach()) for p in params]


def full_norms(
    local_norms: Tensor,
    params: Sequence[Tensor],
    shards: Mapping[dist.ProcessGroup, Sequence[int] | Tensor] | None = None,
) -> Tensor:
    """Norms of the full tensors from the norms of this rank's shards of ``params``.

    Args:
        local_norms: float32 norms of the local shards, one row per parameter: shape ``(n,)`` or
            ``(n, k)`` (``k`` quantities of each parameter, reduced together).
        params: the parameters; the squares of the rows of DTensors sharded over a process group are
            summed over it (one collective per group, a single one under FSDP2 or tensor parallelism
            alone). Plain and replicated tensors are left as they are.
        shards: the positions of the sharded rows per process group, as int64 tensors on the device
            of ``local_norms`` (:func:`~stability_callbacks.stats.shard_groups`), when the caller
            keeps them; computed from ``params`` otherwise.

    Returns:
        Float32 norms of the same shape. Every rank must call this with the same parameters.
    """
    if shards is None:
        shards = shard_groups(params)
    if not shards:
        return local_norms
    squares = local_norms.to(wide_dtype(local_norms.device)).square()
    return reduce_over_shards(squares, shards, dist.ReduceOp.SUM).sqrt().float()


def snapshot_weights_(params: Sequence[Tensor], buffer: list[Tensor] | None = None) -> list[Tensor]:
    """Copy ``params`` into ``buffer`` (fused), allocating it when missing or of other shapes; returns it.

    For DTensors the buffer holds this rank's local shards (plain tensors).
    """
    detached = _stored(params)
    if (
        buffer is None
        or len(buffer) != len(detached)
        or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
            for b, p in zip(buffer, detached, strict=True)
        )
    ):
        return [p.clone() for p in detached]
    if detached:
        torch._foreach_copy_(buffer, detached)
    return buffer


def update_norms_(buffer: list[Tensor], params: Sequence[Tensor], reduce: bool = True) -> Tensor:
    """Per-tensor ``||p - b||`` of ``params`` against their :func:`snapshot_weights_` ``buffer``.

    The buffer is overwritten with ``b - p`` (no new memory). Returns float32 norms of shape ``(n,)``.

    Args:
        buffer: the snapshot (local shards for DTensors).
        params: the parameters after the step.
        reduce: for DTensors, the norms of the full tensors (:func:`full_norms`, one collective);
            ``False`` gives the norms of this rank's shards, for a caller that reduces them together
            with other norms.
    """
    if buffer:
        torch._foreach_sub_(buffer, _stored(params))
    local = tensor_norms(buffer)
    return full_norms(local, params) if reduce else local


def update_ratios(
    delta: Tensor, weight: Tensor, index: LayerIndex | None = None
) -> tuple[Tensor, Tensor | None]:
    """The total and per-layer update-to-weight ratios from per-tensor norms of ``ΔW`` and ``W``.

    Args:
        delta: per-tensor norms of the update (:func:`update_norms_`).
        weight: per-tensor norms of the weights before the step.
        index: the layer index of the tensors (:class:`~stability_callbacks.stats.LayerIndex`), or
            ``None`` for the total only.

    Returns:
        ``||ΔW|| / ||W||`` over all tensors (0-d float32) and, with ``index``, per layer. Weight norms
        are floored at 1e-12.
    """
    total = combine_norms(delta) / combine_norms(weight).clamp_min(_TINY_WEIGHT)
    if index is None:
        return total, None
    return total, layer_norms(delta, index) / layer_norms(weight, index).clamp_min(_TINY_WEIGHT)


def adam_update_norms(
    optimizer: Optimizer,
    params: Sequence[Tensor],
    workspace: list[Tensor] | None = None,
    reduce: bool = True,
) -> Tensor | None:
    """Per-tensor norms of Adam's update direction ``m_hat / (sqrt(v_hat) + eps)``, without a host sync.

    Read from the optimizer's state after its step (``exp_avg``, ``exp_avg_sq`` or, with AMSGrad,
    ``max_exp_avg_sq``, ``step``) with each parameter group's ``betas`` and ``eps``; the update the step
    applied is ``lr`` times this (plus any decoupled weight decay).

    Args:
        optimizer: an Adam-family optimizer.
        params: the parameters (norm 0 for those without state).
        workspace: tensors of the parameters' (local) shapes and dtypes to compute in (a
            :func:`snapshot_weights_` buffer that is no longer needed); new memory otherwise.
        reduce: for DTensor parameters and moments, the norms of the full tensors (:func:`full_norms`,
            one collective); ``False`` gives the norms of this rank's shards.

    Returns:
        Float32 norms of shape ``(len(params),)``, or ``None`` when no parameter has Adam state.
    """
    position = {id(p): i for i, p in enumerate(params)}
    device = params[0].device if params else torch.device("cpu")
    out = torch.zeros(len(params), dtype=torch.float32, device=device)
    found = False
    for group in optimizer.param_groups:
        beta1, beta2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
        eps = float(group.get("eps", 1e-8))
        second_key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
        rows: list[int] = []
        ms: list[Tensor] = []
        vs: list[Tensor] = []
        steps: list[Tensor] = []
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            i = position.get(id(p))
            if i is None or "exp_avg" not in state or second_key not in state:
                continue
            rows.append(i)
            ms.append(local_tensor(state["exp_avg"]))
            vs.append(local_tensor(state[second_key]))
            step = state.get("step", 1)
            steps.append(step.reshape(()) if isinstance(step, Tensor) else torch.tensor(float(step)))
        if not rows:
            continue
        found = True
        dev = ms[0].device
        wide = wide_dtype(dev)
        t = torch.stack([s.to(dev, wide) for s in steps]).clamp_min(1.0)
        bc1 = 1.0 - torch.pow(beta1, t)
        inv_sqrt_bc2 = torch.rsqrt(1.0 - torch.pow(beta2, t))
        work: list[Tensor] = []
        for i, v in zip(rows, vs, strict=True):
            w = workspace[i] if workspace is not None and i < len(workspace) else None
            if w is not None and w.shape == v.shape and w.dtype == v.dtype and w.device == v.device:
                w.copy_(v)
            else:
                w = v.clone()
            work.append(w)
        torch._foreach_sqrt_(work)
        torch._foreach_mul_(work, list(inv_sqrt_bc2.float().unbind()))
        torch._foreach_add_(work, eps)
        torch._foreach_reciprocal_(work)
        torch._foreach_mul_(work, ms)
        norms = tensor_norms(work, device=dev).to(wide) / bc1
        out[torch.tensor(rows, device=out.device)] = norms.float().to(out.device)
    if not found:
        return None
    return full_norms(out, params) if reduce else out


class UpdateJumpDetector:
    """A sustained rise of a positive signal against its running median, on the device.

    ``observe(x)`` judges ``x`` against the median of the last ``window`` accepted values (the ratio
    rule of :class:`~stability_callbacks.spikes.LossSpikeDetector`: ``x > factor * median`` is high, a
    non-finite value is high, a high value never enters the median) and counts consecutive high
    values; ``jump`` holds while that count is at least ``patience``. Nothing is judged before
    ``min_history`` values were accepted. No host sync.

    Args:
        factor: how many times its median the value must exceed (> 1).
        patience: consecutive high values before a jump (>= 1).
        window: accepted values in the running median (>= 1).
        min_history: accepted values before the first judgement (>= 2).
    """

    def __init__(
        self, factor: float = 3.0, patience: int = 3, window: int = 100, min_history: int = 10
    ) -> None:
        check_number("factor", factor, 1, low_open=True)
        check_int("patience", patience)
        check_int("window", window)
        check_int("min_history", min_history, 2)
        self.factor = float(factor)
        self.patience = patience
        self.window = window
        self.min_history = min_history
        self.detector = LossSpikeDetector("ratio", threshold=factor, warmup=min_history, window=window)
        self.streak: Tensor | None = None  # consecutive high values (float64, device)
        self.jumps: Tensor | None = None  # jumps begun so far

    def observe(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Judge ``x`` (a 0-d tensor); returns ``(jump, high, median)``: two 0-d bool tensors and the
        median ``x`` was judged against (NaN before any value)."""
        value = x.detach().reshape(())
        history = self.detector.history
        median = (
            torch.nanmedian(history) if history is not None else torch.full((), math.nan, device=value.device)
        )
        high = self.detector.observe(value)
        if self.streak is None or self.jumps is None or self.streak.device != high.device:
            dtype = wide_dtype(high.device)
            self.streak = torch.zeros((), dtype=dtype, device=high.device)
            self.jumps = torch.zeros((), dtype=dtype, device=high.device)
        streak = torch.where(high, self.streak + 1, torch.zeros_like(self.streak))
        jump = streak >= self.patience
        self.jumps.add_((streak == self.patience).to(self.jumps.dtype))
        self.streak.copy_(streak)
        return jump, high, median.float()

    def state_dict(self) -> dict[str, Any]:
        """The median's statistics and the counters, as CPU tensors (empty before the first value)."""
        if self.streak is None or self.jumps is None:
            return {}
        return {
            "detector": self.detector.state_dict(),
            "streak": self.streak.detach().cpu().clone(),
            "jumps": self.jumps.detach().cpu().clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; an empty state is a fresh start."""
        self.detector.load_state_dict(state.get("detector", {}))
        streak, jumps = state.get("streak"), state.get("jumps")
        if not isinstance(streak, Tensor) or not isinstance(jumps, Tensor):
            self.streak = self.jumps = None
            return
        self.streak, self.jumps = streak.clone(), jumps.clone()


@dataclass(frozen=True)
class UpdateResult:
    """One measured optimizer step of :class:`UpdateMonitor`; tensors on the weights' device.

    Attributes:
        step: the optimizer step (``trainer.global_step`` before it).
        ratio: ``||ΔW|| / ||W||`` over all trainable weights (0-d float32).
        layer_ratios: the same per layer (float32, one per ``layer_names``).
        layer_names: the layers, dotted module names.
        adam_norm: ``||m_hat / (sqrt(v_hat) + eps)||`` over all tensors, ``None`` without Adam state.
        median: the running median ``ratio`` was judged against (NaN at first).
        high: whether ``ratio`` was above ``factor`` times the median (0-d bool).
        jump: whether the ratio has been high for ``patience`` consecutive samples (0-d bool).
    """

    step: int
    ratio: Tensor
    layer_ratios: Tensor
    layer_names: list[str]
    adam_norm: Tensor | None
    median: Tensor
    high: Tensor
    jump: Tensor


def _spread(n: int, k: int) -> list[int]:
    """``k`` positions spread evenly over ``range(n)``, first and last included (all if ``n <= k``)."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


class UpdateMonitor(StabilityCallback):
    """Logs the update-to-weight ratio and Adam's update norm, and flags a sustained jump of the ratio.

    On a sampled optimizer step (every ``sample_every_n_steps``-th: steps ``n-1, 2n-1, ...``) the
    trainable weights are copied in ``on_before_optimizer_step``; after the optimizer's step (a step
    post-hook registered on each of the trainer's optimizers for the fit, so a step that AMP's
    GradScaler skips is not measured) the per-tensor norms of the update and, for Adam-family
    optimizers, of Adam's update direction are taken on the device and the total ratio is given to an
    :class:`UpdateJumpDetector`. :attr:`last_result` (also returned by :meth:`measure`, the public
    per-step call) holds its ``jump`` flag as a device tensor, for a composing callback to act on.
    Nothing is read to the host off logging steps; the cost is described in
    :mod:`stability_callbacks.update_monitor`.

    ``jump`` means: the total ratio above ``factor`` times the median of its last ``window`` accepted
    samples, for ``patience`` consecutive samples (after ``min_history`` samples; high samples never
    enter the median, so a ratio that stays high stays flagged).

    Under ``ModelParallelStrategy`` (FSDP2, tensor parallel) each rank copies its own shards, and the
    weight, update and Adam norms of every tensor are those of the full tensors, reduced over the mesh
    in one collective a sampled step: every rank gets the same ratios and the same ``jump``. FSDP1 and
    DeepSpeed (flat shards) are refused at setup.

    Args:
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's. Logging
            steps are always sampled.
        sample_every_n_steps: measure every n-th optimizer step (1: every step).
        per_layer: log ``update/ratio/<layer>`` keys.
        max_layer_keys: at most this many per-layer keys, layers spread evenly over the network (first
            and last included); ``update/ratio_max`` is the largest over all layers.
        adam_norm: measure Adam's update norm.
        factor, patience, window, min_history: the jump test (:class:`UpdateJumpDetector`), in samples.

    Logged keys (on logging steps, one host transfer):

    ==========================  ====================================================================
    key                         meaning
    ==========================  ====================================================================
    ``update/ratio``            ``||ΔW|| / ||W||`` over all trainable weights, this step
    ``update/ratio/<layer>``    the same for one layer (at most ``max_layer_keys`` layers)
    ``update/ratio_max``        the largest per-layer ratio
    ``update/ratio_median``     the running median the ratio is judged against
    ``update/adam_norm``        ``||m_hat / (sqrt(v_hat) + eps)||`` over all tensors (Adam family)
    ``update/jump``             1.0 while the ratio has jumped (see above), else 0.0
    ==========================  ====================================================================
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        sample_every_n_steps: int = 1,
        per_layer: bool = True,
        max_layer_keys: int = 16,
        adam_norm: bool = True,
        factor: float = 3.0,
        patience: int = 3,
        window: int = 100,
        min_history: int = 10,
    ) -> None:
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        check_int("sample_every_n_steps", sample_every_n_steps)
        check_bool("per_layer", per_layer)
        check_int("max_layer_keys", max_layer_keys)
        check_bool("adam_norm", adam_norm)
        super().__init__()
        self.log_every_n_steps = log_every_n_steps
        self.sample_every_n_steps = sample_every_n_steps
        self.per_layer = per_layer
        self.max_layer_keys = max_layer_keys
        self.adam_norm = adam_norm
        self.detector = UpdateJumpDetector(factor, patience, window, min_history)
        self.last_result: UpdateResult | None = None
        self._layers = OptimizerLayers("layer")
        self._buffer: list[Tensor] | None = None
        self._pending: tuple[int, bool, Optimizer, LayerIndex, Tensor] | None = None
        # the positions of the DTensor parameters of a layer index per process group, on the device
        self._shards: tuple[LayerIndex, dict[dist.ProcessGroup, Tensor]] | None = None
        self._handles: list[RemovableHandle] = []
        self._trainer: pl.Trainer | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            sample_every_n_steps=self.sample_every_n_steps,
            factor=self.detector.factor,
            window=self.detector.window,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_buffer=None, _pending=None, _shards=None, _handles=[], _trainer=None, last_result=None)
        state["_layers"] = OptimizerLayers("layer")
        return state

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_sharded(
                trainer,
                type(self).__name__,
                "each rank holds a flat shard of the weights, so the local update norms are not the global "
                "ones",
                "Use DDP, or ModelParallelStrategy (FSDP2, tensor parallel), whose DTensor weights it "
                "measures exactly.",
                dtensor_ok=True,
            )
            self._layers.clear()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        self._trainer = trainer
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(self._after_step))

    def _release(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._buffer = None
        self._pending = None
        self._shards = None
        self._trainer = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()
        super().on_exception(trainer, pl_module, exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()
        self._layers.clear()
        super().teardown(trainer, pl_module, stage)

    # -- the step --------------------------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        logging = bool(trainer.loggers) and is_logging_step(
            trainer, log_every(trainer, self.log_every_n_steps)
        )
        if logging or (step + 1) % self.sample_every_n_steps == 0:
            self.snapshot(trainer, pl_module, optimizer, log=logging)

    def snapshot(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer, log: bool = False
    ) -> None:
        """Copy the weights of ``optimizer``'s trainable parameters before its step (no host sync).

        Public so that a composing callback can sample the steps it chooses; :meth:`measure` after the
        step completes it (``log``: write the keys then).
        """
        index = self._layers.index(pl_module, optimizer, None)
        if not index.params:
            self._pending = None
            return
        self._buffer = snapshot_weights_(index.params, self._buffer)
        weight = tensor_norms(self._buffer)  # of the local shards: reduced with the update's norms
        self._pending = (trainer.global_step, log, optimizer, index, weight)

    def _after_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if self._trainer is not None and self._pending is not None and self._pending[2] is optimizer:
            self.measure(self._trainer)

    def measure(self, trainer: pl.Trainer) -> UpdateResult | None:
        """Measure the step since :meth:`snapshot`, judge the ratio, log on logging steps.

        Called by the optimizer's step post-hook; returns the :class:`UpdateResult` (also kept in
        :attr:`last_result`), or ``None`` when no snapshot is pending.
        """
        if self._pending is None or self._buffer is None:
            return None
        step, log, optimizer, index, weight = self._pending
        self._pending = None
        delta = update_norms_(self._buffer, index.params, reduce=False)
        per_tensor = (
            adam_update_norms(optimizer, index.params, workspace=self._buffer, reduce=False)
            if self.adam_norm
            else None
        )
        shards = self._shard_positions(index, delta.device)
        if shards:  # the weights, the update and Adam's update of every tensor in one collective
            columns = [weight.to(delta.device), delta] + ([] if per_tensor is None else [per_tensor])
            reduced = full_norms(torch.stack(columns, dim=1), index.params, shards).unbind(1)
            weight, delta = reduced[0], reduced[1]
            per_tensor = None if per_tensor is None else reduced[2]
        ratio, layer = update_ratios(delta, weight, index)
        assert layer is not None
        adam = None if per_tensor is None else combine_norms(per_tensor)
        jump, high, median = self.detector.observe(ratio)
        result = UpdateResult(step, ratio, layer, list(index.layer_names), adam, median, high, jump)
        self.last_result = result
        if log:
            self._log(trainer, result)
        return result

    def _shard_positions(self, index: LayerIndex, device: torch.device) -> dict[dist.ProcessGroup, Tensor]:
        """Positions of ``index``'s DTensor parameters per process group they are sharded over, as int64
        tensors on ``device``, made once per index (empty without DTensors)."""
        cached = self._shards
        if cached is None or cached[0] is not index or any(t.device != device for t in cached[1].values()):
            groups = shard_groups(index.params)
            positions = {g: torch.tensor(p, dtype=torch.long, device=device) for g, p in groups.items()}
            self._shards = cached = (index, positions)
        return cached[1]

    def _log(self, trainer: pl.Trainer, result: UpdateResult) -> None:
        values: dict[str, Tensor | float] = {
            "update/ratio": result.ratio,
            "update/ratio_median": result.median,
            "update/jump": result.jump.float(),
        }
        if result.layer_ratios.numel():
            values["update/ratio_max"] = result.layer_ratios.max()
        if result.adam_norm is not None:
            values["update/adam_norm"] = result.adam_norm
        if self.per_layer:
            for i in _spread(len(result.layer_names), self.max_layer_keys):
                values[f"update/ratio/{result.layer_names[i]}"] = result.layer_ratios[i]
        log_scalars(trainer, values, step=result.step)

    # -- state -----------------------------------------------------------------------------------

    @property
    def jumps(self) -> Tensor:
        """Jumps begun so far (a device tensor)."""
        return self.detector.jumps if self.detector.jumps is not None else torch.zeros(())

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detector.load_state_dict(state_dict.get("detector", {}))
