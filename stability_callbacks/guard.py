"""NonFiniteGuard: skip or halt an optimizer step whose gradients hold a NaN or an infinity.

The check runs in ``on_before_optimizer_step`` (after AMP unscaling, before any weight changes): one
fused norm pass over the gradients, a sum of the per-rank flags across ranks (so every rank takes the
same decision), and one host read of that flag. Deciding whether a step happens needs that one read
each step, exactly as AMP's GradScaler reads its found-inf flag each step.

A skipped step leaves the weights *and* the optimizer state untouched: the guard sets every gradient
of the optimizer to ``None`` for that step, and ``torch.optim`` optimizers leave a parameter without a
gradient alone (no weight decay, no moment decay, no step count). Zeroing the gradients would not do:
Adam's moments would still decay, its step count advance, and weight decay still apply. The learning
rate scheduler and ``trainer.global_step`` still advance, as they do for a step AMP skips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from stability_callbacks._checks import check_choice, check_int
from stability_callbacks._trainer import (
    StabilityCallback,
    is_logging_step,
    log_every,
    log_scalars,
    optimizer_grads,
)
from stability_callbacks.stats import local_tensor, nonfinite_counts, total_norm

__all__ = ["GuardResult", "NonFiniteGradientError", "NonFiniteGuard"]


@dataclass(frozen=True)
class GuardResult:
    """What :meth:`NonFiniteGuard.guard` saw and did on one optimizer step.

    Attributes:
        nonfinite: some rank's gradients held a NaN or an infinity.
        skipped: the guard dropped the gradients, so the optimizer leaves the weights alone.
        consecutive: non-finite steps in a row so far, this one included.
    """

    nonfinite: bool
    skipped: bool
    consecutive: int


class NonFiniteGradientError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` before an optimizer step with non-finite gradients."""


