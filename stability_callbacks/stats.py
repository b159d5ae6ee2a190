"""Fused per-tensor statistics: L2 norm, max-abs, mean-abs and non-finite counts.

Everything here is plain PyTorch (no Lightning) and host-sync free: results stay tensors on the
device of the inputs. Tensors are grouped by ``(device, dtype)`` and each statistic is one
``torch._foreach_norm`` call per group, so the cost does not grow with the number of tensors beyond
the kernels themselves.

Norms accumulate in float64 where the device has it and are returned as float32, so every finite
float32 gradient gets its true norm: neither 1e-25 (whose square underflows float32) nor 1e20 (whose
square overflows it) is lost. On devices without float64 (MPS, XLA) each tensor is divided by its
largest magnitude before the sum of squares, as BLAS ``nrm2`` does. This module is the one place where
norms of gradients are computed; every callback and function of the library uses it.

Example, from a plain PyTorch loop::

    loss.backward()
    norms = gradient_norms(model)  # {"encoder.0": tensor(0.31), ..., "head": tensor(1.2)}
    total = total_norm([p.grad for p in model.parameters()])
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # DTensor: the gradients of FSDP2 (fully_shard) and tensor parallelism
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # a build of torch without torch.distributed
    DTensor = Replicate = None  # type: ignore[assignment,misc]

__all__ = [
    "LayerIndex",
    "TensorStats",
    "combine_norms",
    "gradient_norms",
    "layer_norms",
    "local_tensor",
    "nonfinite_counts",
    "reduce_over_shards",
    "reduce_total_norm",
    "shard_groups",
    "tensor_norms",
    "tensor_stats",
    "total_norm",
    "user_name",
    "wide_dtype",
]

_NO_FLOAT64 = frozenset({"mps", "xla"})

WRAPPER_NAMES = frozenset({"_orig_mod", "_checkpoint_wrapped_module"})
"""Attribute names of transparent wrappers that own no parameters: ``torch.compile``'s ``OptimizedModule``
keeps the model in ``_orig_mod``, activation checkpointing's ``CheckpointWrapper`` in
``_checkpoint_wrapped_module``."""


def user_name(name: str) -> str:
    """The dotted module or parameter name as the user wrote it, without wrapper segments.

    ``model._orig_mod.conv1.weight`` (a submodule compiled with ``torch.compile``) becomes
    ``model.conv1.weight``, so compiled and eager runs log the same keys. Every name the library logs
    goes through this function.
    """
    if not any(w in name for w in WRAPPER_NAMES):
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype statistics accumulate in on ``device``: float64, or float32 where the device has none."""
    return torch.float32 if device.type in _NO_FLOAT64 else torch.float64


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds: the local shard of a DTensor (a partial sum is completed
    first), ``t`` itself otherwise. In-place changes to it change ``t``."""
    if DTensor is not None and isinstance(t, DTensor):
        if any(p.is_partial() for p in t.placements):
            t = t.redistribute(placements=[Replicate() if p.is_partial() else p for p in t.placements])
        return t.to_local()
    return t


def _shard_groups(tensors: Sequence[Tensor | None]) -> dict[dist.ProcessGroup, list[int]]:
    """For each process group over which some of the DTensors are sharded, their positions."""
    groups: dict[dist.ProcessGroup, list[int]] = {}
    if DTensor is None:
        return groups
    for i, t in enumerate(tensors):
        if isinstance(t, DTensor):
            for mesh_dim, placement in enumerate(t.placements):
                if placement.is_shard():
                    groups.setdefault(t.device_mesh.get_group(mesh_dim), []).append(i)
    return groups


def _reduce_over_shards(
    values: Tensor, shards: Mapping[dist.ProcessGroup, Sequence[int] | Tensor], op: Any
) -> Tensor:
    """All-reduce the entries of ``values`` at each group's positions over that group (one collective per
    group: a single one under FSDP2), so that per-shard sums or maxima become those of whole tensors.
    Positions given as an int64 tensor on the device of ``values`` save a host-to-device copy a call."""
    for group, positions in shards.items():
        index = positions if isinstance(positions, Tensor) else torch.tensor(positions, device=values.device)
        part = values.index_select(0, index)
        dist.all_reduce(part, op=op, group=group)
        values = values.index_copy(0, index, part)
    return values


# Public names for the other layer-1 modules that reduce per-tensor rows over DTensor shards (histograms).
shard_groups = _shard_groups
reduce_over_shards = _reduce_over_shards


def _dense(t: Tensor) -> Tensor:
    """Detached dense view of a tensor's stored values (the coalesced values of a sparse tensor)."""
    t = t.detach()
    if t.is_sparse:
        return t.coalesce().values()
    return t


