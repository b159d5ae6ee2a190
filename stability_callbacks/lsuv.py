"""LSUV, layer-sequential unit-variance initialisation (Mishkin & Matas, 2016, "All you need is a good init").

Plain PyTorch, no Lightning. Orthogonal weights, then, in forward order, each Linear/Conv layer's weight
is scaled until its output standard deviation on a data batch is 1 within ``tol``. With ``center=True``
(the default) the bias is also set so that each output unit has zero mean on the batch (as in fast.ai's
LSUV); this is what rescues sigmoid networks, whose 0.5-mean outputs otherwise push every unit into
saturation. ``center=False`` is the paper's algorithm and matches the ``lsuv`` package weight for
weight. :class:`LSUVPass` holds LSUV's hooks, so the measurement can also run inside a real training
step; :func:`lsuv_` runs one on a sample batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stability_callbacks._checks import check_bool, check_int, check_number
from stability_callbacks.init_schemes import LSUV_TYPES, call_model, eval_no_grad, init_tensor_

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
        tol, max_iters, target_std, center: as for :func:`lsuv_`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str] | None = None,
        tol: float = 0.1,
        max_iters: int = 10,
        target_std: float = 1.0,
        center: bool = True,
    ) -> None:
        check_number("tol", tol, 0.0, low_open=True)
        check_int("max_iters", max_iters)
        check_number("target_std", target_std, 0.0, low_open=True)
        check_bool("center", center)
        self.names = lsuv_layer_names(model, layers)
        self.modules = dict(model.named_modules())
        self.tol, self.max_iters, self.target_std, self.center = tol, max_iters, target_std, center
        self.results: dict[str, LSUVResult] = {}
        self.error: str | None = None
        self._stack: ExitStack | None = None

    def start(self) -> LSUVPass:
        """Put the hooks on the layers (a no-op while they are on); returns ``self``."""
        if self._stack is None:
            self._stack = ExitStack()
            for n in self.names:
                hook = self._make_hook(n)
                self._stack.callback(self.modules[n].register_forward_hook(hook, with_kwargs=True).remove)
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
                    mod, args, kwargs, out, self.tol, self.max_iters, self.target_std, self.center
                )
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

    Returns:
        ``{layer name: LSUVResult}`` in forward order (layers the forward pass never reached last).
    """
    check_bool("orthogonal", orthogonal)
    lsuv = LSUVPass(model, layers, tol, max_iters, target_std, center)
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


def _lsuv_layer(
    m: nn.Module,
    args: Any,
    kwargs: Any,
    out: Any,
    tol: float,
    max_iters: int,
    target_std: float,
    center: bool,
) -> tuple[LSUVResult, Any]:
    """Scale one layer until its output std is ``target_std``; returns the result and the new output."""
    bias: Tensor | None = getattr(m, "bias", None) if center else None
    weight: Tensor = m.weight  # type: ignore[assignment]
    grad_mode = torch.is_grad_enabled()

    def stats(out: Any) -> tuple[float, float, Tensor, Tensor]:
        y = (out[0] if isinstance(out, tuple) else out).detach().float()
        shape = [1] * y.dim()
        shape[_unit_dim(m) % y.dim()] = -1
        dims = [d for d, size in enumerate(shape) if size == 1]
        unit_mean = y.mean(dim=dims).view(shape) if dims else y
        mean_err = unit_mean.abs().max() if bias is not None else y.new_zeros(())
        centred_std = (y - unit_mean).std() if bias is not None else y.std()
        std, err = torch.stack([y.std(), mean_err]).tolist()  # one transfer per evaluation
        return std, err, unit_mean.flatten(), centred_std

    def ok(std: float, mean_err: float) -> bool:
        return abs(std - target_std) <= tol and mean_err <= tol

    std, mean_err, unit_mean, centred = stats(out)
    before, tries = std, 0
    while not ok(std, mean_err) and tries < max_iters and math.isfinite(std) and std > 0.0:
        with torch.no_grad():
            scale = target_std / centred.clamp_min(1e-12)
            if bias is not None:
                bias.sub_(unit_mean.to(bias.dtype)).mul_(scale.to(bias.dtype))
            weight.mul_(scale.to(weight.dtype))
            torch.clear_autocast_cache()  # under autocast, the cast of the old weight is cached
            out = m.forward(*args, **kwargs)
        tries += 1
        std, mean_err, unit_mean, centred = stats(out)
    if tries and grad_mode:  # hand on an output the step's backward can go through
        out = m.forward(*args, **kwargs)
    return LSUVResult(before, std, tries, ok(std, mean_err)), out