class NonFiniteGuard(StabilityCallback):
    """Skip (or halt at) optimizer steps whose gradients are not finite, identically on every rank.

    - ``action="skip"``: the step is skipped (weights and optimizer state untouched) and counted; after
      ``max_consecutive`` non-finite steps in a row it raises :class:`NonFiniteGradientError`, since
      training is not recovering.
    - ``action="halt"``: raises :class:`NonFiniteGradientError` at the first non-finite step, before the
      weights change, so a checkpoint written on exception (``OnExceptionCheckpoint``) holds finite
      weights.
    - Under AMP's GradScaler (``16-mixed``), an infinite step is the scaler's own overflow check: the
      scaler skips it and lowers its scale, the guard only counts it, and raises only after
      ``max_consecutive`` such steps in a row (with either action).

    Put the guard before :class:`~stability_callbacks.ValueClip` in the callback list: value clipping
    turns an infinite element into a finite one.

    Args:
        action: ``"skip"`` or ``"halt"``.
        max_consecutive: how many non-finite steps in a row end the run (``None``: never, for
            ``"skip"`` and for the GradScaler's steps).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.

    Logged every ``log_every_n_steps`` optimizer steps (no extra host transfer):

    =====================  ==============================================================
    key                    value
    =====================  ==============================================================
    ``guard/nonfinite``    1.0 when this step's gradients were not finite
    ``guard/skipped``      steps skipped so far (by the guard or by the GradScaler)
    =====================  ==============================================================
    """

    modifies_gradients = True

    def __init__(
        self, action: str = "skip", max_consecutive: int | None = 10, log_every_n_steps: int | None = None
    ) -> None:
        super().__init__()
        check_choice("action", action, ("skip", "halt"))
        check_int("max_consecutive", max_consecutive, allow_none=True)
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.action = action
        self.max_consecutive = max_consecutive
        self.log_every_n_steps = log_every_n_steps
        self.skipped = 0  # steps the guard skipped
        self.scaler_skipped = 0  # non-finite steps left to the GradScaler
        self.consecutive = 0  # non-finite steps in a row
        self._warned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(action=self.action, max_consecutive=self.max_consecutive)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        callbacks = list(getattr(trainer, "callbacks", []))
        if self in callbacks:
            before = callbacks[: callbacks.index(self)]
            hiding = [type(cb).__name__ for cb in before if getattr(cb, "hides_nonfinite", False)]
            if hiding:
                rank_zero_warn(
                    f"NonFiniteGuard runs after {', '.join(hiding)}, which turns infinite gradient elements "
                    "into finite ones; put the guard first in `callbacks` so it sees them."
                )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params, grads = optimizer_grads(optimizer)
        if grads:
            self.guard(trainer, pl_module, params, total_norm(grads))

    def guard(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor], norm: Tensor
    ) -> GuardResult:
        """Judge the step whose gradients (those of ``params``) have the total norm ``norm``, and act.

        The step of ``on_before_optimizer_step``, public so a composing callback can run it on gradients
        it gathered. Reads one flag on the host (summed over ranks, so every rank decides the same).
        """
        flag = (~torch.isfinite(norm)).float()
        flag = trainer.strategy.reduce(flag, reduce_op="sum")  # every rank sees every rank's flag
        return self.act(trainer, pl_module, params, bool(flag.item() > 0))

    def act(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor], bad: bool
    ) -> GuardResult:
        """Act on a decision already read on the host: ``bad`` is whether any rank's gradients of
        ``params`` are non-finite (the same on every rank). For a composing callback that reads this
        flag together with its own in one host copy; :meth:`guard` reads it and calls this."""
        dropped = False
        if bad:
            self.consecutive += 1
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            if scaler is not None and scaler.is_enabled():
                self.scaler_skipped += 1
                self._check_consecutive(trainer, pl_module, params)
            elif self.action == "halt":
                raise NonFiniteGradientError(
                    f"NonFiniteGuard: non-finite gradients at step {trainer.global_step}, run halted before "
                    f"the optimizer step ({self._describe(pl_module, params)})."
                )
            else:
                self._check_consecutive(trainer, pl_module, params)
                if not self._warned:  # described before the gradients are dropped
                    self._warned = True
                    rank_zero_warn(
                        f"NonFiniteGuard: skipped step {trainer.global_step} with non-finite gradients "
                        f"({self._describe(pl_module, params)}); later skips are counted in guard/skipped."
                    )
                for p in params:
                    p.grad = None  # the optimizer leaves the parameter and its state alone
                self.skipped += 1
                dropped = True
        else:
            self.consecutive = 0
        if trainer.loggers and is_logging_step(trainer, log_every(trainer, self.log_every_n_steps)):
            log_scalars(
                trainer,
                {"guard/nonfinite": float(bad), "guard/skipped": float(self.skipped + self.scaler_skipped)},
            )
        return GuardResult(nonfinite=bad, skipped=dropped, consecutive=self.consecutive)

    def reset_consecutive(self) -> None:
        """Start counting non-finite steps in a row from zero (after a recovery such as a rollback)."""
        self.consecutive = 0

    def _check_consecutive(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list[Tensor]
    ) -> None:
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise NonFiniteGradientError(
                f"NonFiniteGuard: {self.consecutive} optimizer steps in a row had non-finite gradients "
                f"(last at step {trainer.global_step}: {self._describe(pl_module, params)}); stopping."
            )

    @staticmethod
    def _describe(pl_module: pl.LightningModule, params: list[Tensor], limit: int = 5) -> str:
        """Names and non-finite counts of the first parameters with non-finite gradients in this rank's
        gradients (or shards of them: no collective, so ranks may differ in what they describe)."""
        with_grad = [p for p in params if p.grad is not None]
        counts = nonfinite_counts([local_tensor(p.grad) for p in with_grad]).tolist()  # type: ignore[arg-type]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        bad = [(names.get(id(p), "?"), c) for p, c in zip(with_grad, counts, strict=True) if c]
        if not bad:
            return (
                "no non-finite gradient on this rank: another rank's gradients were not finite, or their "
                "total norm overflowed float32"
            )
        shown = ", ".join(f"{n}: {c}" for n, c in bad[:limit])
        more = f" and {len(bad) - limit} more" if len(bad) > limit else ""
        return f"non-finite values in {shown}{more}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "scaler_skipped": self.scaler_skipped,
            "consecutive": self.consecutive,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.scaler_skipped = int(state_dict.get("scaler_skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
