"""LSUV, layer-sequential unit-variance initialisation (Mishkin & Matas, 2016, "All you need is a good init").

Plain PyTorch, no Lightning. Orthogonal weights, then, in forward order, each Linear/Conv layer's weight
is scaled until its output standard deviation on a data batch is 1 within ``tol``. With ``center=True``
(the default) the bias is also set so that each output unit has zero mean on the batch (as in fast.ai's
LSUV); this is what rescues sigmoid networks, whose 0.5-mean outputs otherwise push every unit into
saturation. ``center=False`` is the paper's algorithm and matches the ``lsuv`` package weight for
weight. :class:`LSUVPass` holds LSUV's hooks, so the measurement can also run inside a real training
step; :func:`lsuv_` runs one on a sample batch.

Distributed: given the data-parallel process group (``group``), the output statistics (per-unit sums,
then squared deviations, in the wide dtype) are summed over it, so every rank measures the global batch
and applies the same scale. Sharded layers work as they are: under FSDP2 the hook runs while the layer
holds its gathered weights (before FSDP2's own post-forward hook) and the change is written to the
sharded parameters too; under a column-wise tensor-parallel plan, whose outputs hold a slice of the
units, the statistics are also summed over the weight's shard group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stability_callbacks._checks import check_bool, check_int, check_number
from stability_callbacks.init_schemes import LSUV_TYPES, call_model, eval_no_grad, init_tensor_, write_full_
from stability_callbacks.stats import local_tensor, wide_dtype

try:  # DTensor: the parameters of FSDP2 (fully_shard) and tensor parallelism
    from torch.distributed.tensor import DTensor
except ImportError:  # a build of torch without torch.distributed
    DTensor = None  # type: ignore[assignment,misc]

__all__ = ["LSUVPass", "LSUVResult", "lsuv_", "lsuv_layer_names", "orthogonal_layers_"]


@dataclass(frozen=True)
class LSUVResult:
    """What LSUV did to one layer.

    Attributes:
        std_before: output std on the batch after the orthogonal pre-initialisation.
        std_after: output std on the batch at the end.
        tries: number of rescalings.
        converged: ``|std_after - target| <= tol`` (and zero mean per unit with ``center``).
        called: whether the forward pass reached the layer at all.
    """

    std_before: float
    std_after: float
    tries: int
    converged: bool
    called: bool = True


def _unit_dim(m: nn.Module) -> int:
    """The dimension of a layer's output that indexes its units (features or channels)."""
    return -1 if isinstance(m, nn.Linear) else 1


def lsuv_layer_names(model: nn.Module, layers: Iterable[str] | None = None) -> list[str]:
    """The trainable Linear/Conv layers of ``model`` that LSUV treats (those in ``layers`` if given).

    Raises:
        ValueError: when there is none.
    """
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, LSUV_TYPES) and getattr(m, "weight", None) is not None and m.weight.requires_grad
    ]
    if layers is not None:
        wanted = set(layers)
        names = [n for n in names if n in wanted]
    if not names:
        raise ValueError(
            "LSUV needs at least one trainable Linear, Conv or ConvTranspose layer; "
            f"{type(model).__name__} has none"
        )
    return names


