"""Recognise activations and layers: the activation a module or function applies; which modules are layers.

Plain PyTorch, no Lightning. :func:`module_activation` says which activation a module applies: the
classes of torch, and by class name those of timm and transformers (``NewGELUActivation``,
``QuickGELU``, ``SwishMe``...), without importing either; :data:`FUNCTION_KINDS` and
:func:`function_activation` do the same for functions (``F.relu``, ``torch.tanh``,
``Tensor.sigmoid``...). A layer (:func:`is_weight_layer`) is a module that owns parameters, except
normalisation layers, embeddings and recurrent layers, whose initialisation does not depend on what
follows them.

The forward-pass tools built on these: :mod:`stability_callbacks.forward_recorder` (hooks around a
real forward pass) and :mod:`stability_callbacks.activation_graph` (``torch.fx`` data flow).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stability_callbacks.init_schemes import EMBEDDING_TYPES, NORM_TYPES, Activation

__all__ = [
    "FUNCTION_KINDS",
    "function_activation",
    "function_name",
    "is_leaf_layer",
    "is_weight_layer",
    "module_activation",
    "owns_parameters",
    "recurrent_activation",
]

# -- which modules and functions are activations -----------------------------------------------------

_TORCH_KINDS: list[tuple[type[nn.Module] | tuple[type[nn.Module], ...], str]] = [
    (nn.SELU, "selu"),
    (nn.ELU, "elu"),
    (nn.CELU, "celu"),
    (nn.SiLU, "silu"),
    (nn.GELU, "gelu"),
    (nn.Mish, "mish"),
    (nn.Softplus, "softplus"),
    (nn.Hardswish, "hardswish"),
    ((nn.Tanh, nn.Hardtanh), "tanh"),
    ((nn.Sigmoid, nn.Hardsigmoid), "sigmoid"),
]

# Class-name rules for the activation classes of other libraries (timm: Swish, GELUTanh, QuickGELU,
# HardMishMe...; transformers: NewGELUActivation, FastGELUActivation, SiLUActivation...), first match
# wins, on the lower-cased class name of a module without parameters.
_NAME_KINDS: list[tuple[str, str]] = [
    ("gelu", "gelu"),
    ("hardswish", "hardswish"),
    ("hard_swish", "hardswish"),
    ("swish", "silu"),
    ("silu", "silu"),
    ("mish", "mish"),
    ("hardsigmoid", "sigmoid"),
    ("sigmoid", "sigmoid"),
    ("tanh", "tanh"),
    ("leakyrelu", "leaky_relu"),
    ("relu", "relu"),
    ("selu", "selu"),
    ("celu", "celu"),
    ("elu", "elu"),
    ("softplus", "softplus"),
]


def module_activation(m: nn.Module) -> Activation | None:
    """The activation an activation module applies (``None`` for any other module).

    The activation classes of torch by type (with the slope of LeakyReLU, RReLU and PReLU); any other
    module without parameters by class name, so the activations of timm and transformers are known
    without importing them: a name with ``gelu`` is GELU (``NewGELUActivation``, ``QuickGELU``,
    ``GELUTanh``), ``swish``/``silu`` SiLU, ``mish`` Mish, ``hardsigmoid``/``sigmoid`` sigmoid, ``tanh``
    tanh, ``relu`` ReLU, and so on. ``LinearActivation`` (the identity) is none.
    """
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return Activation("relu")
    if isinstance(m, nn.LeakyReLU):
        return Activation("leaky_relu", float(m.negative_slope))
    if isinstance(m, nn.RReLU):
        return Activation("leaky_relu", (m.lower + m.upper) / 2.0)
    if isinstance(m, nn.PReLU):
        return Activation("leaky_relu", float(m.weight.detach().float().mean()))
    for cls, kind in _TORCH_KINDS:
        if isinstance(m, cls):
            return Activation(kind)
    if type(m).__module__.startswith("torch.nn.") or next(m.parameters(), None) is not None:
        return None
    name = type(m).__name__.lower()
    for part, kind in _NAME_KINDS:
        if part in name:
            slope = getattr(m, "negative_slope", 0.01) if kind == "leaky_relu" else 0.0
            return Activation(kind, float(slope) if isinstance(slope, (int, float)) else 0.01)
    return None


def recurrent_activation(m: nn.Module) -> Activation | None:
    """What bounds the hidden states of a recurrent layer or cell: tanh for LSTM, GRU and tanh RNNs, ReLU
    for ReLU RNNs (``None`` for other modules). Their gates run inside one fused kernel."""
    if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
        return Activation("relu" if getattr(m, "nonlinearity", "tanh") == "relu" else "tanh")
    return None


FUNCTION_KINDS: dict[Any, str] = {
    F.relu: "relu",
    F.relu_: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu",
    F.elu: "elu",
    F.celu: "celu",
    F.selu: "selu",
    torch.selu: "selu",
    F.silu: "silu",
    F.gelu: "gelu",
    F.mish: "mish",
    F.softplus: "softplus",
    F.hardswish: "hardswish",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    F.hardtanh: "tanh",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.hardsigmoid: "sigmoid",
    torch.Tensor.relu: "relu",
    torch.Tensor.relu_: "relu",
    torch.Tensor.tanh: "tanh",
    torch.Tensor.tanh_: "tanh",
    torch.Tensor.sigmoid: "sigmoid",
    torch.Tensor.sigmoid_: "sigmoid",
}
"""Activation functions by kind (LeakyReLU and RReLU, which carry a slope, are handled apart)."""

_LEAKY = (F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu)


def function_name(func: Any) -> str:
    """The name of a function without a trailing ``_`` (``relu_`` -> ``relu``), as events name it.

    Args:
        func: the function (or any object; its ``str`` where it has no ``__name__``).
    """
    return str(getattr(func, "__name__", func)).rstrip("_")


def function_activation(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Activation | None:
    """The activation a call ``func(*args, **kwargs)`` applies, or ``None`` for any other function."""
    try:
        kind = FUNCTION_KINDS.get(func)
        leaky = kind is None and func in _LEAKY
        rrelu = kind is None and func is F.rrelu
    except TypeError:  # unhashable callables
        return None
    if kind is None and not leaky and not rrelu:
        return None
    name = function_name(func)
    if leaky:
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return Activation("leaky_relu", float(slope), f"F.{name}")
    if rrelu:
        lower = kwargs.get("lower", args[1] if len(args) > 1 else 1.0 / 8)
        upper = kwargs.get("upper", args[2] if len(args) > 2 else 1.0 / 3)
        return Activation("leaky_relu", (float(lower) + float(upper)) / 2.0, f"F.{name}")
    owner = getattr(func, "__module__", None) or "torch.Tensor"
    return Activation(str(kind), 0.0, f"{owner}.{name}")


# -- which modules are layers ---------------------------------------------------------------------


def owns_parameters(m: nn.Module) -> bool:
    """Whether ``m`` has parameters of its own (not counting its submodules')."""
    return any(True for _ in m.parameters(recurse=False))


def is_weight_layer(m: nn.Module) -> bool:
    """Whether ``m`` owns parameters whose initialisation depends on what follows it."""
    return owns_parameters(m) and not isinstance(m, (*NORM_TYPES, *EMBEDDING_TYPES, nn.RNNBase))


def is_leaf_layer(m: nn.Module) -> bool:
    """A module that owns parameters and none of whose submodules does: what runs inside it (HF's
    ``Conv1D``, a gated unit) belongs to it."""
    return owns_parameters(m) and not any(owns_parameters(c) for c in m.modules() if c is not m)
