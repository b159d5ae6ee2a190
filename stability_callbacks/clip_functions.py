"""Clipping functions: scale or clamp gradients in place, sync-free, with what was done as a result.

Plain PyTorch, no Lightning; every result stays a tensor on the gradients' device:

- :func:`clip_coefficient`, :func:`scale_grads_`, :func:`clip_grad_norm_to`: clip all gradients to a
  total norm given as a float or a tensor, without ``.item()`` (the coefficient is the same as
  ``torch.nn.utils.clip_grad_norm_``'s, ``max_norm / (norm + 1e-6)`` clamped to 1). The total norm comes
  from :func:`stability_callbacks.stats.total_norm`, exact for every finite float32 gradient.
- :func:`clip_grad_value_`: clamp every gradient element to ``[-max_value, max_value]``.
- :class:`ClipDecision`: what a clipping rule saw and did on one step.

A step whose total norm is not finite is left untouched (coefficient 1): it belongs to AMP's
GradScaler or to :class:`~stability_callbacks.guard.NonFiniteGuard`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from stability_callbacks.stats import local_tensor, total_norm

__all__ = [
    "CLIP_EPS",
    "ClipDecision",
    "clip_coefficient",
    "clip_grad_norm_to",
    "clip_grad_value_",
    "scale_grads_",
]

CLIP_EPS = 1e-6  # the epsilon of torch.nn.utils.clip_grad_norm_, zclip and autoclip


def clip_coefficient(total: Tensor, max_norm: Tensor | float, eps: float = CLIP_EPS) -> Tensor:
    """``clamp(max_norm / (total + eps), max=1)``, and 1 where ``total`` is not finite (0-d float32).

    The same coefficient as ``torch.nn.utils.clip_grad_norm_``; an infinite ``max_norm`` gives 1.
    """
    total = total.float()
    if not isinstance(max_norm, Tensor):
        max_norm = torch.tensor(float(max_norm), device=total.device)
    coef = torch.clamp(max_norm.to(total.device, torch.float32) / (total + eps), max=1.0)
    return torch.where(torch.isfinite(total), coef, torch.ones_like(coef))


def scale_grads_(grads: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply every gradient in place by the 0-d tensor ``coef`` (one fused call per device and dtype).

    DTensor gradients are scaled shard by shard, on each rank.
    """
    grads = [local_tensor(g) for g in grads]
    dense = [g for g in grads if not g.is_sparse]
    for g in grads:
        if g.is_sparse:
            g.mul_(coef.to(g.device))
    if not dense:
        return
    groups = _group_tensors_by_device_and_dtype([dense])  # type: ignore[list-item]
    for (device, _), ((tensors,), _) in groups.items():
        torch._foreach_mul_(tensors, coef.to(device))  # type: ignore[arg-type]


@dataclass(frozen=True)
class ClipDecision:
    """What a clipping rule saw and did on one step; every field a 0-d tensor on the gradients' device.

    Attributes:
        norm_pre: total L2 norm of the gradients before clipping (float32).
        norm_post: total L2 norm after clipping.
        threshold: the norm above which this step is clipped (``inf`` when nothing would be clipped).
        coef: the factor the gradients were multiplied by (1 when untouched); for AGC the ratio
            ``norm_post / norm_pre``.
        clipped: 1.0 when the step was clipped, else 0.0 (for AGC the fraction of clipped units).
        finite: whether ``norm_pre`` is finite (a non-finite step is never clipped nor recorded).
    """

    norm_pre: Tensor
    norm_post: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    finite: Tensor


def clip_grad_norm_to(
    grads: Sequence[Tensor],
    max_norm: Tensor | float,
    total: Tensor | None = None,
) -> ClipDecision:
    """Scale all gradients so that their total norm is at most ``max_norm``, without a host sync.

    Args:
        grads: the gradients (modified in place).
        max_norm: the bound, a float or a 0-d tensor (``inf`` clips nothing).
        total: the total norm if already computed (:func:`~stability_callbacks.stats.total_norm`).

    Returns:
        The :class:`ClipDecision`; a step with a non-finite norm is left untouched.
    """
    if total is None:
        total = total_norm(grads)
    total = total.float()
    threshold = (
        max_norm.to(total.device, torch.float32)
        if isinstance(max_norm, Tensor)
        else torch.full((), float(max_norm), device=total.device)
    )
    coef = clip_coefficient(total, threshold)
    scale_grads_(grads, coef)
    finite = torch.isfinite(total)
    return ClipDecision(
        norm_pre=total,
        norm_post=total * coef,
        threshold=threshold,
        coef=coef,
        clipped=(finite & (total > threshold)).float(),
        finite=finite,
    )


def clip_grad_value_(grads: Sequence[Tensor], max_value: float) -> None:
    """Clamp every gradient element to ``[-max_value, max_value]`` in place (fused per device and dtype).

    Sparse gradients have their values clamped after coalescing (in place of ``grad._values()``);
    DTensor gradients shard by shard, on each rank.
    """
    grads = [local_tensor(g) for g in grads]
    dense = [g for g in grads if not g.is_sparse]
    for g in grads:
        if g.is_sparse:
            if not g.is_coalesced():
                raise ValueError("clip_grad_value_ needs coalesced sparse gradients; call .coalesce() first")
            g._values().clamp_(-max_value, max_value)
    if dense:
        groups = _group_tensors_by_device_and_dtype([dense])  # type: ignore[list-item]
        for (tensors,), _ in groups.values():
            torch._foreach_clamp_min_(tensors, -max_value)  # type: ignore[arg-type]
            torch._foreach_clamp_max_(tensors, max_value)  # type: ignore[arg-type]
