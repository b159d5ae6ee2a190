"""SPAM-style remedies for Adam: reset the moments after a spike, and clip gradient spikes against them.

Huang, Zhu, Jin, Liu, Wang and Liu, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
Training", ICLR 2025 (arXiv:2501.06842). Two rules, both plain PyTorch on the device:

- :func:`reset_adam_moments_`: zero the first and second moments (``exp_avg``, ``exp_avg_sq`` and,
  with AMSGrad, ``max_exp_avg_sq``) of Adam-family optimizers, so that a spike's gradient stops
  steering the updates (with ``beta2 = 0.999`` it would weigh on ``exp_avg_sq`` for thousands of steps).
  SPAM does this every ``ΔT = 500`` steps.
- :func:`spike_aware_clip_`: replace each gradient element with ``g**2 > theta * v`` (``v`` the second
  moment, ``exp_avg_sq``) by ``sign(g) * sqrt(theta * v)``, i.e. clamp ``g`` to ``±sqrt(theta * v)``;
  the paper's ``theta = 5000``. Right after a reset ``v`` is zero and would clip everything, so SPAM
  starts clipping ``N = 20`` steps (its ``grad_accu_steps``) after each reset.

The step count. SPAM keeps Adam's step (bias corrections near 1) and warms the learning rate up again
over 150 steps after each reset; without that warm-up the first update after a reset is
``(1 - beta1) / sqrt(1 - beta2) ≈ 3.2`` times Adam's usual unit-size step. A callback does not own
the learning rate, so by default the step is reset too (``reset_step=True``): the bias corrections
start again and the update after a reset is exactly the first update of a fresh Adam (``±lr`` per
element). ``reset_step=False`` keeps the step, as SPAM does, for a user who warms the learning rate up.

Layer 2 is :class:`MomentReset`. Nothing here reads a value to the host off logging steps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from stability_callbacks._checks import check_bool, check_int, check_number
from stability_callbacks._trainer import (
    StabilityCallback,
    is_logging_step,
    log_every,
    log_scalars,
    optimizer_params,
    refuse_sharded,
)
from stability_callbacks.stats import local_tensor, reduce_over_shards, shard_groups

__all__ = [
    "MOMENT_KEYS",
    "MomentReset",
    "MomentResetResult",
    "MomentsUnavailableError",
    "has_adam_moments",
    "reset_adam_moments_",
    "spike_aware_clip_",
]

MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
"""The optimizer-state keys of Adam's moments (``torch.optim.Adam``, ``AdamW``, ``NAdam``, ``RAdam``,
``pytorch_optimizer`` and most Adam variants use the same names)."""


class MomentsUnavailableError(TypeError):
    """The optimizer keeps no Adam moments (``exp_avg``, ``exp_avg_sq``): SGD, Adagrad, Adafactor..."""


def has_adam_moments(optimizer: Optimizer) -> bool | None:
    """Whether ``optimizer`` keeps Adam's moments.

    Once it has state: whether the first parameter state holds ``exp_avg`` and ``exp_avg_sq``. Before
    its first step (an Adam optimizer has no state until then): ``None`` when its defaults have
    ``betas`` (the Adam family), ``False`` otherwise (SGD, Adagrad...).
    """
    state = next((s for s in optimizer.state.values() if isinstance(s, dict) and s), None)
    if state is None:
        return None if "betas" in optimizer.defaults else False
    return "exp_avg" in state and "exp_avg_sq" in state


def reset_adam_moments_(
    optimizer: Optimizer, params: Iterable[Tensor] | None = None, reset_step: bool = True
) -> int:
    """Zero Adam's moments of ``params`` (all the optimizer's parameters if ``None``) in place.

    Device-only (``zero_`` on the state tensors, ``step`` included when it is a tensor). Parameters
    without state yet (before their first step) are left alone.

    Args:
        optimizer: an Adam-family optimizer (state keys ``exp_avg`` and ``exp_avg_sq``).
        params: the parameters whose moments are reset.
        reset_step: also set the state's ``step`` to 0, so the bias corrections start again (see the
            module docstring for why this is the default).

    Returns:
        How many parameters had their moments reset.

    Raises:
        MomentsUnavailableError: the optimizer has state but no Adam moments.
    """
    if has_adam_moments(optimizer) is False:
        raise MomentsUnavailableError(
            f"{type(optimizer).__name__} keeps no Adam moments (`exp_avg`, `exp_avg_sq`), so there is "
            "nothing to reset; use an Adam-family optimizer (Adam, AdamW, NAdam, RAdam...)."
        )
    chosen = optimizer_params(optimizer) if params is None else list(params)
    count = 0
    for p in chosen:
        state = optimizer.state.get(p)
        if not state or "exp_avg" not in state:
            continue
        for key in MOMENT_KEYS:
            value = state.get(key)
            if isinstance(value, Tensor):
                value.zero_()
        if reset_step and "step" in state:
            if isinstance(state["step"], Tensor):
                state["step"].zero_()
            else:
                state["step"] = 0
        count += 1
    return count


def spike_aware_clip_(
    grads: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], theta: float = 5000.0, count: bool = False
) -> Tensor | None:
    """Clamp each gradient element to ``±sqrt(theta * v)`` in place (SPAM's spike-aware clipping).

    The elements with ``g**2 > theta * v`` become ``sign(g) * sqrt(theta * v)``; the others are left
    as they are. Fused per device and dtype (``torch._foreach_*``); DTensors element by element on each
    rank's shard (the rule is element-wise, so the shards need no communication).

    Args:
        grads: the gradients (modified in place).
        exp_avg_sq: the second moment of each gradient (same shapes).
        theta: the threshold on ``g**2 / v`` (> 0).
        count: also return how many elements were clipped (one more pass, for logging steps; over
            the whole tensors for DTensors: the shards' counts are summed over the mesh, one
            collective for all tensors).

    Returns:
        The number of clipped elements as a 0-d float32 device tensor when ``count``, else ``None``.
    """
    if len(grads) != len(exp_avg_sq):
        raise ValueError(f"got {len(grads)} gradients and {len(exp_avg_sq)} second moments")
    g_local = [local_tensor(g) for g in grads]
    v_local = [local_tensor(v) for v in exp_avg_sq]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, (g, v) in enumerate(zip(g_local, v_local, strict=True)):
        if g.shape != v.shape:
            raise ValueError(f"gradient {i} has shape {tuple(g.shape)}, its second moment {tuple(v.shape)}")
        if g.numel():
            groups.setdefault((g.device, g.dtype), []).append(i)
    total: Tensor | None = None
    if count:  # before clamping; on DTensors the shards' counts are summed over the mesh
        device = g_local[0].device if g_local else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float32, device=device)
        if g_local:
            per_tensor = torch.stack(
                [
                    (g.detach().float().square() > v.float() * theta).sum().to(device)
                    for g, v in zip(g_local, v_local, strict=True)
                ]
            )
            shards = shard_groups(grads)
            if shards:  # one collective for all tensors (a process group)
                per_tensor = reduce_over_shards(per_tensor, shards, dist.ReduceOp.SUM)
            total = per_tensor.sum().float()
    for (_, dtype), idx in groups.items():
        gs = [g_local[i] for i in idx]
        vs = [v_local[i] if v_local[i].dtype == dtype else v_local[i].to(dtype) for i in idx]
        bound = torch._foreach_mul(vs, float(theta))
        torch._foreach_sqrt_(bound)
        torch._foreach_minimum_(gs, bound)
        torch._foreach_neg_(bound)
        torch._foreach_maximum_(gs, bound)
    return total


@dataclass(frozen=True)
class MomentResetResult:
    """What :meth:`MomentReset.step` did on one optimizer step.

    Attributes:
        reset: whether the moments were reset before this step (a host bool: the schedule and
            on-demand resets are known on the host).
        clip_active: whether spike-aware clipping ran on this step.
        clipped: number of gradient elements clipped (0-d device tensor), counted on logging steps
            only; ``None`` on other steps.
    """

    reset: bool
    clip_active: bool
    clipped: Tensor | None


class MomentReset(StabilityCallback):
    """SPAM's momentum reset and spike-aware clipping (Huang et al., ICLR 2025) for Adam-family optimizers.

    On every optimizer step, in ``on_before_optimizer_step`` (after AMP unscaling, before the update):

    1. the moments are reset when the step is due (every ``interval`` steps, the paper's ΔT: optimizer
       steps ``interval - 1, 2 * interval - 1, ...`` counted from 0, the steps SPAM resets before) or
       when :meth:`reset` was called since the last step;
    2. once ``clip_delay`` steps have passed since the last reset (or since the start), each gradient
       element is clamped to ``±sqrt(theta * exp_avg_sq)`` (:func:`spike_aware_clip_`).

    :meth:`reset` is public so a composing callback (the autopilot's escalation) can reset on demand;
    :meth:`step` is the per-step call, public too, and returns a :class:`MomentResetResult`. Whether the
    step count is reset too is ``reset_step`` (see :mod:`stability_callbacks.moment_reset`). An
    optimizer without Adam moments is reported once with a warning and left alone. Under
    ``ModelParallelStrategy`` (FSDP2, tensor parallel) each rank resets and clamps its own shards (both
    rules are element-wise) and the logged count is that of the whole tensors; FSDP1 and DeepSpeed are
    refused at setup.

    Args:
        interval: optimizer steps between scheduled resets (the paper: 500); ``None`` resets only on
            demand.
        theta: the spike threshold on ``g**2 / exp_avg_sq`` (the paper: 5000); ``None`` turns the
            clipping off.
        clip_delay: optimizer steps after a reset (and after the start) without clipping, while the
            second moment builds up again (the paper: 20; ``< interval``).
        reset_step: reset Adam's step count with the moments.
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.

    Logged every ``log_every_n_steps`` optimizer steps (default: the trainer's), one host transfer:

    =========================  ================================================================
    key                        value
    =========================  ================================================================
    ``moment/resets``          moment resets so far (scheduled and on demand)
    ``moment/spike_clipped``   gradient elements clamped by spike-aware clipping on this step
    ``moment/clip_active``     1.0 when spike-aware clipping ran on this step, else 0.0
    =========================  ================================================================
    """

    modifies_gradients = True

    def __init__(
        self,
        interval: int | None = 500,
        theta: float | None = 5000.0,
        clip_delay: int = 20,
        reset_step: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        check_int("interval", interval, allow_none=True)
        check_number("theta", theta, 0, low_open=True, allow_none=True)
        check_int("clip_delay", clip_delay, 0)
        check_bool("reset_step", reset_step)
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        if interval is not None and theta is not None and clip_delay >= interval:
            raise ValueError(
                f"`clip_delay` must be smaller than `interval` ({interval}), got {clip_delay!r}: the "
                "spike-aware clipping would never run"
            )
        super().__init__()
        self.interval = interval
        self.theta = None if theta is None else float(theta)
        self.clip_delay = clip_delay
        self.reset_step = reset_step
        self.log_every_n_steps = log_every_n_steps
        self.resets = 0
        self.last_reset_step = -1  # optimizer step before which the moments were last reset
        self._pending = False
        self._warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(interval=self.interval, theta=self.theta, clip_delay=self.clip_delay)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            refuse_sharded(
                trainer,
                type(self).__name__,
                "each rank holds a flat shard of the optimizer state that does not match the gradients",
                "Use DDP, or ModelParallelStrategy (FSDP2, tensor parallel): its DTensor states are reset "
                "and clipped shard by shard.",
                dtensor_ok=True,
            )

    def reset(self, trainer: pl.Trainer | None = None) -> int:
        """Reset the moments on demand; the clip delay starts again.

        Args:
            trainer: reset the moments of its optimizers now (before the optimizer step of
                ``trainer.global_step``: from ``on_before_optimizer_step`` the coming step, from
                ``on_train_batch_end`` the next one). ``None``: reset at the next :meth:`step`, for its
                optimizer.

        Returns:
            How many parameters had their moments reset now (0 when deferred).
        """
        if trainer is None:
            self._pending = True
            return 0
        self._pending = False
        return sum(self._reset(optimizer, trainer.global_step) for optimizer in trainer.optimizers)

    def _reset(self, optimizer: Optimizer, step: int) -> int:
        if not self._supported(optimizer):
            return 0
        count = reset_adam_moments_(optimizer, reset_step=self.reset_step)
        self.resets += 1
        self.last_reset_step = step
        return count

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.step(trainer, optimizer)

    def _supported(self, optimizer: Optimizer) -> bool:
        moments = has_adam_moments(optimizer)  # None: an Adam optimizer before its first step
        if moments is False and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"MomentReset: {type(optimizer).__name__} keeps no Adam moments (`exp_avg`, `exp_avg_sq`); "
                "it leaves this optimizer alone. Use an Adam-family optimizer, or remove the callback."
            )
        return moments is not False

    def step(self, trainer: pl.Trainer, optimizer: Optimizer) -> MomentResetResult:
        """Reset when due, clip spikes against the second moment, log on logging steps.

        The call of ``on_before_optimizer_step``, public so a composing callback can run it on the
        gradients of ``optimizer`` before its step. Nothing is read to the host off logging steps.
        """
        step = trainer.global_step
        due = self.interval is not None and (step + 1) % self.interval == 0
        did_reset = (due or self._pending) and self._supported(optimizer)
        if did_reset:
            self._reset(optimizer, step)
        self._pending = False
        logging = bool(trainer.loggers) and is_logging_step(
            trainer, log_every(trainer, self.log_every_n_steps)
        )
        active = self.theta is not None and step - self.last_reset_step >= self.clip_delay
        clipped: Tensor | None = None
        if active and self._supported(optimizer):
            grads: list[Tensor] = []
            second: list[Tensor] = []
            for p in optimizer_params(optimizer):
                v = optimizer.state.get(p, {}).get("exp_avg_sq")
                if p.grad is not None and isinstance(v, Tensor) and not p.grad.is_sparse:
                    grads.append(p.grad)
                    second.append(v)
            active = bool(grads)
            if grads:
                clipped = spike_aware_clip_(grads, second, self.theta, count=logging)  # type: ignore[arg-type]
        else:
            active = False
        if logging:
            values: dict[str, Tensor | float] = {
                "moment/resets": float(self.resets),
                "moment/clip_active": float(active),
            }
            values["moment/spike_clipped"] = clipped if clipped is not None else 0.0
            log_scalars(trainer, values)
        return MomentResetResult(reset=did_reset, clip_active=active, clipped=clipped)

    def state_dict(self) -> dict[str, Any]:
        return {"resets": self.resets, "last_reset_step": self.last_reset_step, "pending": self._pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.resets = int(state_dict.get("resets", 0))
        self.last_reset_step = int(state_dict.get("last_reset_step", -1))
        self._pending = bool(state_dict.get("pending", False))