class LSUVPass:
    """LSUV's hooks for one forward pass: each layer is scaled, on its first call, until its output std is
    ``target_std`` within ``tol``; the corrected output is handed on, so every layer is measured on the
    output of the layers before it after their own correction.

    :func:`lsuv_` runs one in eval mode without gradients on a sample batch; started around a real
    training step instead (no guessed call of the model), it measures that step's batch, in the mode the
    step runs in: where gradients are on, each corrected layer's output is computed once more with
    them, so the step's gradients are those of the corrected model. An error inside a hook never
    reaches the forward pass: that layer is left as it is and the error kept in :attr:`error`.

    Args:
        model: the model.
        layers: names of the Linear/Conv layers to treat (default: all trainable ones,
            :func:`lsuv_layer_names`).
        tol, max_iters, target_std, center, group: as for :func:`lsuv_`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str] | None = None,
        tol: float = 0.1,
        max_iters: int = 10,
        target_std: float = 1.0,
        center: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        check_number("tol", tol, 0.0, low_open=True)
        check_int("max_iters", max_iters)
        check_number("target_std", target_std, 0.0, low_open=True)
        check_bool("center", center)
        self.names = lsuv_layer_names(model, layers)
        self.modules = dict(model.named_modules())
        self.tol, self.max_iters, self.target_std, self.center = tol, max_iters, target_std, center
        self.group = group
        self.results: dict[str, LSUVResult] = {}
        self._stored: dict[str, tuple[Tensor, Tensor | None]] = {}  # the parameters outside forward
        self.error: str | None = None
        self._stack: ExitStack | None = None

    def start(self) -> LSUVPass:
        """Put the hooks on the layers (a no-op while they are on); returns ``self``."""
        if self._stack is None:
            self._stack = ExitStack()
            for n in self.names:
                m = self.modules[n]
                self._stored[n] = (m.weight, getattr(m, "bias", None))
                # first, so that it runs while FSDP2 still holds the gathered weights
                handle = m.register_forward_hook(self._make_hook(n), with_kwargs=True, prepend=True)
                self._stack.callback(handle.remove)
        return self

    def remove(self) -> None:
        """Remove the hooks (the results so far stay)."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def stop(self) -> dict[str, LSUVResult]:
        """Remove the hooks; the results in forward order, layers the pass never reached last."""
        self.remove()
        out = dict(self.results)
        for n in self.names:
            if n not in out:
                out[n] = LSUVResult(math.nan, math.nan, 0, False, called=False)
        return out

    def __enter__(self) -> LSUVPass:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _make_hook(self, name: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            if name in self.results:  # a layer called twice is adjusted on its first call only
                return None
            try:
                self.results[name], new_out = _lsuv_layer(
                    mod, args, kwargs, out, self.tol, self.max_iters, self.target_std, self.center, self.group
                )
                if self.results[name].tries:
                    _write_back(mod, *self._stored[name])
            except Exception as error:  # never fail the forward pass
                self.error = f"{name}: {type(error).__name__}: {error}"
                self.results[name] = LSUVResult(math.nan, math.nan, 0, False)
                return None
            return new_out

        return hook


def lsuv_(
    model: nn.Module,
    sample_input: Any,
    layers: Iterable[str] | None = None,
    tol: float = 0.1,
    max_iters: int = 10,
    target_std: float = 1.0,
    center: bool = True,
    orthogonal: bool = True,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
) -> dict[str, LSUVResult]:
    """Layer-sequential unit-variance initialisation (Mishkin & Matas, 2016), in place.

    Orthogonal weights and zero biases first; then, in forward order, each layer's output on
    ``sample_input`` is measured and its weight scaled by ``target_std / std`` until the std is within
    ``tol`` of ``target_std``, at most ``max_iters`` times. All of it happens in one forward pass
    (:class:`LSUVPass`): a hook on each layer adjusts the layer, re-evaluates it on the same input and
    hands the corrected output on, so every layer is measured on the output of the layers before it
    after their own correction, as in the paper's layer-by-layer loop, at the cost of one forward pass
    instead of one per layer. The pass runs in eval mode without gradients; every module's train/eval
    mode is restored and every hook removed, also on error.

    Args:
        model: the model.
        sample_input: a data batch (``model(x)``; a tuple is unpacked, a mapping passed as keywords).
        layers: names of the Linear/Conv layers to treat (default: all trainable ones).
        tol: tolerance on the output std.
        max_iters: most rescalings a layer gets.
        target_std: the wanted output std.
        center: also subtract each output unit's batch mean through the bias (layers with a bias),
            scaling weight and bias together. ``False`` reproduces the paper and the ``lsuv`` package.
        orthogonal: orthogonal pre-initialisation (gain 1) and zero biases; ``False`` keeps the weights.
        generator: random generator for the orthogonal matrices.
        group: the process group over which the batch is split (data parallelism: each rank passes its
            part): the statistics are summed over it, so every rank applies the scales of the global
            batch. ``None``: this process's batch alone.

    Returns:
        ``{layer name: LSUVResult}`` in forward order (layers the forward pass never reached last).
    """
    check_bool("orthogonal", orthogonal)
    lsuv = LSUVPass(model, layers, tol, max_iters, target_std, center, group)
    if orthogonal:
        orthogonal_layers_(model, lsuv.names, generator)
    with ExitStack() as stack:
        stack.enter_context(eval_no_grad(model))
        stack.enter_context(lsuv)
        call_model(model, sample_input)
    if lsuv.error is not None:
        raise RuntimeError(f"LSUV failed on layer {lsuv.error}")
    return lsuv.stop()


def orthogonal_layers_(
    model: nn.Module, names: Iterable[str], generator: torch.Generator | None = None
) -> None:
    """LSUV's start: orthogonal weights (gain 1) and zero biases for the layers ``names`` of ``model``."""
    modules = dict(model.named_modules())
    for n in names:
        m = modules[n]
        init_tensor_(m.weight, "orthogonal", 1.0, generator)
        if getattr(m, "bias", None) is not None:
            with torch.no_grad():
                m.bias.zero_()


def _all_reduce(t: Tensor, group: dist.ProcessGroup | None, op: Any = dist.ReduceOp.SUM) -> Tensor:
    """``t`` all-reduced in place over ``group``; ``t`` as it is without a group."""
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


def _unit_group(weight: Tensor, out_dim: int, units: int) -> dist.ProcessGroup | None:
    """The process group over which the output units of a layer are split (a column-wise tensor-parallel
    weight sharded along its output dimension, whose output holds this rank's slice of the units), else
    ``None``."""
    if DTensor is None or not isinstance(weight, DTensor) or units >= weight.shape[out_dim]:
        return None
    for mesh_dim, placement in enumerate(weight.placements):
        if placement.is_shard() and placement.dim % weight.ndim == out_dim:  # type: ignore[attr-defined]
            return weight.device_mesh.get_group(mesh_dim)
    return None


def _output_stats(
    m: nn.Module, out: Any, with_mean: bool, group: dist.ProcessGroup | None
) -> tuple[float, float, Tensor, Tensor]:
    """(std, largest |unit mean|, unit means, std around the unit means) of a layer's output, over the
    batches of ``group`` and the units of every rank: one transfer to the host."""
    y = local_tensor(out[0] if isinstance(out, tuple) else out).detach()
    y = y.to(wide_dtype(y.device))
    unit = _unit_dim(m) % y.dim()
    dims = [d for d in range(y.dim()) if d != unit]
    weight: Tensor = m.weight  # type: ignore[assignment]
    out_dim = 1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0
    units = y.shape[unit]
    split = _unit_group(weight, out_dim, units)
    per_unit = torch.cat([y.sum(dim=dims) if dims else y, y.new_tensor([y.numel() / max(units, 1)])])
    per_unit = _all_reduce(per_unit, group)  # the global batch: sums and counts per unit
    unit_mean, count = per_unit[:-1] / per_unit[-1].clamp_min(1.0), per_unit[-1]
    total = _all_reduce(torch.stack([per_unit[:-1].sum(), count * units]), split)
    mean = total[0] / total[1].clamp_min(1.0)
    shape = [1] * y.dim()
    shape[unit] = -1
    deviations = torch.stack([(y - mean).square().sum(), (y - unit_mean.view(shape)).square().sum()])
    deviations = _all_reduce(_all_reduce(deviations, group), split)
    dof = (total[1] - 1.0).clamp_min(1.0)
    std, centred = (deviations / dof).sqrt().unbind()
    mean_err = unit_mean.abs().max() if with_mean and units else y.new_zeros(())
    mean_err = _all_reduce(mean_err.clone(), split, dist.ReduceOp.MAX)
    host_std, host_err = torch.stack([std, mean_err]).float().tolist()  # one transfer per evaluation
    return host_std, host_err, unit_mean, (centred if with_mean else std).float()


def _full(t: Tensor) -> Tensor:
    """The whole of ``t``: a DTensor's full tensor (gathered), ``t`` itself otherwise."""
    return t.full_tensor() if DTensor is not None and isinstance(t, DTensor) else t


def _write_back(m: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    """Copy a layer's corrected weight and bias into the parameters it holds outside its forward pass,
    where they are not those it ran with (FSDP2 runs a layer with gathered copies of its shards)."""
    live_weight: Tensor = m.weight  # type: ignore[assignment]
    if live_weight is weight:
        return
    write_full_(weight, _full(live_weight).detach())
    live_bias = getattr(m, "bias", None)
    if bias is not None and live_bias is not None:
        write_full_(bias, _full(live_bias).detach())


def _lsuv_layer(
    m: nn.Module,
    args: Any,
    kwargs: Any,
    out: Any,
    tol: float,
    max_iters: int,
    target_std: float,
    center: bool,
    group: dist.ProcessGroup | None = None,
) -> tuple[LSUVResult, Any]:
    """Scale one layer until its output std is ``target_std``; returns the result and the new output."""
    bias: Tensor | None = getattr(m, "bias", None) if center else None
    weight: Tensor = m.weight  # type: ignore[assignment]
    grad_mode = torch.is_grad_enabled()

    def ok(std: float, mean_err: float) -> bool:
        return abs(std - target_std) <= tol and mean_err <= tol

    std, mean_err, unit_mean, centred = _output_stats(m, out, bias is not None, group)
    before, tries = std, 0
    while not ok(std, mean_err) and tries < max_iters and math.isfinite(std) and std > 0.0:
        with torch.no_grad():
            scale = target_std / centred.clamp_min(1e-12)
            if bias is not None:
                local_tensor(bias).sub_(unit_mean.to(bias.dtype)).mul_(scale.to(bias.dtype))
            local_tensor(weight).mul_(scale.to(weight.dtype))
            torch.clear_autocast_cache()  # under autocast, the cast of the old weight is cached
            out = m.forward(*args, **kwargs)
        tries += 1
        std, mean_err, unit_mean, centred = _output_stats(m, out, bias is not None, group)
    if tries and grad_mode:  # hand on an output the step's backward can go through
        out = m.forward(*args, **kwargs)
    return LSUVResult(before, std, tries, ok(std, mean_err)), out
