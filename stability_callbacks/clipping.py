"""Gradient clipping: sync-free clipping functions, adaptive threshold policies and their callbacks.

Layer 1 (plain PyTorch, no Lightning; every result stays a tensor on the gradients' device):

- :func:`total_grad_norm`, :func:`clip_coefficient`, :func:`scale_grads_`, :func:`clip_grad_norm_to`:
  clip all gradients to a total norm given as a tensor, without ``.item()`` (the coefficient is the
  same as ``torch.nn.utils.clip_grad_norm_``'s, ``max_norm / (norm + 1e-6)`` clamped to 1).
- :func:`clip_grad_value_`: clamp every gradient element to ``[-max_value, max_value]``.
- :func:`unitwise_norms`, :func:`adaptive_clip_grad_`: unit-wise adaptive gradient clipping (AGC) of
  Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition Without
  Normalization", 2021 (arXiv:2102.06171): per output unit, if ``||G|| / max(||W||, eps)`` exceeds
  ``clip_factor`` the unit's gradient is scaled to ``clip_factor * max(||W||, eps) / max(||G||, 1e-6)``.
- :class:`PercentilePolicy`: the AutoClip threshold of Seetharaman, Wichern, Pardo and Le Roux,
  "AutoClip: Adaptive Gradient Clipping for Source Separation Networks", 2020 (arXiv:2007.14469): a
  percentile of the past total norms, kept in a bounded ring buffer.
- :class:`ZScorePolicy`: the ZClip threshold of Kumar, Owen, Ashkboos and others, "ZClip: Adaptive
  Spike Mitigation for LLM Pre-Training", 2025 (arXiv:2504.02507): z-score of the total norm against an
  exponential moving mean and variance, after a warm-up.

Every policy keeps its state in device tensors and updates it with ``torch.where``: a non-finite norm
never enters a statistic, and nothing reads a value back to the host. A step whose total norm is not
finite is left untouched (coefficient 1): it belongs to AMP's GradScaler or to :class:`NonFiniteGuard`.

On the CPU itself, where reading a value costs no synchronisation, the same decisions are taken
faster: norms of float32 gradients accumulate in float32 (float64 accumulation is several times slower
there) and the tensors whose norm overflowed are redone in float64; small tensors of one shape are
stacked and reduced together, grouped once per list of parameters when :func:`total_grad_norm` is
given them; :class:`ZScorePolicy` branches in Python floats instead of a few dozen
masked tensor operations; a coefficient of exactly 1 is not applied. On accelerators the per-tensor
norms accumulate in float64 (float32 where the device has no float64).

Layer 2 callbacks act in ``on_before_optimizer_step`` (after AMP unscaling, once per optimizer step):
:class:`AutoClip`, :class:`ZClip`, :class:`AGC`, :class:`NormClip`, :class:`ValueClip`.

Manual optimization: the callbacks refuse to run there (they cannot know which gradients belong to
which step). Call layer 1 yourself between ``manual_backward`` and ``opt.step()``::

    policy = PercentilePolicy(percentile=10.0)          # in __init__
    ...
    self.manual_backward(loss)
    params = [p for p in self.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    norm = total_grad_norm(grads, params=params)
    clip_grad_norm_to(grads, policy.step(norm), total=norm)
    opt.step()
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from operator import attrgetter, itemgetter
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from stability_callbacks._trainer import (
    StabilityCallback,
    forward_order,
    is_logging_step,
    log_scalars,
    optimizer_grads,
)
from stability_callbacks.stats import host_reads_are_free, tensor_norms, total_norm

__all__ = [
    "AGC",
    "AutoClip",
    "ClipDecision",
    "NormClip",
    "PercentilePolicy",
    "UnitwisePlan",
    "ValueClip",
    "ZClip",
    "ZScorePolicy",
    "adaptive_clip_grad_",
    "clip_coefficient",
    "clip_grad_norm_to",
    "clip_grad_value_",
    "default_accumulate_dtype",
    "scale_grads_",
    "total_grad_norm",
    "unitwise_norms",
]

_NO_FLOAT64 = frozenset({"mps", "xla"})
_CLIP_EPS = 1e-6  # the epsilon of torch.nn.utils.clip_grad_norm_, zclip and autoclip


# ----------------------------------------------------------------------------------------------------
# Layer 1: functions
# ----------------------------------------------------------------------------------------------------


def default_accumulate_dtype(device: torch.device) -> torch.dtype:
    """The accumulation dtype of gradient norms on ``device`` when nothing may be read on the host:
    float32 on CPU (float64 there is several times slower), float64 on CUDA and other devices that
    support it, float32 elsewhere. (On the CPU itself :func:`total_grad_norm` accumulates in float32
    and redoes in float64 the tensors whose norm overflowed.)"""
    if device.type == "cpu" or device.type in _NO_FLOAT64:
        return torch.float32
    return torch.float64


def _wide(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type in _NO_FLOAT64 else torch.float64


_STACK_TENSOR_NUMEL = 1 << 12  # CPU total norm: tensors up to this size are stacked with their shape
_STACK_MAX_NUMEL = 1 << 20  # ... into copies of at most this many elements
_IS_CPU = attrgetter("is_cpu")
_IS_SPARSE = attrgetter("is_sparse")


class _HostNormPlan:
    """How the CPU path reduces a list of tensors: which are stacked with others of their shape and dtype
    (small ones, in copies of at most ``_STACK_MAX_NUMEL`` elements: one kernel call instead of one per
    tensor) and which are reduced one by one. The plan only depends on the shapes and dtypes, so
    :func:`total_grad_norm` keeps one per list of parameters: their gradients have their shapes.
    """

    __slots__ = ("singles", "stacks")

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        by_kind: defaultdict[tuple[torch.Size, torch.dtype], list[int]] = defaultdict(list)
        for i, t in enumerate(tensors):
            by_kind[t.shape, t.dtype].append(i)
        self.stacks: list[itemgetter[Any]] = []
        singles: list[int] = []
        for (shape, _), indices in by_kind.items():
            numel = math.prod(shape)
            if numel > _STACK_TENSOR_NUMEL:
                singles += indices
                continue
            per_stack = max(1, _STACK_MAX_NUMEL // max(numel, 1))
            for start in range(0, len(indices), per_stack):
                chunk = indices[start : start + per_stack]
                if len(chunk) == 1:
                    singles += chunk
                else:
                    self.stacks.append(itemgetter(*chunk))
        self.singles = singles

    def norm(self, tensors: Sequence[Tensor]) -> float | None:
        """The total norm of dense CPU tensors: float32 sums of squares read and added in double precision.

        ``None`` when a norm came out non-finite (an overflow to redo in float64, or a NaN/inf). Raises
        :class:`_NotPlanned` (or the ``RuntimeError`` of a failed stack or norm) when the tensors do not
        fit the plan: a sparse or non-CPU tensor, or tensors of one stack that no longer share a shape.
        The checks look at each stack's result, not at every tensor.
        """
        squares: list[float] = []
        for take in self.stacks:
            stacked = torch.stack(take(tensors))
            if not stacked.is_cpu:  # (a stack of sparse tensors fails below: no view, no norm with a dtype)
                raise _NotPlanned
            if stacked.dtype in (torch.float32, torch.float64):  # a dot product: faster and more accurate
                flat = stacked.view(-1)
                squares.append(torch.dot(flat, flat).item())
            else:
                squares.append(torch.linalg.vector_norm(stacked, dtype=torch.float32).item() ** 2)
        if self.singles:
            singles: list[Tensor | None] = [tensors[i] for i in self.singles]
            for (device, dtype), ((group,), _) in _group_tensors_by_device_and_dtype([singles]).items():
                if device.type != "cpu" or any(map(_IS_SPARSE, group)):
                    raise _NotPlanned
                acc = _host_accumulate(dtype)
                if acc == dtype:
                    norms = torch._foreach_norm(group, 2.0)  # type: ignore[arg-type]
                else:
                    norms = torch._foreach_norm(group, 2.0, dtype=acc)  # type: ignore[arg-type]
                squares += [n.item() ** 2 for n in norms]
        total = math.sqrt(sum(squares))
        return total if math.isfinite(total) else None


class _NotPlanned(Exception):
    """The tensors do not fit a :class:`_HostNormPlan`."""


def _host_accumulate(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


# parameter ids -> their plan (None: their gradients once did not fit it), for the few parameter lists
# a run clips
_HOST_PLANS: dict[tuple[int, ...], _HostNormPlan | None] = {}
_MAX_HOST_PLANS = 16


def _host_plan(key: tuple[int, ...], params: Sequence[Tensor]) -> _HostNormPlan | None:
    if key not in _HOST_PLANS:
        if len(_HOST_PLANS) >= _MAX_HOST_PLANS:
            del _HOST_PLANS[next(iter(_HOST_PLANS))]
        _HOST_PLANS[key] = _HostNormPlan(params)
    return _HOST_PLANS[key]


def _host_result(grads: list[Tensor], total: float | None) -> Tensor:
    if total is not None:
        return torch.tensor(total, dtype=torch.float32)
    per_tensor = tensor_norms(grads)  # float32, with the tensors whose norm overflowed in float64
    return torch.linalg.vector_norm(per_tensor.to(torch.float64)).float()


def total_grad_norm(
    grads: Sequence[Tensor],
    accumulate_dtype: torch.dtype | None = None,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """L2 norm of all tensors taken together, as a 0-d float32 tensor, without a host sync.

    One fused ``torch._foreach_norm`` per device and dtype; the per-tensor norms are combined in float64
    where the device supports it.

    Args:
        grads: the gradients (dense or sparse; no ``None``).
        accumulate_dtype: accumulation dtype of the per-tensor norms; ``None`` picks
            :func:`default_accumulate_dtype` of each tensor's device, except on the CPU itself, where
            reading a value costs no sync: there the norms accumulate in float32 and are combined in
            double precision on the host, and the tensors whose norm overflowed are redone in float64
            (see :func:`~stability_callbacks.stats.tensor_norms`).
        params: the parameters whose gradients ``grads`` are, in the same order. On the CPU, where a
            total norm over hundreds of small gradients costs Python rather than arithmetic, the
            grouping of the gradients by shape is then worked out once per parameter list and reused.
    """
    grads = list(grads)
    if not grads:
        return torch.zeros(())
    if params is not None and len(params) != len(grads):
        raise ValueError(f"`params` has {len(params)} tensors for {len(grads)} gradients")
    host = accumulate_dtype is None and host_reads_are_free(grads[0].device)
    if host and params is not None:  # the common case first: the plan checks what it stacks
        key = tuple(map(id, params))
        plan = _host_plan(key, params)
        try:
            if plan is not None:
                return _host_result(grads, plan.norm(grads))
        except (_NotPlanned, RuntimeError):  # sparse or moved gradients, or a parameter changed shape:
            _HOST_PLANS[key] = None  # checked from now on
    if any(map(_IS_SPARSE, grads)):
        if host and all(host_reads_are_free(g.device) for g in grads):
            return torch.linalg.vector_norm(tensor_norms(grads).to(torch.float64)).float()
        acc = accumulate_dtype or default_accumulate_dtype(grads[0].device)
        return total_norm(grads, 2.0, accumulate_dtype=acc)
    if host and all(map(_IS_CPU, grads)):
        return _host_result(grads, _HostNormPlan(grads).norm(grads))
    out_device = grads[0].device
    parts: list[Tensor] = []
    groups = _group_tensors_by_device_and_dtype([grads])  # type: ignore[list-item]
    for (device, dtype), ((tensors,), _) in groups.items():
        acc = torch.promote_types(accumulate_dtype or default_accumulate_dtype(device), dtype)
        if acc == dtype:
            norms = torch._foreach_norm(tensors, 2.0)  # type: ignore[arg-type]
        else:
            norms = torch._foreach_norm(tensors, 2.0, dtype=acc)  # type: ignore[arg-type]
        parts.append(torch.stack(norms).to(out_device))
    per_tensor = parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts])
    return torch.linalg.vector_norm(per_tensor.to(_wide(out_device))).float()


def clip_coefficient(total: Tensor, max_norm: Tensor | float, eps: float = _CLIP_EPS) -> Tensor:
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

    On the CPU, where reading ``coef`` costs nothing, a coefficient of exactly 1 changes nothing and is
    skipped.
    """
    if host_reads_are_free(coef.device) and coef.item() == 1.0:
        return
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
    accumulate_dtype: torch.dtype | None = None,
) -> ClipDecision:
    """Scale all gradients so that their total norm is at most ``max_norm``, without a host sync.

    Args:
        grads: the gradients (modified in place).
        max_norm: the bound, a float or a 0-d tensor (``inf`` clips nothing).
        total: the total norm if already computed (:func:`total_grad_norm`).
        accumulate_dtype: see :func:`total_grad_norm`.

    Returns:
        The :class:`ClipDecision`; a step with a non-finite norm is left untouched.
    """
    if total is None:
        total = total_grad_norm(grads, accumulate_dtype)
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

    Sparse gradients have their values clamped after coalescing (in place of ``grad._values()``).
    """
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
        self._owner: Tensor | None = None  # plan position of each unit

    def with_clipped_units(self, clip: Tensor) -> list[int]:
        """Plan positions of the tensors with at least one unit set in ``clip`` (``(num_units,)`` bool).

        Reads ``clip`` on the host: for the CPU, where that is free and multiplying only the tensors
        that change saves one kernel call per untouched tensor.
        """
        if self._owner is None:
            rows = torch.tensor(self.rows, dtype=torch.long)
            self._owner = torch.repeat_interleave(torch.arange(len(self.rows)), rows).to(clip.device)
        return torch.unique(self._owner[clip]).tolist()

    def mul_(self, tensors: Sequence[Tensor], views: Sequence[Tensor], clip: Tensor) -> None:
        """Multiply ``tensors`` (input order) in place by ``views`` (plan order, see :meth:`scale_views`),
        whose factors are 1 outside the units set in ``clip``; on the CPU only the tensors with such a
        unit are multiplied (:meth:`with_clipped_units`)."""
        positions = (
            self.with_clipped_units(clip) if host_reads_are_free(clip.device) else range(len(self.order))
        )
        if positions:
            targets = [tensors[self.order[j]] for j in positions]
            torch._foreach_mul_(targets, [views[j] for j in positions])

    @torch.no_grad()
    def norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """Per-unit L2 norms (float32, plan order) of ``tensors`` given in input order."""
        parts: list[Tensor] = []
        for (_, dtype, k), idx in self.groups:
            members = [tensors[i] for i in idx]
            flat = (
                members[0].reshape(-1) if len(members) == 1 else torch._utils._flatten_dense_tensors(members)
            )
            acc = None if dtype == torch.float32 else torch.float32
            parts.append(torch.linalg.vector_norm(flat.view(-1, max(k, 1)), dim=1, dtype=acc))
        for i in self.big:
            t = tensors[i]
            acc = None if t.dtype == torch.float32 else torch.float32
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


def _agc_scale(w_norm: Tensor, g_norm: Tensor, clip_factor: float, eps: float) -> tuple[Tensor, Tensor]:
    """Per-unit scale (1 where unclipped or non-finite) and the clipped-unit mask."""
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
    scale, clip = _agc_scale(w_norm, g_norm, clip_factor, eps)
    plan.mul_(grads, plan.scale_views(scale), clip)  # type: ignore[arg-type]
    return _agc_decision(g_norm, scale, clip, clip_factor)


def _agc_decision(g_norm: Tensor, scale: Tensor, clip: Tensor, clip_factor: float) -> ClipDecision:
    wide = g_norm.to(_wide(g_norm.device))
    pre = torch.linalg.vector_norm(wide)
    post = torch.linalg.vector_norm(wide * scale)
    finite = torch.isfinite(pre)
    return ClipDecision(
        norm_pre=pre.float(),
        norm_post=post.float(),
        threshold=torch.full((), clip_factor, device=g_norm.device),
        coef=torch.where(pre > 0, post / pre, torch.ones_like(pre)).float(),
        clipped=clip.float().mean() if clip.numel() else torch.zeros((), device=g_norm.device),
        finite=finite,
    )


# ----------------------------------------------------------------------------------------------------
# Layer 1: threshold policies (state in device tensors)
# ----------------------------------------------------------------------------------------------------


class PercentilePolicy:
    """AutoClip threshold: the ``percentile``-th percentile of the last ``history`` finite total norms.

    ``step(norm)`` returns the threshold for this step and records ``norm`` (if finite). With
    ``include_current=True`` (the paper's rule) the current norm is recorded first and takes part in the
    percentile; with ``False`` the threshold comes from past norms only and is ``inf`` on the first step,
    the behaviour of ``autoclip``'s ``QuantileClip(global_threshold=True)``. The percentile uses linear
    interpolation, exactly as ``torch.quantile``.

    Args:
        percentile: in ``[0, 100]``.
        history: the ring buffer's length (a positive int).
        include_current: whether the current norm takes part in its own threshold.
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000, include_current: bool = True) -> None:
        if not (isinstance(percentile, (int, float)) and 0.0 <= float(percentile) <= 100.0):
            raise ValueError(f"`percentile` must be in [0, 100], got {percentile!r}")
        if not isinstance(history, int) or isinstance(history, bool) or history <= 0:
            raise ValueError(f"`history` must be a positive int, got {history!r}")
        self.percentile = float(percentile)
        self.history = history
        self.include_current = bool(include_current)
        self.buffer: Tensor | None = None
        self.count: Tensor | None = None
        self._arange: Tensor | None = None

    def _ensure(self, device: torch.device) -> None:
        if self.buffer is None or self.count is None:
            self.buffer = torch.zeros(self.history, dtype=torch.float32, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
        elif self.buffer.device != device:
            self.buffer, self.count = self.buffer.to(device), self.count.to(device)
        if self._arange is None or self._arange.device != device:
            self._arange = torch.arange(self.history, device=device)

    def _record(self, x: Tensor, finite: Tensor) -> None:
        assert self.buffer is not None and self.count is not None
        pos = (self.count % self.history).view(1)
        old = self.buffer.gather(0, pos)
        self.buffer.scatter_(0, pos, torch.where(finite, x, old.view(())).view(1))
        self.count += finite.long()

    def _threshold(self) -> Tensor:
        assert self.buffer is not None and self.count is not None and self._arange is not None
        n = self.count.clamp(max=self.history)
        values = torch.where(self._arange < n, self.buffer, torch.full_like(self.buffer, math.inf))
        ordered = torch.sort(values).values
        q = torch.full((), self.percentile / 100.0, dtype=torch.float32, device=values.device)
        ranks = q * (n - 1).clamp(min=0).float()
        below = ranks.long()
        above = ranks.ceil().long()
        lo = ordered.gather(0, below.view(1)).view(())
        hi = ordered.gather(0, above.view(1)).view(())
        value = lo.lerp(hi, ranks - below)
        return torch.where(n > 0, value, torch.full_like(value, math.inf))

    def step(self, norm: Tensor) -> Tensor:
        """Threshold for a step whose total norm is ``norm`` (0-d float32 tensor); records ``norm``."""
        x = norm.detach().float().reshape(())
        self._ensure(x.device)
        finite = torch.isfinite(x)
        if self.include_current:
            self._record(x, finite)
            return self._threshold()
        threshold = self._threshold()
        self._record(x, finite)
        return threshold

    def state_dict(self) -> dict[str, Any]:
        """Ring buffer (a list of floats) and count (an int); empty before the first step."""
        if self.buffer is None or self.count is None:
            return {}
        return {"buffer": self.buffer.detach().cpu().tolist(), "count": int(self.count.detach().cpu())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a buffer of another length keeps its most recent entries (missing state: fresh start)."""
        if "buffer" not in state:
            self.buffer = self.count = None
            return
        buffer = torch.as_tensor(state["buffer"], dtype=torch.float32).reshape(-1)
        count = torch.as_tensor(state["count"], dtype=torch.int64).reshape(())
        if buffer.numel() != self.history:  # re-lay the saved entries, oldest first, into a new ring
            n = int(min(int(count), buffer.numel()))
            start = int(count) % buffer.numel() if int(count) > buffer.numel() else 0
            ordered = torch.cat([buffer[start:], buffer[:start]])[:n][-self.history :]
            buffer = torch.zeros(self.history)
            buffer[: ordered.numel()] = ordered
            count = torch.tensor(ordered.numel(), dtype=torch.int64)
        self.buffer, self.count = buffer.clone(), count.clone()


class ZScorePolicy:
    """ZClip threshold: z-score of the total norm against an EMA mean and variance, after a warm-up.

    Makes the decisions of the ``zclip`` package (1.0.0) on the same norms, except that a non-finite
    norm is ignored (no clipping, no statistics) instead of poisoning the statistics:

    - warm-up: the first ``warmup_steps`` finite norms are collected; the EMA starts from their mean and
      (population) variance. During warm-up only ``max_grad_norm`` clips, like ``clip_grad_norm_``.
    - ``mode="zscore"``: ``z = (norm - mean) / (std + eps)``; when ``z > z_thresh`` the clip value is
      ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor`` (``clip_option="adaptive_scaling"``) or
      ``mean`` (``clip_option="mean"``).
    - ``mode="percentile"``: the clip value is ``mean + z_thresh * std`` whenever the norm exceeds it.
    - the clip value is capped by ``max_grad_norm``; the gradients are scaled by
      ``value / (norm + 1e-6)`` when ``norm > value``.
    - the EMA is updated with the clip value on a spike (skipped when ``skip_update_on_spike``) and
      with the norm otherwise: ``mean = a*mean + (1-a)*x``, ``var = a*var + (1-a)*(x - mean)**2``.

    Args:
        alpha: EMA smoothing in (0, 1).
        z_thresh: the z-score threshold (> 0).
        max_grad_norm: an absolute cap on the norm, or ``None``.
        warmup_steps: finite norms collected before the EMA starts (>= 1).
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (mode ``"zscore"`` only).
        clip_factor: multiplier of the adaptive threshold (> 0).
        skip_update_on_spike: keep a spike out of the EMA.
        eps: added to the standard deviation in the z-score.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = None,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}")
        if not (isinstance(z_thresh, (int, float)) and z_thresh > 0):
            raise ValueError(f"`z_thresh` must be positive, got {z_thresh!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"`max_grad_norm` must be positive or None, got {max_grad_norm!r}")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 1:
            raise ValueError(f"`warmup_steps` must be an int >= 1, got {warmup_steps!r}")
        if not isinstance(mode, str) or mode.lower() not in ("zscore", "percentile"):
            raise ValueError(f"`mode` must be 'zscore' or 'percentile', got {mode!r}")
        if not isinstance(clip_option, str) or clip_option.lower() not in ("adaptive_scaling", "mean"):
            raise ValueError(f"`clip_option` must be 'adaptive_scaling' or 'mean', got {clip_option!r}")
        if not (isinstance(clip_factor, (int, float)) and clip_factor > 0):
            raise ValueError(f"`clip_factor` must be positive, got {clip_factor!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"`eps` must be >= 0, got {eps!r}")
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.warmup_steps = warmup_steps
        self.mode = mode.lower()
        self.clip_option = clip_option.lower()
        self.clip_factor = float(clip_factor)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.eps = float(eps)
        self.buffer: Tensor | None = None
        self.count: Tensor | None = None
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    _KEYS = ("buffer", "count", "mean", "var")

    def _ensure(self, device: torch.device) -> None:
        if self.buffer is None:
            dtype = _wide(device)
            self.buffer = torch.zeros(self.warmup_steps, dtype=dtype, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
            self.mean = torch.zeros((), dtype=dtype, device=device)
            self.var = torch.zeros((), dtype=dtype, device=device)
        elif self.buffer.device != device:  # restored from a checkpoint
            for key in self._KEYS:
                t = getattr(self, key)
                setattr(self, key, t.to(device) if key == "count" else t.to(device, _wide(device)))

    def step(self, norm: Tensor) -> ClipDecision:
        """Decide the clipping of a step whose total norm is ``norm`` and update the statistics.

        Returns a :class:`ClipDecision` whose ``coef`` is the factor to apply to the gradients
        (``norm_post`` = ``norm_pre * coef``; ``threshold`` = the norm above which this step clips).
        """
        norm32 = norm.detach().float().reshape(())
        self._ensure(norm32.device)
        assert self.buffer is not None and self.count is not None
        assert self.mean is not None and self.var is not None
        if host_reads_are_free(norm32.device):
            return self._step_on_host(norm32, self.buffer, int(self.count.item()), self.mean, self.var)
        dtype = self.buffer.dtype
        x = norm32.to(dtype)
        finite = torch.isfinite(x)
        xs = torch.where(finite, x, torch.zeros_like(x))
        one = torch.ones_like(xs)
        active = self.count >= self.warmup_steps  # the EMA is initialised

        # Warm-up: collect the norm; initialise the EMA when the buffer is full.
        record = ~active & finite
        pos = self.count.clamp(max=self.warmup_steps - 1).view(1)
        old = self.buffer.gather(0, pos).view(())
        self.buffer.scatter_(0, pos, torch.where(record, xs, old).view(1))
        count = self.count + record.long()
        just_full = record & (count == self.warmup_steps)
        init_mean = self.buffer.sum() / self.warmup_steps
        init_var = (self.buffer - init_mean).square().sum() / self.warmup_steps

        # Active: spike detection against the statistics before this step.
        std = self.var.sqrt()
        if self.mode == "percentile":
            spike_level = self.mean + self.z_thresh * std
            spike = xs > spike_level
            clip_value = spike_level
        else:
            z = (xs - self.mean) / (std + self.eps)
            spike_level = self.mean + self.z_thresh * (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh
                clip_value = (self.mean + (self.z_thresh * std) / eta) * self.clip_factor
            else:
                clip_value = self.mean
        adaptive = torch.where(spike, clip_value, xs)
        effective = adaptive if self.max_grad_norm is None else adaptive.clamp(max=self.max_grad_norm)
        over = xs > effective
        coef_active = torch.where(over, effective / (xs + _CLIP_EPS), one)
        level = spike_level if self.max_grad_norm is None else spike_level.clamp(max=self.max_grad_norm)

        # EMA update.
        value = torch.where(spike, clip_value, xs)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * value
        new_var = self.alpha * self.var + (1 - self.alpha) * (value - new_mean).square()
        update = active & finite
        if self.skip_update_on_spike:
            update = update & ~spike
        self.mean = torch.where(just_full, init_mean, torch.where(update, new_mean, self.mean))
        self.var = torch.where(just_full, init_var, torch.where(update, new_var, self.var))
        self.count = count

        # Warm-up clipping: only the cap, with clip_grad_norm_'s clamped coefficient.
        if self.max_grad_norm is None:
            coef_warm, level_warm, over_warm = one, torch.full_like(xs, math.inf), torch.zeros_like(finite)
        else:
            coef_warm = torch.clamp(self.max_grad_norm / (xs + _CLIP_EPS), max=1.0)
            level_warm = torch.full_like(xs, self.max_grad_norm)
            over_warm = xs > self.max_grad_norm
        coef = torch.where(finite, torch.where(active, coef_active, coef_warm), one).float()
        threshold = torch.where(active, level, level_warm).float()
        clipped = finite & torch.where(active, over, over_warm)
        return ClipDecision(
            norm_pre=norm32,
            norm_post=norm32 * coef,
            threshold=threshold,
            coef=coef,
            clipped=clipped.float(),
            finite=finite,
        )

    def _step_on_host(
        self, norm32: Tensor, buffer: Tensor, count: int, mean_t: Tensor, var_t: Tensor
    ) -> ClipDecision:
        """:meth:`step` on the CPU, where reading the state is free: the same float64 arithmetic, branched
        in Python instead of a few dozen masked tensor operations (the decisions are identical)."""
        x = norm32.item()
        finite = math.isfinite(x)
        mean, var = mean_t.item(), var_t.item()
        cap = self.max_grad_norm
        coef, clipped = 1.0, False
        if count < self.warmup_steps:  # warm-up: only the cap clips
            threshold = math.inf if cap is None else cap
            if finite:
                buffer[count] = x
                self.count = torch.tensor(count + 1)
                if count + 1 == self.warmup_steps:  # the EMA starts from the buffer's mean and variance
                    init_mean = buffer.sum() / self.warmup_steps
                    self.mean, self.var = init_mean, (buffer - init_mean).square().sum() / self.warmup_steps
                if cap is not None:
                    coef, clipped = min(cap / (x + _CLIP_EPS), 1.0), x > cap
        else:
            std = math.sqrt(var)
            if self.mode == "percentile":
                spike_level = mean + self.z_thresh * std
            else:
                spike_level = mean + self.z_thresh * (std + self.eps)
            threshold = spike_level if cap is None else min(spike_level, cap)
            if finite:
                if self.mode == "percentile":
                    spike, clip_value = x > spike_level, spike_level
                else:
                    scale = std + self.eps
                    # IEEE division, as on the device: x / 0 is +-inf, 0 / 0 is NaN (no spike)
                    z = (x - mean) / scale if scale > 0 else (x - mean) * math.inf
                    spike = z > self.z_thresh
                    clip_value = mean
                    if spike and self.clip_option == "adaptive_scaling":  # z > z_thresh > 0: no zero division
                        clip_value = (mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
                effective = clip_value if spike else x
                if cap is not None:
                    effective = min(effective, cap)
                if x > effective:
                    coef, clipped = effective / (x + _CLIP_EPS), True
                if not (spike and self.skip_update_on_spike):
                    value = clip_value if spike else x
                    new_mean = self.alpha * mean + (1 - self.alpha) * value
                    deviation = value - new_mean
                    new_var = self.alpha * var + (1 - self.alpha) * (deviation * deviation)
                    self.mean = torch.tensor(new_mean, dtype=mean_t.dtype)
                    self.var = torch.tensor(new_var, dtype=var_t.dtype)
        coef_t = torch.tensor(coef, dtype=torch.float32)
        return ClipDecision(
            norm_pre=norm32,
            norm_post=norm32 * coef_t,
            threshold=torch.tensor(threshold, dtype=torch.float32),
            coef=coef_t,
            clipped=torch.tensor(float(clipped)),
            finite=torch.tensor(finite),
        )

    def state_dict(self) -> dict[str, Any]:
        """Warm-up buffer, count, EMA mean and variance as plain numbers; empty before the first step."""
        if self.buffer is None:
            return {}
        return {key: getattr(self, key).detach().cpu().tolist() for key in self._KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the statistics (missing state: fresh start)."""
        if not all(key in state for key in self._KEYS) or len(state["buffer"]) != self.warmup_steps:
            self.buffer = self.count = self.mean = self.var = None
            return
        wide = torch.float64
        self.buffer = torch.tensor(state["buffer"], dtype=wide)
        self.count = torch.tensor(int(state["count"]), dtype=torch.int64)
        self.mean = torch.tensor(float(state["mean"]), dtype=wide)
        self.var = torch.tensor(float(state["var"]), dtype=wide)


# ----------------------------------------------------------------------------------------------------
# Layer 2: callbacks
# ----------------------------------------------------------------------------------------------------

_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


def check_clipping_setup(trainer: pl.Trainer, name: str) -> None:
    """Raise a clear error where a clipping callback cannot be correct (called at setup)."""
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val:
        raise MisconfigurationException(
            f"{name} clips the gradients itself; remove `Trainer(gradient_clip_val={clip_val})` (both would "
            "clip the same step, and Lightning's clipping would run after this callback's)."
        )
    if isinstance(trainer.strategy, _SHARDED):
        raise MisconfigurationException(
            f"{name} does not support the sharded strategy {type(trainer.strategy).__name__}: each rank "
            "holds a shard of the gradients, so the local norm is not the global one. Use DDP, or clip "
            "with the strategy's own `clip_grad_norm_`."
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


def _check_log_every(log_every_n_steps: int | None) -> None:
    if log_every_n_steps is not None and (
        not isinstance(log_every_n_steps, int) or isinstance(log_every_n_steps, bool) or log_every_n_steps < 1
    ):
        raise ValueError(f"`log_every_n_steps` must be a positive int or None, got {log_every_n_steps!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_AGCPlan = tuple[UnitwisePlan, Tensor, list[Tensor], Tensor]  # plan, clip mask, scale views, scale buffer


def _norm_of(grads: list[Tensor], params: list[Tensor], norm: Tensor | None) -> Tensor:
    return norm if norm is not None else total_grad_norm(grads, params=params)


class _ClipCallback(StabilityCallback):
    """Shared plumbing of the clipping callbacks: checks, gradient gathering, counters, logging, state."""

    modifies_gradients = True

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        _check_log_every(log_every_n_steps)
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
            self._clip_step(trainer, pl_module, params, grads)

    def _clip_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: list[Tensor],
        grads: list[Tensor],
        norm: Tensor | None = None,
    ) -> None:
        """The step on gathered gradients (a composing callback passes the total norm it already has)."""
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
        every: int = self.log_every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 0
        if trainer.loggers and every and is_logging_step(trainer, every):
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


_LOG_TABLE = """
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


class NormClip(_ClipCallback):
    """Clip the total gradient norm to a fixed ``max_norm`` (``gradient_clip_val``, observable and sync-free).

    Args:
        max_norm: the bound on the total L2 norm (> 0).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
        threshold="``max_norm``",
        coef="factor applied to the gradients (1 when untouched)",
        clipped="1.0 when the norm exceeded the threshold",
    )

    def __init__(self, max_norm: float = 1.0, log_every_n_steps: int | None = None) -> None:
        if not (isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) and max_norm > 0):
            raise ValueError(f"`max_norm` must be a positive number, got {max_norm!r}")
        super().__init__(log_every_n_steps)
        self.max_norm = float(max_norm)

    @property
    def _key_args(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        return clip_grad_norm_to(grads, self.max_norm, total=_norm_of(grads, params, norm))


class ValueClip(_ClipCallback):
    """Clamp every gradient element to ``[-max_value, max_value]``, with logging.

    Clamping turns an infinite gradient element into ``±max_value``: put :class:`NonFiniteGuard` before
    this callback in the callback list so it still sees the infinity (AMP's GradScaler detects it
    before any callback runs).

    Args:
        max_value: the bound on each element's magnitude (> 0).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's. The norms
            are only computed on logging steps.
    """

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
        threshold="``max_value``",
        coef="``norm_post / norm_pre``",
        clipped="1.0 when some element was clamped",
    )

    def __init__(self, max_value: float = 1.0, log_every_n_steps: int | None = None) -> None:
        if not (isinstance(max_value, (int, float)) and not isinstance(max_value, bool) and max_value > 0):
            raise ValueError(f"`max_value` must be a positive number, got {max_value!r}")
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
        pre = total_grad_norm(grads, params=params)
        clip_grad_value_(grads, self.max_value)
        post = total_grad_norm(grads, params=params)
        finite = torch.isfinite(pre)
        return ClipDecision(
            norm_pre=pre,
            norm_post=post,
            threshold=torch.full((), self.max_value, device=device),
            coef=torch.where(pre > 0, post / pre, torch.ones_like(pre)),
            clipped=(finite & (post < pre)).float(),
            finite=finite,
        )


class AutoClip(_ClipCallback):
    """AutoClip (Seetharaman et al. 2020): clip to a percentile of the history of total gradient norms.

    With ``include_current=False`` it makes the same decisions as ``autoclip``'s
    ``QuantileClip(quantile=percentile / 100, history_length=history, global_threshold=True)``.
    Non-finite norms are neither clipped nor recorded.

    Args:
        percentile: the percentile of past norms used as the threshold, in ``[0, 100]``.
        history: how many past norms are kept (a ring buffer, > 0).
        include_current: whether the current norm takes part in its own threshold (the paper's rule).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
        threshold="the percentile of the norm history (``inf`` before the first norm)",
        coef="factor applied to the gradients (1 when untouched)",
        clipped="1.0 when the norm exceeded the threshold",
    )

    def __init__(
        self,
        percentile: float = 10.0,
        history: int = 1000,
        include_current: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.policy = PercentilePolicy(percentile, history, include_current)
        super().__init__(log_every_n_steps)

    @property
    def _key_args(self) -> dict[str, Any]:
        p = self.policy
        return {"percentile": p.percentile, "history": p.history, "include_current": p.include_current}

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        norm = _norm_of(grads, params, norm)
        return clip_grad_norm_to(grads, self.policy.step(norm), total=norm)

    def _extra_state(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state.get("policy", {}))


class ZClip(_ClipCallback):
    """ZClip (Kumar et al. 2025): clip total-norm spikes detected by a z-score against EMA statistics.

    Configured like the ``zclip`` package (1.0.0) it makes the same decisions on the same gradients;
    unlike it, a non-finite norm never enters the statistics (the package's turn NaN for good), the
    statistics survive resume, and nothing syncs the host. See :class:`ZScorePolicy` for the rule.

    Args:
        alpha: EMA smoothing in (0, 1).
        z_thresh: z-score threshold (> 0).
        max_grad_norm: absolute cap on the norm, or ``None`` (the package's default is 1.0).
        warmup_steps: finite norms collected before the EMA starts (>= 1).
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (mode ``"zscore"``).
        clip_factor: multiplier of the adaptive threshold (> 0).
        skip_update_on_spike: keep spikes out of the EMA.
        eps: added to the standard deviation in the z-score.
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
        threshold="norm above which this step is clipped (spike level, capped by ``max_grad_norm``)",
        coef="factor applied to the gradients (1 when untouched)",
        clipped="1.0 when the step was clipped",
    )

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = None,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.policy = ZScorePolicy(
            alpha,
            z_thresh,
            max_grad_norm,
            warmup_steps,
            mode,
            clip_option,
            clip_factor,
            skip_update_on_spike,
            eps,
        )
        super().__init__(log_every_n_steps)

    @property
    def _key_args(self) -> dict[str, Any]:
        p = self.policy
        return {
            "alpha": p.alpha,
            "z_thresh": p.z_thresh,
            "max_grad_norm": p.max_grad_norm,
            "warmup_steps": p.warmup_steps,
            "mode": p.mode,
            "clip_option": p.clip_option,
            "clip_factor": p.clip_factor,
            "skip_update_on_spike": p.skip_update_on_spike,
        }

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        decision = self.policy.step(_norm_of(grads, params, norm))
        scale_grads_(grads, decision.coef)
        return decision

    def _extra_state(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state.get("policy", {}))


class AGC(_ClipCallback):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021), fused across parameters.

    With ``exclude=[]`` the gradients equal those of ``timm.utils.agc.adaptive_clip_grad``. Sparse
    gradients are left alone.

    Args:
        clip_factor: largest allowed ratio of a unit's gradient norm to its weight norm (> 0).
        eps: floor of the weight norm (>= 0), so zero-initialised units still train.
        exclude: ``None`` leaves out the final classifier layer (the last module with parameters to run
            in the first training step's forward pass), as the paper does; ``[]`` clips everything;
            otherwise ``fnmatch`` patterns on parameter names (``"head.*"``).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
        threshold="``clip_factor``",
        coef="``norm_post / norm_pre``",
        clipped="fraction of the units (rows, output channels) that were clipped",
    )

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude: Sequence[str] | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        if not (
            isinstance(clip_factor, (int, float)) and not isinstance(clip_factor, bool) and clip_factor > 0
        ):
            raise ValueError(f"`clip_factor` must be a positive number, got {clip_factor!r}")
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps >= 0):
            raise ValueError(f"`eps` must be a number >= 0, got {eps!r}")
        if exclude is not None and (isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude)):
            raise ValueError(f"`exclude` must be None or a list of fnmatch patterns, got {exclude!r}")
        super().__init__(log_every_n_steps)
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.exclude = None if exclude is None else list(exclude)
        self.excluded_names: list[str] | None = None  # resolved parameter names
        self._cache_order: ExitStack | None = None
        self._cache_order_list: list[str] | None = None
        self._cache_plan: dict[tuple[int, ...], tuple[UnitwisePlan, Tensor, list[Tensor], Tensor]] | None = (
            None
        )

    @property
    def _key_args(self) -> dict[str, Any]:
        return {"clip_factor": self.clip_factor, "eps": self.eps, "exclude": self.exclude}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.exclude is None and self.excluded_names is None and self._cache_order is None:
            stack = ExitStack()
            self._cache_order_list = stack.enter_context(forward_order(pl_module))
            self._cache_order = stack

    def _close_order(self, pl_module: nn.Module) -> None:
        if self._cache_order is None:
            return
        self._cache_order.close()
        order = self._cache_order_list or []
        self._cache_order = self._cache_order_list = None
        if not order:
            return
        final = pl_module.get_submodule(order[-1])
        prefix = f"{order[-1]}." if order[-1] else ""
        self.excluded_names = [prefix + n for n, _ in final.named_parameters(recurse=False)]
        self._cache_plan = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._close_order(pl_module)

    def _excluded(self, name: str) -> bool:
        if self.exclude is None:
            return name in (self.excluded_names or [])
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def _plan(self, params: list[Tensor], pl_module: nn.Module) -> _AGCPlan:
        key = tuple(id(p) for p in params)
        if self._cache_plan is None:
            self._cache_plan = {}
        if key not in self._cache_plan:
            if len(self._cache_plan) > 8:
                self._cache_plan.clear()
            names = {id(p): n for n, p in pl_module.named_parameters()}
            plan = UnitwisePlan(params)
            mask = torch.cat(
                [
                    torch.full((rows,), not self._excluded(names.get(id(params[i]), "")), dtype=torch.bool)
                    for i, rows in zip(plan.order, plan.rows, strict=True)
                ]
            ).to(plan.device)
            buffer = torch.ones(plan.num_units, device=plan.device)
            self._cache_plan[key] = (plan, mask, plan.scale_views(buffer), buffer)
        return self._cache_plan[key]

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        self._close_order(pl_module)  # the forward pass of the first step has run
        dense = [p for p in params if not p.grad.is_sparse]  # type: ignore[union-attr]
        if not dense:
            zero = torch.zeros((), device=params[0].device)
            return ClipDecision(zero, zero, zero, zero + 1, zero, torch.ones((), dtype=torch.bool))
        plan, mask, views, buffer = self._plan(dense, pl_module)
        dgrads = [p.grad for p in dense]
        w_norm = plan.norms(dense)
        g_norm = plan.norms(dgrads)  # type: ignore[arg-type]
        scale, clip = _agc_scale(w_norm, g_norm, self.clip_factor, self.eps)
        clip = clip & mask
        scale = torch.where(mask, scale, torch.ones_like(scale))
        buffer.copy_(scale)
        plan.mul_(dgrads, views, clip)  # type: ignore[arg-type]
        return _agc_decision(g_norm, scale, clip, self.clip_factor)

    def _extra_state(self) -> dict[str, Any]:
        return {"excluded_names": list(self.excluded_names or [])} if self.excluded_names is not None else {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "excluded_names" in state:
            self.excluded_names = list(state["excluded_names"])
            self._cache_plan = None
