"""Re-initialise a whole model in place for the activations it uses: :func:`init_swap` and its report.

Plain PyTorch, no Lightning. Every trainable parameter of a model is re-initialised in place, layer by
layer, for the activation that follows it in the forward pass (:mod:`~stability_callbacks.activation_graph`),
with the schemes of :mod:`~stability_callbacks.init_schemes`, the layer rules of
:mod:`~stability_callbacks.layer_init` and LSUV (:mod:`~stability_callbacks.lsuv`); an
:class:`~stability_callbacks.init_report.InitReport` says what changed and why. The callback that
applies it during a fit is :class:`stability_callbacks.init.InitSwap`; the example of a plain loop is in
:mod:`stability_callbacks.init`, which re-exports :func:`init_swap`.

Sharded models (FSDP2, tensor parallelism) are initialised as the full model: schemes see the global
shapes, each rank keeps its shard of the full draw (:func:`~stability_callbacks.init_schemes.write_full_`),
the report's statistics are those of the full tensors (moments and extremes reduced over the mesh), and
LSUV's output statistics are summed over the data-parallel group, so the report and the scales are the
same on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stability_callbacks._checks import check_bool, check_choice, check_number
from stability_callbacks.activation_graph import following_activations
from stability_callbacks.init_report import InitRecord, InitReport
from stability_callbacks.init_schemes import (
    LSUV_TYPES,
    NORM_TYPES,
    SCHEMES,
    Activation,
    default_init,
    matches_default,
    own_init_method,
)
from stability_callbacks.layer_init import init_parameter_
from stability_callbacks.lsuv import LSUVPass, LSUVResult, lsuv_, lsuv_layer_names, orthogonal_layers_
from stability_callbacks.stats import local_tensor, reduce_over_shards, shard_groups, user_name, wide_dtype

try:  # DTensor: the parameters of FSDP2 (fully_shard) and tensor parallelism
    from torch.distributed.tensor import DTensor
except ImportError:  # a build of torch without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "broadcast_module_",
    "check_overrides",
    "check_overrides_match",
    "finish_lsuv",
    "init_swap",
    "lsuv_pass",
]

# -- overrides --------------------------------------------------------------------------------------


def check_overrides(overrides: Mapping[str, str] | None) -> dict[str, str]:
    """``overrides`` as a plain dict, after checking it is ``{fnmatch pattern: scheme or "keep"}``.

    Args:
        overrides: the mapping to check, or ``None`` for none.

    Raises:
        ValueError: naming the pattern or the scheme that is not allowed.
    """
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"`overrides` must be a mapping of name pattern to scheme, got {overrides!r}")
    for pattern, scheme in overrides.items():
        if not isinstance(pattern, str):
            raise ValueError(f"`overrides` keys must be name patterns (str), got {pattern!r}")
        check_choice(f"overrides[{pattern!r}]", scheme, (*SCHEMES, "keep"))
    return dict(overrides)


# -- the model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Param:
    layer: str  # user name of the owning module
    name: str  # user name of the parameter
    module_name: str  # the owning module's name in named_modules() (for lookups)
    module: nn.Module
    local: str
    param: nn.Parameter
    aliases: tuple[str, ...]  # other names of the same (tied) parameter


def _named_params(model: nn.Module) -> list[_Param]:
    """Every parameter once, under its first name; a tied parameter (GPT-2's ``lm_head.weight`` is
    ``wte.weight``) keeps its other names as aliases."""
    first: dict[int, int] = {}
    out: list[_Param] = []
    for raw, m in model.named_modules():
        mod_name = user_name(raw)
        for local, p in m.named_parameters(recurse=False):
            full = f"{mod_name}.{local}" if mod_name else local
            if id(p) in first:
                i = first[id(p)]
                out[i] = replace(out[i], aliases=(*out[i].aliases, full))
                continue
            first[id(p)] = len(out)
            out.append(_Param(mod_name, full, raw, m, local, p, ()))
    return out


def check_overrides_match(model: nn.Module, overrides: Mapping[str, str] | None) -> None:
    """Raise ``ValueError`` if a pattern of ``overrides`` matches no parameter or module name of ``model``.

    Args:
        model: the model.
        overrides: ``{fnmatch pattern: scheme}``.
    """
    names: set[str] = set()
    for p in _named_params(model):
        names.update((p.layer, p.name, *p.aliases))
    for pattern in check_overrides(overrides):
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"`overrides` pattern {pattern!r} matches no parameter or module of {type(model).__name__}"
            )


def _summaries(tensors: Sequence[Tensor]) -> list[tuple[float, float, float]]:
    """(population std, min, max) of each tensor, with one host transfer per device.

    Two passes in the wide dtype (mean, then squared deviations); a DTensor is summarised whole: its
    shard's sums and extremes are reduced over the mesh (a few collectives for all tensors).
    """
    if not tensors:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = [(0.0, 0.0, 0.0)] * len(tensors)
    for idx in by_device.values():
        group = [tensors[i].detach() for i in idx]
        shards = shard_groups(group)
        local = [local_tensor(t) for t in group]
        wide = wide_dtype(local[0].device)
        values = [t.to(wide) for t in local]
        inf = torch.full((), math.inf, dtype=wide, device=local[0].device)
        sums = torch.stack([torch.stack([v.new_tensor(float(v.numel())), v.sum()]) for v in values])
        ext = torch.stack(
            [torch.stack([-v.min(), v.max()]) if v.numel() else torch.stack([-inf, -inf]) for v in values]
        )
        if shards:
            sums = reduce_over_shards(sums, shards, dist.ReduceOp.SUM)
            ext = reduce_over_shards(ext, shards, dist.ReduceOp.MAX)
        count = sums[:, 0].clamp_min(1.0)
        mean = sums[:, 1] / count
        squares = torch.stack([(v - m).square().sum() for v, m in zip(values, mean.unbind(), strict=True)])
        if shards:
            squares = reduce_over_shards(squares, shards, dist.ReduceOp.SUM)
        std = (squares / count).sqrt()
        empty = sums[:, 0] == 0
        rows = torch.stack([std, -ext[:, 0], ext[:, 1]], dim=1).masked_fill(empty.unsqueeze(1), 0.0)
        for i, row in zip(idx, rows.float().tolist(), strict=True):
            out[i] = (row[0], row[1], row[2])
    return out


def _self_initialising(model: nn.Module) -> dict[str, str]:
    """``{module name: why}`` for every module inside one whose class initialises it (its own
    ``init_weights``, ``_init_weights`` or ``reset_parameters``); the outermost such module names it."""
    found: dict[str, str] = {}
    owners: list[tuple[str, str]] = []  # outermost first: named_modules() lists parents first
    for raw, m in model.named_modules():
        method = own_init_method(m)
        if method is not None:
            where = f" ({user_name(raw)})" if raw else ""
            owners.append((raw, f"kept: {type(m).__name__}{where} initialises itself ({method})"))
        for owner, why in owners:
            if not owner or raw == owner or raw.startswith(f"{owner}."):
                found[raw] = why
                break
    return found


def _custom_reason(p: _Param, summary: tuple[float, float, float]) -> str | None:
    """Why ``p`` holds the model's own initialisation rather than PyTorch's default (``None`` if it holds
    the default: a layer nobody initialised)."""
    std, low, high = summary
    spec = default_init(p.module, p.local, p.param)
    kind = type(p.module).__name__
    if spec is None:
        return f"kept: {kind} is not a torch layer with a known default, so the model initialised it"
    if matches_default(spec, p.param.numel(), std, low, high):
        return None
    if p.param.dim() < 2 and "bias" in p.local and low == 0.0 and high == 0.0:
        return None  # a zero bias is what 'auto' sets anyway
    if spec[0] == "constant":
        return f"kept: the model set it (PyTorch's default is {spec[1]:g} everywhere)"
    default_std = spec[1] / math.sqrt(3.0) if spec[0] == "uniform" else spec[1]
    return f"kept: the model's own initialisation (std {std:.3g}; PyTorch's default {default_std:.3g})"


def init_swap(
    model: nn.Module,
    scheme: str = "auto",
    sample_input: Any | None = None,
    overrides: Mapping[str, str] | None = None,
    *,
    activations: tuple[Mapping[str, Activation | None], str] | None = None,
    keep_custom: bool = True,
    defer_lsuv: bool = False,
    lsuv_tol: float = 0.1,
    lsuv_max_iters: int = 10,
    lsuv_center: bool = True,
    forget_bias: float = 1.0,
    generator: torch.Generator | None = None,
    lsuv_group: dist.ProcessGroup | None = None,
) -> InitReport:
    """Re-initialise the trainable parameters of ``model`` in place for the activations it uses.

    Parameters keep their identity (values are copied in under ``torch.no_grad``), so an optimizer
    holding them keeps working. A tied parameter is initialised once, under its first name (the report
    gives the others). Frozen parameters (``requires_grad=False``), embeddings and parameters that are
    not layer weights (a ViT's ``cls_token``) are kept unless an override names them. Normalisation
    layers get weight 1 and bias 0 (and fresh running statistics); biases 0; other 1-D parameters are
    kept (no fan-based scheme applies to them). Recurrent layers get Xavier input weights and
    orthogonal recurrent weights per gate block, zero biases and, for LSTMs, a total forget-gate bias of
    ``forget_bias``.

    With ``scheme="auto"`` and ``keep_custom=True`` only the layers that nobody initialised change:
    kept are the layers of a model or module whose class initialises itself (an ``init_weights``,
    ``_init_weights`` or ``reset_parameters`` of its own: every transformers model, timm's ViT,
    Lightning's demo ``SimpleLSTM``), layers whose values are not drawn from PyTorch's default
    (:func:`~stability_callbacks.init_schemes.default_init`: torchvision's He fan-out convolutions, an
    ``nn.init`` call in ``__init__``) and layers of a type torch does not define (transformers'
    ``Conv1D``); the report says ``kept`` and why. An explicit scheme, ``"lsuv"``, an override or
    ``keep_custom=False`` re-initialise them too.

    Args:
        model: the model.
        scheme: one of :data:`SCHEMES`. ``"auto"`` picks per layer from the activation that follows it
            (He for the ReLU family and the smooth rectifiers GELU, SiLU, Mish..., Xavier with tanh gain
            5/3 for tanh, Xavier for sigmoid and none); an explicit scheme is applied with the gain of
            that activation; ``"lsuv"`` is the ``auto`` treatment plus LSUV on the Linear/Conv layers.
        sample_input: a data batch, needed for ``"lsuv"`` (unless ``defer_lsuv``) and used to find
            activations where the model does not trace with ``torch.fx``.
        overrides: ``{fnmatch pattern: scheme or "keep"}`` matched against parameter and module names;
            the first matching pattern wins. A pattern that matches nothing is an error.
        activations: ``(activation after each layer, how it was found)``, e.g. from a
            :class:`~stability_callbacks.forward_recorder.ForwardRecorder` around a training step; found
            by :func:`following_activations` when ``None``.
        keep_custom: with ``"auto"``, keep the layers the model initialised itself (see above).
        defer_lsuv: leave LSUV's measurement to the caller: its layers get their orthogonal start and
            the report lists them in ``lsuv_pending``; run a
            :class:`~stability_callbacks.lsuv.LSUVPass` over them (during a training step, say)
            and complete the report with :meth:`InitReport.with_lsuv`.
        lsuv_tol, lsuv_max_iters, lsuv_center: ``tol``, ``max_iters`` and ``center`` of :func:`lsuv_`.
        forget_bias: LSTM forget-gate bias.
        generator: random generator (the global one if ``None``).
        lsuv_group: the process group over which ``sample_input`` is split (data parallelism), so
            that LSUV measures the global batch (see :func:`~stability_callbacks.lsuv.lsuv_`).

    Returns:
        An :class:`InitReport`; ``print(report)`` shows the table.
    """
    check_choice("scheme", scheme, SCHEMES)
    check_number("forget_bias", forget_bias)
    check_bool("keep_custom", keep_custom)
    check_bool("defer_lsuv", defer_lsuv)
    overrides = check_overrides(overrides)
    check_overrides_match(model, overrides)
    params = _named_params(model)

    def requested_for(p: _Param) -> tuple[str, str]:
        for pattern, s in overrides.items():
            if any(fnmatchcase(n, pattern) for n in (p.name, p.layer, *p.aliases)):
                return s, f"override {pattern!r}"
        return scheme, ""

    wants_lsuv = any(
        p.param.requires_grad and isinstance(p.module, LSUV_TYPES) and requested_for(p)[0] == "lsuv"
        for p in params
    )
    if wants_lsuv and sample_input is None and not defer_lsuv:
        raise ValueError("scheme 'lsuv' needs `sample_input`, a data batch to measure the layers on")
    if scheme == "lsuv":
        lsuv_layer_names(model)  # a clear error before anything changes

    acts, traced_by = activations if activations is not None else following_activations(model, sample_input)
    old = _summaries([p.param for p in params])
    custom: dict[str, str] = {}  # module name -> why the model's own initialisation is kept
    if scheme == "auto" and keep_custom:
        custom.update(_self_initialising(model))
        for p, summary in zip(params, old, strict=True):
            why = _custom_reason(p, summary)
            if why is not None and p.module_name not in custom:
                custom[p.module_name] = why
    plan: list[tuple[str, str]] = []
    lsuv_layers: dict[str, str] = {}  # module name -> user name
    reset_norms: list[nn.Module] = []
    for p in params:
        requested, source = requested_for(p)
        prefix = f"{source}: " if source else ""
        if not p.param.requires_grad:
            plan.append(("kept", "frozen"))
            continue
        if requested == "keep":
            plan.append(("kept", f"{prefix}keep"))
            continue
        if not source and p.module_name in custom:
            plan.append(("kept", custom[p.module_name]))
            continue
        chosen, why = init_parameter_(
            p.module,
            p.local,
            p.param,
            requested,
            acts.get(p.layer),
            named=bool(source),
            lsuv_center=lsuv_center,
            forget_bias=forget_bias,
            generator=generator,
        )
        plan.append((chosen, prefix + why))
        if chosen == "lsuv" and p.param.dim() >= 2:
            lsuv_layers[p.module_name] = p.layer
        if isinstance(p.module, NORM_TYPES) and p.module not in reset_norms:
            reset_norms.append(p.module)
    for m in reset_norms:
        reset = getattr(m, "reset_running_stats", None)
        if callable(reset):
            reset()
    lsuv_results: dict[str, LSUVResult] = {}
    if lsuv_layers and defer_lsuv:
        orthogonal_layers_(model, lsuv_layers, generator)
    elif lsuv_layers:
        raw = lsuv_(
            model,
            sample_input,
            layers=list(lsuv_layers),
            tol=lsuv_tol,
            max_iters=lsuv_max_iters,
            center=lsuv_center,
            generator=generator,
            group=lsuv_group,
        )
        lsuv_results = {lsuv_layers[n]: r for n, r in raw.items()}
    new = _summaries([p.param for p in params])
    records = []
    for p, (chosen, why), o, n in zip(params, plan, old, new, strict=True):
        if p.aliases:
            why += f" (tied: also {', '.join(p.aliases)})"
        records.append(InitRecord(p.name, p.layer, tuple(p.param.shape), chosen, why, o[0], n[0], o != n))
    report = InitReport(tuple(records), scheme, traced_by, lsuv_pending=tuple(lsuv_layers.values()))
    if lsuv_results:
        report = report.with_lsuv(lsuv_results, {})
    return report


def lsuv_pass(
    model: nn.Module,
    report: InitReport,
    tol: float = 0.1,
    max_iters: int = 10,
    center: bool = True,
    group: dist.ProcessGroup | None = None,
) -> LSUVPass:
    """An :class:`~stability_callbacks.lsuv.LSUVPass` over the layers ``report`` left to LSUV
    (``init_swap(..., defer_lsuv=True)``), without a new orthogonal start; ``group`` is the
    data-parallel process group whose batches it measures together."""
    wanted = set(report.lsuv_pending)
    names = [n for n, _ in model.named_modules() if user_name(n) in wanted]
    return LSUVPass(model, names, tol=tol, max_iters=max_iters, center=center, group=group)


def finish_lsuv(model: nn.Module, report: InitReport, results: Mapping[str, LSUVResult]) -> InitReport:
    """``report`` completed with the results of :func:`lsuv_pass` (keyed by module name, as it gives them)."""
    by_user = {user_name(n): r for n, r in results.items()}
    params = [p for p in _named_params(model) if p.layer in by_user]
    stds = _summaries([p.param for p in params])
    return report.with_lsuv(by_user, {p.name: s[0] for p, s in zip(params, stds, strict=True)})


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks, in place.

    One broadcast per device and dtype (flattened); a no-op without an initialised process group.
    DTensors (FSDP2, tensor parallelism) are left alone: each rank holds its own shard, and
    :func:`init_swap` already gave every rank its shard of the same full tensor.

    Args:
        module: the module (the same architecture on every rank).
        src: the global rank whose values win.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in [*module.parameters(), *module.buffers()]:
        if DTensor is None or not isinstance(t, DTensor):
            groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for tensors in groups.values():
            flat = torch._utils._flatten_dense_tensors([t.detach() for t in tensors])
            dist.broadcast(flat, src=src)
            for t, v in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors), strict=True):
                t.copy_(v)
