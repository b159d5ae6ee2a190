"""Unit-wise adaptive gradient clipping (AGC), fused across parameters.

Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without Normalization",
2021 (arXiv:2102.06171): per output unit (a row of a Linear weight, an output channel of a convolution,
the whole tensor for 1-D parameters), if ``||G|| / max(||W||, eps)`` exceeds ``clip_factor`` the unit's
gradient is scaled to ``clip_factor * max(||W||, eps) / max(||G||, 1e-6)``, the rule of
``timm.utils.agc``. The ``eps`` floor keeps zero-initialised units trainable.

Plain PyTorch, no Lightning, no host sync: :class:`UnitwisePlan` lays the units of a fixed list of
shapes out once so each step is a few fused kernels; the unit norms accumulate in the wide dtype of
:func:`stability_callbacks.stats.wide_dtype`, so 1e-25 and 1e20 gradients get their true norms.

DTensors (FSDP2 ``fully_shard``, tensor parallelism) are clipped shard by shard, with the unit norms of
the full tensor. Where a mesh dimension shards the unit dimension (``Shard(0)`` of a matrix: FSDP2 rows,
even uneven ones, a column-wise TP plan) each unit is whole on one rank and its local norm is exact;
where it shards a reduced dimension (``Shard(1)``: a row-wise TP plan; ``Shard(0)`` of a 1-D tensor,
which is one unit) each rank holds a part of every unit, and the per-unit sums of squares are
all-reduced over that mesh dimension, one collective per process group for all tensors. The logged
statistics (total norms before and after, the fraction of clipped units) sum over the units of every
rank the same way, so every rank holds the numbers of the unsharded model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from stability_callbacks.clip_functions import ClipDecision
from stability_callbacks.stats import combine_norms, local_tensor, reduce_over_shards, wide_dtype

try:  # DTensor: the parameters and gradients of FSDP2 (fully_shard) and tensor parallelism
    from torch.distributed.tensor import DTensor
except ImportError:  # a build of torch without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["UnitwisePlan", "adaptive_clip_grad_", "agc_decision", "agc_scale", "unitwise_norms"]


def _units(shape: torch.Size) -> tuple[int, int]:
    """(number of units, elements per unit): rows of the first dimension, or the whole tensor for 1-D."""
    numel = math.prod(shape)
    if len(shape) <= 1:
        return 1, numel
    return shape[0], numel // shape[0] if shape[0] else 0


def _stored(t: Tensor) -> Tensor:
    """The values this rank stores: a DTensor's local shard (as it is, no collective), else ``t``."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _shard_roles(t: Tensor) -> tuple[list[dist.ProcessGroup], list[dist.ProcessGroup]]:
    """The process groups over which a DTensor's units are split (each unit whole on one rank) and those
    over which each unit is split (its sum of squares needs an all-reduce); empty for a plain tensor."""
    split: list[dist.ProcessGroup] = []
    reduced: list[dist.ProcessGroup] = []
    if DTensor is None or not isinstance(t, DTensor):
        return split, reduced
    for mesh_dim, placement in enumerate(t.placements):
        if placement.is_shard():
            dim = placement.dim % max(t.ndim, 1)  # type: ignore[attr-defined]
            group = t.device_mesh.get_group(mesh_dim)
            (split if dim == 0 and t.ndim > 1 else reduced).append(group)
    return split, reduced


