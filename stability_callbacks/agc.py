"""Unit-wise adaptive gradient clipping (AGC), fused across parameters.

Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization",
2021 (arXiv:2102.06171): per output unit (a row of a Linear weight, an output channel of a convolution,
the whole tensor for 1-D parameters), if ``||G|| / max(||W||, eps)`` exceeds ``clip_factor`` the unit's
gradient is scaled to ``clip_factor * max(||W||, eps) / max(||G||, 1e-6)``, the rule of
``timm.utils.agc``. The ``eps`` floor keeps zero-initialised units trainable.

Plain PyTorch, no Lightning, no host sync: :class:`UnitwisePlan` lays the units of a fixed list of
shapes out once so each step is a few fused kernels; the unit norms accumulate in the wide dtype of
:func:`stability_callbacks.stats.wide_dtype`, so 1e-25 and 1e20 gradients get their true norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from stability_callbacks.clip_functions import ClipDecision
from stability_callbacks.stats import combine_norms, wide_dtype

__all__ = ["UnitwisePlan", "adaptive_clip_grad_", "agc_decision", "agc_scale", "unitwise_norms"]


def _units(shape: torch.Size) -> tuple[int, int]:
    """(number of units, elements per unit): rows of the first dimension, or the whole tensor for 1-D."""
    numel = math.prod(shape)
    if len(shape) <= 1:
        return 1, numel
    return shape[0], numel // shape[0] if shape[0] else 0


class UnitwisePlan:
    """How to compute per-unit norms of a fixed list of tensor shapes with a few fused kernels.

    Small tensors with the same unit size, dtype and device are flattened together and reduced by one
    ``vector_norm(dim=1)``; large tensors are reduced in place (no copy). Units are laid out in plan
    order; :attr:`order` maps plan position to input position.

    Args:
        tensors: example tensors (shapes, dtypes and devices are what matters).
        small_numel: tensors with at most this many elements are flattened together.
    """

    def __init__(self, tensors: Sequence[Tensor], small_numel: int = 1 << 16) -> None:
        groups: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
        big: list[int] = []
        for i, t in enumerate(tensors):
            if t.numel() <= small_numel:
                groups.setdefault((t.device, t.dtype, _units(t.shape)[1]), []).append(i)
            else:
                big.append(i)
        self.groups = [(k, idx) for k, idx in groups.items()]
        self.big = big
        self.order: list[int] = [i for _, idx in self.groups for i in idx] + big
        self.rows = [_units(tensors[i].shape)[0] for i in self.order]
        self.shapes = [tensors[i].shape for i in self.order]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.num_units = sum(self.rows)

    def mul_(self, tensors: Sequence[Tensor], views: Sequence[Tensor]) -> None:
        """Multiply ``tensors`` (input order) in place by ``views`` (plan order, see :meth:`scale_views`)."""
        if self.order:
            torch._foreach_mul_([tensors[i] for i in self.order], list(views))

    @torch.no_grad()
    def norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-unit L2 norms (float32, plan order) of ``tensors`` given in input order."""
        parts: list[Tensor] = []
        acc = wide_dtype(self.device)
        for (_, _, k), idx in self.groups:
            members = [tensors[i] for i in idx]
            flat = (
                members[0].reshape(-1) if len(members) == 1 else torch._utils._flatten_dense_tensors(members)
            )
            parts.append(torch.linalg.vector_norm(flat.view(-1, max(k, 1)), dim=1, dtype=acc))
        for i in self.big:
            t = tensors[i]
            if t.ndim <= 1:
                parts.append(torch.linalg.vector_norm(t, dtype=acc).reshape(1))
            else:
                parts.append(torch.linalg.vector_norm(t, dim=tuple(range(1, t.ndim)), dtype=acc))
        if not parts:
            return torch.zeros(0, device=self.device)
        return torch.cat([p.to(self.device, torch.float32) for p in parts])

    def scale_views(self, buffer: Tensor) -> list[Tensor]:
        """Views of a ``(num_units,)`` buffer shaped to broadcast over each tensor (plan order)."""
        views: list[Tensor] = []
        offset = 0
        for rows, shape in zip(self.rows, self.shapes, strict=True):
            chunk = buffer[offset : offset + rows]
            views.append(chunk.view(rows, *([1] * (len(shape) - 1))) if len(shape) > 1 else chunk.view(()))
            offset += rows
        return views


def unitwise_norms(tensors: Sequence[Tensor]) -> list[Tensor]:
    """L2 norm of each output unit of each tensor: a ``(rows,)`` tensor per tensor with ``ndim > 1``
    (rows = first dimension: Linear output features, conv output channels), a 0-d tensor for 1-D and
    0-d tensors (the whole tensor is one unit)."""
    plan = UnitwisePlan(tensors)
    flat = plan.norms(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    for pos, view in zip(plan.order, flat.split(plan.rows), strict=True):
        out[pos] = view if tensors[pos].ndim > 1 else view.reshape(())
    return out  # type: ignore[return-value]


def agc_scale(w_norm: Tensor, g_norm: Tensor, clip_factor: float, eps: float) -> tuple[Tensor, Tensor]:
    """Per-unit scale (1 where unclipped or non-finite) and the clipped-unit mask, from unit norms."""
    max_norm = w_norm.clamp(min=eps) * clip_factor
    clip = torch.isfinite(g_norm) & ~(g_norm < max_norm)
    scale = torch.where(clip, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
    return scale, clip


def adaptive_clip_grad_(
    params: Sequence[Tensor], clip_factor: float = 0.01, eps: float = 1e-3, plan: UnitwisePlan | None = None
) -> ClipDecision:
    """Unit-wise adaptive gradient clipping (AGC) of ``params``' dense gradients, in place, sync-free.

    Per output unit: if ``||G|| >= clip_factor * max(||W||, eps)`` the unit's gradient is multiplied by
    ``clip_factor * max(||W||, eps) / max(||G||, 1e-6)`` (the rule of ``timm.utils.agc``). Units whose
    gradient norm is not finite are left untouched.

    Args:
        params: parameters whose ``.grad`` is set and dense.
        clip_factor: the largest allowed ratio of gradient norm to weight norm per unit.
        eps: floor of the weight norm, so zero-initialised units still train.
        plan: a :class:`UnitwisePlan` built for ``params`` (reuse it across steps).

    Returns:
        A :class:`ClipDecision` (``threshold`` = ``clip_factor``, ``clipped`` = fraction of clipped units).
    """
    params = list(params)
    plan = plan or UnitwisePlan(params)
    grads = [p.grad for p in params]
    w_norm = plan.norms(params)
    g_norm = plan.norms(grads)  # type: ignore[arg-type]
    scale, clip = agc_scale(w_norm, g_norm, clip_factor, eps)
    plan.mul_(grads, plan.scale_views(scale))  # type: ignore[arg-type]
    return agc_decision(g_norm, scale, clip, clip_factor)


def agc_decision(g_norm: Tensor, scale: Tensor, clip: Tensor, clip_factor: float) -> ClipDecision:
    """The :class:`ClipDecision` of an AGC step from its unit norms, scales and clipped-unit mask."""
    pre = combine_norms(g_norm)
    post = combine_norms(g_norm * scale)
    return ClipDecision(
        norm_pre=pre,
        norm_post=post,
        threshold=torch.full((), clip_factor, device=g_norm.device),
        coef=torch.where(pre > 0, post / pre, torch.ones_like(pre)),
        clipped=clip.float().mean() if clip.numel() else torch.zeros((), device=g_norm.device),
        finite=torch.isfinite(pre),
    )
