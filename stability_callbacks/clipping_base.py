"""The base of the clipping callbacks: setup checks, gradient gathering, counters, logging and state.

:class:`ClippingCallback` runs in ``on_before_optimizer_step`` (after AMP unscaling, once per optimizer
step), asks its subclass to clip the gradients, counts clipped and skipped steps on the device and logs
the ``clip/*`` keys on logging steps. The fixed clippers live in
:mod:`~stability_callbacks.fixed_clipping`, the adaptive ones in
:mod:`~stability_callbacks.adaptive_clipping`; :mod:`stability_callbacks.clipping` gathers them all.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from stability_callbacks._checks import check_int
from stability_callbacks._trainer import (
    StabilityCallback,
    check_one_clipper,
    is_logging_step,
    log_every,
    log_scalars,
    optimizer_grads,
    refuse_sharded,
)
from stability_callbacks.clip_functions import ClipDecision
from stability_callbacks.stats import total_norm

__all__ = [
    "CLIP_LOG_TABLE",
    "ClippingCallback",
    "check_clipping_fit_start",
    "check_clipping_setup",
    "given_or_total_norm",
]


def check_clipping_setup(trainer: pl.Trainer, name: str) -> None:
    """Raise a clear error where a clipping callback cannot be correct (called at setup).

    The clippers are exact on the DTensor gradients of ``ModelParallelStrategy``; FSDP1 and DeepSpeed,
    whose gradients are flat shards, are refused.
    """
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val:
        raise MisconfigurationException(
            f"{name} clips the gradients itself; remove `Trainer(gradient_clip_val={clip_val})` (both would "
            "clip the same step, and Lightning's clipping would run after this callback's)."
        )
    refuse_sharded(
        trainer,
        name,
        "each rank holds a shard of the gradients, so the local norms are not the global ones",
        "Use DDP, or ModelParallelStrategy (FSDP2, tensor parallel): it clips DTensor gradients exactly.",
        dtensor_ok=True,
    )


def check_clipping_fit_start(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
    """Raise a clear error for manual optimization and fused optimizers under a GradScaler."""
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{name} acts in automatic optimization only. Under manual optimization, call the functions of "
            "`stability_callbacks.clipping` between `manual_backward` and `opt.step()` (see that module's "
            "docstring)."
        )
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        for optimizer in trainer.optimizers:
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                raise MisconfigurationException(
                    f"{name} cannot clip with the fused optimizer {type(optimizer).__name__} under "
                    "'16-mixed': its gradients are still scaled when the callback runs. Use a non-fused "
                    "optimizer or 'bf16-mixed'."
                )


def given_or_total_norm(grads: list[Tensor], norm: Tensor | None) -> Tensor:
    """``norm`` when the caller has the total norm of ``grads`` already, else that norm, computed.

    Args:
        grads: the gradients.
        norm: their total L2 norm (a 0-d device tensor), or ``None``.
    """
    return norm if norm is not None else total_norm(grads)


class ClippingCallback(StabilityCallback):
    """Base of the clipping callbacks: checks, gradient gathering, counters, logging, state.

    A subclass implements ``_clip(params, grads, pl_module, norm) -> ClipDecision`` (clip ``grads`` in
    place; ``norm`` is their total norm when the caller has it) and, for running state,
    ``_extra_state`` / ``_load_extra_state``; :meth:`clip` is the public per-step call.

    Args:
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    modifies_gradients = True
    clips_gradients = True

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.log_every_n_steps = log_every_n_steps
        self.steps = 0  # optimizer steps with gradients seen
        self._clipped: Tensor | None = None  # device counters
        self._skipped: Tensor | None = None
        self._warned_no_grads = False

    @property
    def _key_args(self) -> dict[str, Any]:
        return {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._key_args)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in [k for k in state if k.startswith("_cache")]:
            state[key] = None
        return state

    # -- checks ----------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_clipping_setup(trainer, type(self).__name__)
            check_one_clipper(trainer, self)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_clipping_fit_start(trainer, pl_module, type(self).__name__)

    # -- the step --------------------------------------------------------------------------------------

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        """Clip ``grads`` (those of ``params``) in place; ``norm`` is their total norm when known."""
        raise NotImplementedError

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params, grads = optimizer_grads(optimizer)
        if grads:
            self.clip(trainer, pl_module, params, grads)

    def clip(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: list[Tensor],
        grads: list[Tensor],
        norm: Tensor | None = None,
    ) -> ClipDecision:
        """Clip ``grads`` (the gradients of ``params``) in place, count, and log on logging steps.

        The step of ``on_before_optimizer_step``, public so a composing callback can run it on the
        gradients it gathered, passing their total norm when it has it already. Returns the
        :class:`ClipDecision` (device tensors; nothing is read on the host off logging steps).
        """
        decision = self._clip(params, grads, pl_module, norm)
        self.steps += 1
        device = decision.norm_pre.device
        if self._clipped is None or self._skipped is None:
            self._clipped = torch.zeros((), dtype=torch.float32, device=device)
            self._skipped = torch.zeros((), dtype=torch.float32, device=device)
        elif self._clipped.device != device:  # restored from a checkpoint onto another device
            self._clipped, self._skipped = self._clipped.to(device), self._skipped.to(device)
        self._clipped += decision.clipped
        self._skipped += (~decision.finite).float()
        if trainer.loggers and is_logging_step(trainer, log_every(trainer, self.log_every_n_steps)):
            log_scalars(
                trainer,
                {
                    "clip/norm_pre": decision.norm_pre,
                    "clip/norm_post": decision.norm_post,
                    "clip/threshold": decision.threshold,
                    "clip/coef": decision.coef,
                    "clip/clipped": decision.clipped,
                },
            )
        return decision

    # -- state -----------------------------------------------------------------------------------------

    @property
    def clipped_steps(self) -> Tensor:
        """Steps clipped so far (for AGC, the sum of the clipped-unit fractions), a device tensor."""
        return self._clipped if self._clipped is not None else torch.zeros(())

    @property
    def skipped_steps(self) -> Tensor:
        """Steps with a non-finite total norm (left to the GradScaler or a guard), a device tensor."""
        return self._skipped if self._skipped is not None else torch.zeros(())

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "clipped": float(self.clipped_steps.detach().cpu()),
            "skipped": float(self.skipped_steps.detach().cpu()),
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self._clipped = torch.tensor(float(state_dict.get("clipped", 0.0)))
        self._skipped = torch.tensor(float(state_dict.get("skipped", 0.0)))
        self._load_extra_state(state_dict)


CLIP_LOG_TABLE = """
    Logged every ``log_every_n_steps`` optimizer steps (default: the trainer's), one host transfer:

    ==================  =====================================================================
    key                 value
    ==================  =====================================================================
    ``clip/norm_pre``   total L2 norm of the gradients before clipping
    ``clip/norm_post``  total L2 norm after clipping
    ``clip/threshold``  {threshold}
    ``clip/coef``       {coef}
    ``clip/clipped``    {clipped}
    ==================  =====================================================================
"""
"""The table of logged keys in each clipping callback's docstring; ``threshold``, ``coef`` and ``clipped``
are formatted in by the callback."""