def _groups(tensors: Sequence[Tensor | None]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the non-empty tensors grouped by device and dtype."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if t is not None and t.numel() > 0:
            groups[(t.device, t.dtype)].append(i)
    return groups


def _out_device(tensors: Sequence[Tensor | None], device: torch.device | None) -> torch.device:
    if device is not None:
        return device
    for t in tensors:
        if t is not None:
            return t.device
    return torch.device("cpu")


def tensor_norms(
    tensors: Sequence[Tensor | None], norm_type: float = 2.0, device: torch.device | None = None
) -> Tensor:
    """Per-tensor vector norms in one fused pass per device and dtype, exact for finite float32 values.

    Args:
        tensors: the tensors; ``None`` and empty tensors get a norm of 0. Sparse tensors use their
            coalesced values.
        norm_type: the order of the norm (``2.0``, ``1.0``, ``math.inf``...).
        device: where the result lives; defaults to the device of the first tensor.

    Returns:
        A float32 tensor of shape ``(len(tensors),)``.

    DTensors (FSDP2, tensor parallelism) get the norm of the whole tensor: each rank takes the norm of
    its shard and the powers are summed (maxima taken) over the mesh, one collective for all tensors
    sharded over the same process group. Every rank must then call this with the same tensors.
    """
    shards = _shard_groups(tensors)
    if shards:
        tensors = [None if t is None else local_tensor(t) for t in tensors]
    out = _local_norms(tensors, norm_type, device)
    if not shards:
        return out
    if math.isinf(norm_type):
        return _reduce_over_shards(out, shards, dist.ReduceOp.MAX)
    powers = out.to(wide_dtype(out.device)).pow(norm_type)
    return _reduce_over_shards(powers, shards, dist.ReduceOp.SUM).pow(1.0 / norm_type).float()


def _local_norms(tensors: Sequence[Tensor | None], norm_type: float, device: torch.device | None) -> Tensor:
    out_device = _out_device(tensors, device)
    groups = _groups(tensors)
    if len(groups) == 1:
        (idx,) = groups.values()
        if len(idx) == len(tensors):  # the common case: one device, one dtype, nothing missing
            dense = [_dense(t) for t in tensors]  # type: ignore[arg-type]
            return _group_norms(dense, norm_type).to(out_device)
    out = torch.zeros(len(tensors), dtype=torch.float32, device=out_device)
    for idx in groups.values():
        values = _group_norms([_dense(tensors[i]) for i in idx], norm_type)  # type: ignore[arg-type]
        out[torch.tensor(idx, device=out_device)] = values.to(out_device, non_blocking=True)
    return out


def _group_norms(group: list[Tensor], norm_type: float) -> Tensor:
    """Norms (float32) of tensors that share a device and a dtype: one ``torch._foreach_norm``."""
    if math.isinf(norm_type):  # a max needs no wider accumulator
        return torch.stack(torch._foreach_norm(group, norm_type)).float()
    dtype = group[0].dtype
    wide = wide_dtype(group[0].device)
    if wide == torch.float64:
        if dtype == torch.float64:
            return torch.stack(torch._foreach_norm(group, norm_type)).float()
        return torch.stack(torch._foreach_norm(group, norm_type, dtype=torch.float64)).float()
    # No float64 on this device: divide each tensor by its largest magnitude before the sum of powers.
    largest = torch.stack(torch._foreach_norm(group, math.inf)).float()
    scale = largest.clamp_min(_TINY)
    scaled = torch._foreach_div([t.float() for t in group], list(scale.unbind()))
    norms = torch.stack(torch._foreach_norm(scaled, norm_type)) * scale
    return torch.where(torch.isinf(largest), largest, norms)  # inf / inf would be NaN


_TINY = torch.finfo(torch.float32).tiny


def _scaled(values: Tensor) -> tuple[Tensor, Tensor]:
    """``values`` in float32 divided by their largest magnitude, and that magnitude (no-float64 devices)."""
    values = values.float()
    scale = values.abs().max().clamp_min(_TINY) if values.numel() else values.new_ones(())
    return values / scale, scale


def combine_norms(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """The norm of tensors taken together from their per-tensor norms (a 0-d float32 tensor).

    ``(sum norms**p) ** (1/p)`` for a p-norm, accumulated in the wide dtype (scaled by the largest norm
    where the device has no float64); the max for the inf-norm; 0 for no tensors.
    """
    if math.isinf(norm_type) or not norms.numel():
        return norms.max().float() if norms.numel() else norms.new_zeros((), dtype=torch.float32)
    if wide_dtype(norms.device) == torch.float64:
        return torch.linalg.vector_norm(norms.double(), norm_type).float()
    scaled, scale = _scaled(norms)
    return torch.where(torch.isinf(scale), scale, torch.linalg.vector_norm(scaled, norm_type) * scale)


def nonfinite_counts(tensors: Sequence[Tensor | None], device: torch.device | None = None) -> Tensor:
    """Number of NaN and infinite values in each tensor (int64, ``None`` and empty give 0).

    One small kernel per tensor: meant for logging steps, or after :func:`tensor_norms` has shown a
    non-finite norm. Detecting *whether* a tensor has a non-finite value is free from its norm. DTensors
    are counted whole (summed over the mesh, as in :func:`tensor_norms`); pass ``local_tensor(t)`` to
    count this rank's shard alone.
    """
    shards = _shard_groups(tensors)
    if shards:
        tensors = [None if t is None else local_tensor(t) for t in tensors]
    out_device = _out_device(tensors, device)
    out = torch.zeros(len(tensors), dtype=torch.int64, device=out_device)
    for idx in _groups(tensors).values():
        counts = [torch.isfinite(_dense(tensors[i])).logical_not_().sum() for i in idx]  # type: ignore[arg-type]
        out[torch.tensor(idx, device=out_device)] = torch.stack(counts).to(out_device)
    return _reduce_over_shards(out, shards, dist.ReduceOp.SUM) if shards else out


@dataclass(frozen=True)
class TensorStats:
    """Per-tensor statistics, each a float32 (``nonfinite``: int64) tensor of shape ``(n,)``.

    Attributes:
        l2: L2 norm of each tensor (non-finite if the tensor holds a NaN or an inf).
        max_abs: largest absolute value.
        mean_abs: mean absolute value (from the float32 L1 norm: inf if that sum exceeds float32).
        numel: number of stored values (float32, so ratios need no cast).
        nonfinite: number of NaN and infinite values.
    """

    l2: Tensor
    max_abs: Tensor
    mean_abs: Tensor
    numel: Tensor
    nonfinite: Tensor


def tensor_stats(tensors: Sequence[Tensor | None], device: torch.device | None = None) -> TensorStats:
    """L2 norm, max-abs, mean-abs and non-finite count of every tensor, without a host sync.

    Args:
        tensors: the tensors; ``None`` and empty tensors give zeros.
        device: where the results live; defaults to the device of the first tensor.
    """
    out_device = _out_device(tensors, device)
    numel = torch.tensor(
        [0 if t is None else _dense(t).numel() for t in tensors], dtype=torch.float32, device=out_device
    )
    l1 = tensor_norms(tensors, 1.0, out_device)
    return TensorStats(
        l2=tensor_norms(tensors, 2.0, out_device),
        max_abs=tensor_norms(tensors, math.inf, out_device),
        mean_abs=l1 / numel.clamp_min(1.0),
        numel=numel,
        nonfinite=nonfinite_counts(tensors, out_device),
    )


def total_norm(
    tensors: Iterable[Tensor | None],
    norm_type: float = 2.0,
    sharded: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The norm of all tensors taken together, as a 0-d float32 tensor (no host sync).

    Args:
        tensors: the tensors (``None`` is skipped; dense or sparse).
        norm_type: the order of the norm.
        sharded: set when each rank holds a different shard of the tensors (FSDP, ZeRO): the local
            norms are combined across ``group`` (sum of powers for p-norms, max for the inf-norm).
            Leave unset under data parallelism, where every rank holds the whole (averaged) gradient.
        group: the process group of the shards; the default group if ``None``.
    """
    tensors = list(tensors)
    local = combine_norms(tensor_norms(tensors, norm_type), norm_type)
    if sharded:
        return reduce_total_norm(local, norm_type, group)
    return local


def reduce_total_norm(
    local_norm: Tensor, norm_type: float = 2.0, group: dist.ProcessGroup | None = None
) -> Tensor:
    """Combine per-rank norms of disjoint shards into the norm of the whole (all-reduce).

    Returns ``local_norm`` as float32 when torch.distributed is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return local_norm.float()
    if math.isinf(norm_type):
        value = local_norm.detach().float().clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return value
    value = local_norm.detach().to(wide_dtype(local_norm.device)).pow(norm_type)
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value.pow(1.0 / norm_type).float()


@dataclass(frozen=True)
class LayerIndex:
    """Which trainable parameter belongs to which layer, so per-layer statistics are one scatter-add.

    A layer is a module that owns parameters directly; parameters owned by the root module form a
    layer named after the parameter. With ``per="parameter"`` every parameter is its own layer. Names
    are the user's (:func:`user_name`: no ``_orig_mod.`` of a compiled submodule).

    Attributes:
        layer_names: dotted module names (or parameter names), one per layer.
        param_names: dotted parameter names.
        params: the parameters, in the order of ``param_names``.
        layer_of: for each parameter, the position of its layer in ``layer_names``.
    """

    layer_names: list[str]
    param_names: list[str]
    params: list[nn.Parameter]
    layer_of: list[int]

    @classmethod
    def build(cls, module: nn.Module, per: str = "layer", trainable_only: bool = True) -> LayerIndex:
        """Index the parameters of ``module`` (``per`` is ``"layer"`` or ``"parameter"``)."""
        if per not in ("layer", "parameter"):
            raise ValueError(f"`per` must be 'layer' or 'parameter', got {per!r}")
        layer_names: list[str] = []
        param_names: list[str] = []
        params: list[nn.Parameter] = []
        layer_of: list[int] = []
        seen: set[int] = set()
        for raw_name, mod in module.named_modules():
            mod_name = user_name(raw_name)
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) in seen or (trainable_only and not p.requires_grad):
                    continue
                seen.add(id(p))
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                layer = full if (per == "parameter" or not mod_name) else mod_name
                if not layer_names or layer_names[-1] != layer:
                    if layer in layer_names:
                        layer_of.append(layer_names.index(layer))
                    else:
                        layer_names.append(layer)
                        layer_of.append(len(layer_names) - 1)
                else:
                    layer_of.append(len(layer_names) - 1)
                param_names.append(full)
                params.append(p)
        return cls(layer_names, param_names, params, layer_of)

    def layer_of_on(self, device: torch.device) -> Tensor:
        """:attr:`layer_of` as an int64 tensor on ``device``, made once per device and kept, so a caller
        on every step does not copy it from the host every step."""
        cache: dict[torch.device, Tensor] = self.__dict__.setdefault("_layer_of_on", {})
        if device not in cache:
            cache[device] = torch.tensor(self.layer_of, dtype=torch.long, device=device)
        return cache[device]

    def reorder(self, layer_order: Sequence[str]) -> LayerIndex:
        """The same index with layers sorted by ``layer_order`` (unknown layers go last, in place)."""
        rank = {name: i for i, name in enumerate(layer_order)}
        order = sorted(
            range(len(self.layer_names)), key=lambda i: (rank.get(self.layer_names[i], len(rank)), i)
        )
        new_pos = {old: new for new, old in enumerate(order)}
        return LayerIndex(
            [self.layer_names[i] for i in order],
            self.param_names,
            self.params,
            [new_pos[i] for i in self.layer_of],
        )


def layer_norms(per_param_l2: Tensor, index: LayerIndex) -> Tensor:
    """Combine per-parameter L2 norms into per-layer L2 norms (sqrt of the sum of squares, in the wide
    dtype; scaled by the largest norm where the device has no float64)."""
    layer_of = index.layer_of_on(per_param_l2.device)
    if wide_dtype(per_param_l2.device) == torch.float64:
        acc, scale = per_param_l2.double(), per_param_l2.new_ones((), dtype=torch.float64)
    else:
        acc, scale = _scaled(per_param_l2)
    squares = acc.square()
    sums = squares.new_zeros(len(index.layer_names)).index_add_(0, layer_of, squares)
    return (sums.sqrt() * scale).float()


def gradient_norms(module: nn.Module, per: str = "layer") -> dict[str, Tensor]:
    """L2 norm of the gradients of each layer (or parameter) of ``module``, for plain PyTorch loops.

    Layers whose parameters have no gradient are left out. Values are 0-d device tensors; call
    ``.item()`` only where you log. The total norm is :func:`total_norm` of the same gradients.

    Args:
        module: the model, after ``backward()``.
        per: ``"layer"`` (modules that own parameters) or ``"parameter"``.
    """
    index = LayerIndex.build(module, per=per)
    grads = [p.grad for p in index.params]
    norms = layer_norms(tensor_norms(grads), index)
    has_grad = [False] * len(index.layer_names)
    for g, layer in zip(grads, index.layer_of, strict=True):
        has_grad[layer] = has_grad[layer] or g is not None
    return {name: norms[i] for i, name in enumerate(index.layer_names) if has_grad[i]}