class UnitwisePlan:
    """How to compute per-unit norms of a fixed list of tensor shapes with a few fused kernels.

    Small tensors with the same unit size, dtype and device are flattened together and reduced by one
    ``vector_norm(dim=1)``; large tensors are reduced in place (no copy). Units are laid out in plan
    order; :attr:`order` maps plan position to input position. A DTensor is laid out by its local
    shard (:attr:`rows` counts the units this rank holds) and its sharding is noted, so that
    :meth:`norms` gives full-tensor unit norms and :func:`agc_decision` global statistics; every rank
    must then use the plan with the same tensors.

    Args:
        tensors: example tensors (shapes, dtypes and devices are what matters).
        small_numel: tensors with at most this many elements are flattened together.
    """

    def __init__(self, tensors: Sequence[Tensor], small_numel: int = 1 << 16) -> None:
        stored = [_stored(t) for t in tensors]
        groups: dict[tuple[torch.device, torch.dtype, int], list[int]] = {}
        big: list[int] = []
        for i, t in enumerate(stored):
            if t.numel() <= small_numel:
                groups.setdefault((t.device, t.dtype, _units(t.shape)[1]), []).append(i)
            else:
                big.append(i)
        self.groups = [(k, idx) for k, idx in groups.items()]
        self.big = big
        self.order: list[int] = [i for _, idx in self.groups for i in idx] + big
        self.rows = [_units(stored[i].shape)[0] for i in self.order]
        self.shapes = [stored[i].shape for i in self.order]
        self.device = stored[0].device if stored else torch.device("cpu")
        self.num_units = sum(self.rows)
        # DTensors: unit positions whose squares are summed over a group, and plan positions of the
        # tensors whose units a group splits (their per-tensor statistics are summed over it)
        self.reduced_units: dict[dist.ProcessGroup, list[int]] = {}
        self.split_tensors: dict[dist.ProcessGroup, list[int]] = {}
        offset = 0
        for pos, (i, rows) in enumerate(zip(self.order, self.rows, strict=True)):
            split, reduced = _shard_roles(tensors[i])
            for group in split:
                self.split_tensors.setdefault(group, []).append(pos)
            for group in reduced:
                self.reduced_units.setdefault(group, []).extend(range(offset, offset + rows))
            offset += rows
        self.sharded = bool(self.reduced_units or self.split_tensors)
        self._tensor_of_unit: Tensor | None = None
        self._indices: dict[str, dict[dist.ProcessGroup, Tensor]] = {}

    def shard_index(self, which: str) -> dict[dist.ProcessGroup, Tensor]:
        """:attr:`reduced_units` (``which="units"``) or :attr:`split_tensors` (``"tensors"``) as int64
        positions on :attr:`device`, made once (no host-to-device copy a step)."""
        if which not in self._indices:
            positions = self.reduced_units if which == "units" else self.split_tensors
            self._indices[which] = {
                g: torch.tensor(p, dtype=torch.long, device=self.device) for g, p in positions.items()
            }
        return self._indices[which]

    @property
    def tensor_of_unit(self) -> Tensor:
        """For each unit (plan order), the plan position of its tensor (int64, on :attr:`device`)."""
        if self._tensor_of_unit is None:
            self._tensor_of_unit = torch.repeat_interleave(
                torch.arange(len(self.rows)), torch.tensor(self.rows, dtype=torch.long)
            ).to(self.device)
        return self._tensor_of_unit

    def mul_(self, tensors: Sequence[Tensor], views: Sequence[Tensor]) -> None:
        """Multiply ``tensors`` (input order) in place by ``views`` (plan order, see :meth:`scale_views`)."""
        if self.order:
            torch._foreach_mul_([local_tensor(tensors[i]) for i in self.order], list(views))

    @torch.no_grad()
    def norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-unit L2 norms (float32, plan order) of ``tensors`` given in input order.

        For DTensors, the norms of the units this rank holds, over the full tensor: the squares of the
        units split across ranks are all-reduced (one collective per process group).
        """
        parts: list[Tensor] = []
        acc = wide_dtype(self.device)
        if self.sharded:
            tensors = [local_tensor(t) for t in tensors]
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
        norms = torch.cat([p.to(self.device, acc) for p in parts])
        if self.reduced_units:
            squares = reduce_over_shards(norms.square(), self.shard_index("units"), dist.ReduceOp.SUM)
            norms = squares.sqrt()
        return norms.float()

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
    0-d tensors (the whole tensor is one unit). For a DTensor, the full-tensor norms of the units this
    rank holds (see :class:`UnitwisePlan`)."""
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
    return agc_decision(g_norm, scale, clip, clip_factor, plan)


def agc_decision(
    g_norm: Tensor, scale: Tensor, clip: Tensor, clip_factor: float, plan: UnitwisePlan | None = None
) -> ClipDecision:
    """The :class:`ClipDecision` of an AGC step from its unit norms, scales and clipped-unit mask.

    Args:
        g_norm: per-unit gradient norms (plan order).
        scale: per-unit factors applied to the gradients.
        clip: per-unit mask of the clipped units.
        clip_factor: the AGC clip factor (reported as the threshold).
        plan: the :class:`UnitwisePlan` of the units; with DTensors, the statistics are summed over the
            units of every rank (one collective per process group), so they are those of the full model.
    """
    if plan is None or not plan.sharded:
        pre = combine_norms(g_norm)
        post = combine_norms(g_norm * scale)
        clipped = clip.float().mean() if clip.numel() else torch.zeros((), device=g_norm.device)
    else:
        wide = g_norm.to(wide_dtype(g_norm.device))
        per_unit = torch.stack([wide.square(), (wide * scale).square(), clip.to(wide.dtype)], dim=1)
        per_unit = torch.cat([per_unit, torch.ones_like(wide).unsqueeze(1)], dim=1)
        per_tensor = per_unit.new_zeros(len(plan.rows), 4).index_add_(0, plan.tensor_of_unit, per_unit)
        sums = reduce_over_shards(per_tensor, plan.shard_index("tensors"), dist.ReduceOp.SUM).sum(dim=0)
        pre, post = sums[0].sqrt().float(), sums[1].sqrt().float()
        clipped = (sums[2] / sums[3].clamp_min(1.0)).float()
    return ClipDecision(
        norm_pre=pre,
        norm_post=post,
        threshold=torch.full((), clip_factor, device=g_norm.device),
        coef=torch.where(pre > 0, post / pre, torch.ones_like(pre)),
        clipped=clipped,
        finite=torch.isfinite(pre),
    )
