"""Clipping callbacks: fixed norm and value clipping, AutoClip, ZClip and unit-wise AGC, in one place.

Each callback acts in ``on_before_optimizer_step`` (after AMP unscaling, once per optimizer step). This
module gathers the callbacks and the plain-PyTorch functions beneath them, for a ``Trainer`` (and
LightningCLI class paths such as ``stability_callbacks.clipping.ZClip``) and for a plain loop:

- :mod:`~stability_callbacks.clipping_base`: :class:`ClippingCallback`, the base that checks, counts
  and logs;
- :mod:`~stability_callbacks.fixed_clipping`: :class:`NormClip`, :class:`ValueClip`;
- :mod:`~stability_callbacks.adaptive_clipping`: :class:`AutoClip`, :class:`ZClip`, :class:`AGC`;
- :mod:`~stability_callbacks.clip_functions`: :func:`clip_grad_norm_to`, :func:`clip_grad_value_`,
  :func:`scale_grads_`, :class:`ClipDecision`;
- :mod:`~stability_callbacks.policies`: :class:`PercentilePolicy` (AutoClip) and :class:`ZScorePolicy`
  (ZClip), thresholds whose state stays on the device;
- :mod:`~stability_callbacks.agc`: :func:`adaptive_clip_grad_`, :class:`UnitwisePlan`;
- total norms come from :func:`stability_callbacks.stats.total_norm`.

Nothing here reads a value to the host off logging steps. A step whose total norm is not finite is
left untouched (coefficient 1): it belongs to AMP's GradScaler or to
:class:`~stability_callbacks.guard.NonFiniteGuard`. Use one clipping callback per trainer.

Manual optimization: the callbacks refuse to run there (they cannot know which gradients belong to
which step). Call layer 1 yourself between ``manual_backward`` and ``opt.step()``::

    policy = PercentilePolicy(percentile=10.0)          # in __init__
    ...
    self.manual_backward(loss)
    grads = [p.grad for p in self.parameters() if p.grad is not None]
    norm = total_norm(grads)
    clip_grad_norm_to(grads, policy.step(norm), total=norm)
    opt.step()
"""

from __future__ import annotations

from stability_callbacks.adaptive_clipping import AGC, AutoClip, ZClip
from stability_callbacks.agc import UnitwisePlan, adaptive_clip_grad_, unitwise_norms
from stability_callbacks.clip_functions import (
    ClipDecision,
    clip_coefficient,
    clip_grad_norm_to,
    clip_grad_value_,
    scale_grads_,
)
from stability_callbacks.clipping_base import ClippingCallback, check_clipping_fit_start, check_clipping_setup
from stability_callbacks.fixed_clipping import NormClip, ValueClip
from stability_callbacks.policies import PercentilePolicy, ZScorePolicy
from stability_callbacks.stats import total_norm

__all__ = [
    "AGC",
    "AutoClip",
    "ClipDecision",
    "ClippingCallback",
    "NormClip",
    "PercentilePolicy",
    "UnitwisePlan",
    "ValueClip",
    "ZClip",
    "ZScorePolicy",
    "adaptive_clip_grad_",
    "check_clipping_fit_start",
    "check_clipping_setup",
    "clip_coefficient",
    "clip_grad_norm_to",
    "clip_grad_value_",
    "scale_grads_",
    "total_norm",
    "unitwise_norms",
]
