"""Fixed clipping callbacks: :class:`NormClip` (a fixed bound on the total norm) and :class:`ValueClip`.

Thin layers over :func:`~stability_callbacks.clip_functions.clip_grad_norm_to` and
:func:`~stability_callbacks.clip_functions.clip_grad_value_` on the base
:class:`~stability_callbacks.clipping_base.ClippingCallback`, which checks, counts and logs.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from stability_callbacks._checks import check_number
from stability_callbacks.clip_functions import ClipDecision, clip_grad_norm_to, clip_grad_value_
from stability_callbacks.clipping_base import CLIP_LOG_TABLE, ClippingCallback, given_or_total_norm
from stability_callbacks.stats import total_norm

__all__ = ["NormClip", "ValueClip"]


class NormClip(ClippingCallback):
    """Clip the total gradient norm to a fixed ``max_norm`` (``gradient_clip_val``, observable and sync-free).

    Args:
        max_norm: the bound on the total L2 norm (> 0).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + CLIP_LOG_TABLE.format(
        threshold="``max_norm``",
        coef="factor applied to the gradients (1 when untouched)",
        clipped="1.0 when the norm exceeded the threshold",
    )

    def __init__(self, max_norm: float = 1.0, log_every_n_steps: int | None = None) -> None:
        check_number("max_norm", max_norm, 0, low_open=True)
        super().__init__(log_every_n_steps)
        self.max_norm = float(max_norm)

    @property
    def _key_args(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        return clip_grad_norm_to(grads, self.max_norm, total=given_or_total_norm(grads, norm))


class ValueClip(ClippingCallback):
    """Clamp every gradient element to ``[-max_value, max_value]``, with logging.

    Clamping turns an infinite gradient element into ``±max_value``: put :class:`NonFiniteGuard` before
    this callback in the callback list so it still sees the infinity (AMP's GradScaler detects it
    before any callback runs).

    Args:
        max_value: the bound on each element's magnitude (> 0).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's. The norms
            are only computed on logging steps.
    """

    hides_nonfinite = True

    __doc__ = (__doc__ or "") + CLIP_LOG_TABLE.format(
        threshold="``max_value``",
        coef="``norm_post / norm_pre``",
        clipped="1.0 when some element was clamped",
    )

    def __init__(self, max_value: float = 1.0, log_every_n_steps: int | None = None) -> None:
        check_number("max_value", max_value, 0, low_open=True)
        super().__init__(log_every_n_steps)
        self.max_value = float(max_value)

    @property
    def _key_args(self) -> dict[str, Any]:
        return {"max_value": self.max_value}

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        for p in params:
            if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
                p.grad = p.grad.coalesce()
        grads = [p.grad for p in params]  # type: ignore[misc]
        device = grads[0].device
        # Two fused L2 passes on every step, so that the counters count every step: a clamped value
        # lowers the norm (a max-abs pass instead would be several times slower on CPU).
        pre = total_norm(grads)
        clip_grad_value_(grads, self.max_value)
        post = total_norm(grads)
        finite = torch.isfinite(pre)
        return ClipDecision(
            norm_pre=pre,
            norm_post=post,
            threshold=torch.full((), self.max_value, device=device),
            coef=torch.where(pre > 0, post / pre, torch.ones_like(pre)),
            clipped=(finite & (post < pre)).float(),
            finite=finite,
        )
