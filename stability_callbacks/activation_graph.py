"""Which activation follows each layer of a model: the activation graph that initialisation reads.

Plain PyTorch, no Lightning. :func:`following_activations` learns it, most precise first:

1. a ``torch.fx`` trace (data flow; no data needed), so ``F.relu`` or ``torch.tanh`` written in
   ``forward`` count, and the nearest activation downstream of a layer wins, through normalisation,
   dropout, pooling, reshapes and residual additions;
2. where the model does not trace, the execution order of one forward pass on a sample batch, in eval
   mode without gradients: module hooks plus a ``TorchFunctionMode`` that sees functional activations;
3. else the order in which the modules are registered.

A layer is a module that owns parameters, except normalisation layers, embeddings and recurrent
layers, whose initialisation does not depend on what follows them.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from stability_callbacks.init_schemes import (
    EMBEDDING_TYPES,
    NORM_TYPES,
    Activation,
    call_model,
    eval_no_grad,
)

__all__ = ["following_activations", "fx_traceable"]


def _module_activation(m: nn.Module) -> Activation | None:
    """The activation an activation module applies (``None`` for any other module)."""
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return Activation("relu")
    if isinstance(m, nn.LeakyReLU):
        return Activation("leaky_relu", float(m.negative_slope))
    if isinstance(m, nn.RReLU):
        return Activation("leaky_relu", (m.lower + m.upper) / 2.0)
    if isinstance(m, nn.PReLU):
        return Activation("leaky_relu", float(m.weight.detach().float().mean()))
    kinds: list[tuple[type[nn.Module] | tuple[type[nn.Module], ...], str]] = [
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
    for cls, kind in kinds:
        if isinstance(m, cls):
            return Activation(kind)
    return None


_FUNCTION_KINDS: dict[Any, str] = {
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
_METHOD_KINDS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid"}
_METHOD_KINDS["sigmoid_"] = "sigmoid"


def _function_activation(func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Activation | None:
    name = getattr(func, "__name__", str(func))
    if func in (F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu):
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return Activation("leaky_relu", float(slope), f"F.{name}")
    if func is F.rrelu:
        lower = kwargs.get("lower", args[1] if len(args) > 1 else 1.0 / 8)
        upper = kwargs.get("upper", args[2] if len(args) > 2 else 1.0 / 3)
        return Activation("leaky_relu", (float(lower) + float(upper)) / 2.0, f"F.{name}")
    try:
        kind = _FUNCTION_KINDS.get(func)
    except TypeError:  # unhashable callables
        kind = None
    owner = getattr(func, "__module__", None) or "torch.Tensor"
    return None if kind is None else Activation(kind, 0.0, f"{owner}.{name}")


# -- which modules are layers ---------------------------------------------------------------------


def _owns_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _is_weight_layer(m: nn.Module) -> bool:
    """Whether ``m`` owns parameters whose initialisation depends on what follows it."""
    return _owns_params(m) and not isinstance(m, (*NORM_TYPES, *EMBEDDING_TYPES, nn.RNNBase))


_PASS_MODULES: tuple[type[nn.Module], ...] = (
    *NORM_TYPES,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
)
_PASS_FUNCTIONS: set[Any] = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.getitem,
    torch.add,
    torch.cat,
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    torch.squeeze,
    torch.unsqueeze,
    F.dropout,
    F.layer_norm,
    F.batch_norm,
    F.group_norm,
    F.instance_norm,
    F.interpolate,
    F.pad,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_PASS_METHODS = {
    "view",
    "reshape",
    "flatten",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "chunk",
    "split",
    "add",
    "add_",
    "sub",
    "float",
    "to",
}


# -- 1. torch.fx ------------------------------------------------------------------------------------


class _LayerTracer(fx.Tracer):
    """Keeps layers and activation modules as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _owns_params(m) or _module_activation(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def fx_traceable(model: nn.Module) -> bool:
    """Whether ``torch.fx`` traces ``model`` (then :func:`following_activations` needs no data)."""
    try:
        _LayerTracer().trace(model)
    except Exception:  # any model that symbolic tracing cannot follow
        return False
    return True


def _node_activation(node: fx.Node, modules: Mapping[str, nn.Module]) -> Activation | None:
    if node.op == "call_module":
        act = _module_activation(modules[str(node.target)])
        return None if act is None else Activation(act.kind, act.slope, str(node.target))
    if node.op == "call_function":
        return _function_activation(node.target, node.args, node.kwargs)
    if node.op == "call_method" and node.target in _METHOD_KINDS:
        return Activation(_METHOD_KINDS[str(node.target)], 0.0, f"Tensor.{node.target}")
    return None


def _node_passes(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], _PASS_MODULES)
    if node.op == "call_function":
        try:
            return node.target in _PASS_FUNCTIONS
        except TypeError:
            return False
    return node.op == "call_method" and node.target in _PASS_METHODS


def _trace_fx(model: nn.Module) -> dict[str, Activation | None]:
    graph = _LayerTracer().trace(model)
    modules = dict(model.named_modules())
    found: dict[str, Activation | None] = {}
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) in found:
            continue
        if not _is_weight_layer(modules[str(node.target)]):
            continue
        act: Activation | None = None
        queue: deque[fx.Node] = deque(node.users)
        seen: set[fx.Node] = set()
        while queue:  # breadth first: the nearest activation downstream wins
            user = queue.popleft()
            if user in seen:
                continue
            seen.add(user)
            act = _node_activation(user, modules)
            if act is not None:
                break
            if _node_passes(user, modules):
                queue.extend(user.users)
        found[str(node.target)] = act
    return found


# -- 2. one forward pass ----------------------------------------------------------------------------


class _FunctionRecorder(TorchFunctionMode):
    """Records the functional activations called outside any module (``depth[0] == 0``)."""

    def __init__(self, events: list[tuple[str, Any]], depth: list[int]) -> None:
        super().__init__()
        self.events = events
        self.depth = depth

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if self.depth[0] == 0:
            act = _function_activation(func, args, kwargs)
            if act is not None:
                self.events.append(("act", act))
        return func(*args, **kwargs)


def _trace_hooks(model: nn.Module, sample_input: Any) -> dict[str, Activation | None]:
    events: list[tuple[str, Any]] = []
    depth = [0]
    with ExitStack() as stack:
        for name, m in model.named_modules():
            act = _module_activation(m)
            layer = _is_weight_layer(m)
            if act is None and not _owns_params(m):
                continue

            def pre(mod: nn.Module, args: Any, name: str = name, act: Activation | None = act) -> None:
                if act is not None and depth[0] == 0:
                    events.append(("act", Activation(act.kind, act.slope, name)))
                depth[0] += 1

            def post(mod: nn.Module, args: Any, out: Any, name: str = name, layer: bool = layer) -> None:
                depth[0] -= 1
                if layer and depth[0] == 0:
                    events.append(("layer", name))

            stack.callback(m.register_forward_pre_hook(pre).remove)
            stack.callback(m.register_forward_hook(post).remove)
        stack.enter_context(eval_no_grad(model))
        stack.enter_context(_FunctionRecorder(events, depth))
        call_model(model, sample_input)
    found: dict[str, Activation | None] = {}
    for i, (kind, value) in enumerate(events):
        if kind == "layer" and value not in found:
            nxt = events[i + 1] if i + 1 < len(events) else None
            found[value] = nxt[1] if nxt is not None and nxt[0] == "act" else None
    return found


# -- 3. registration order --------------------------------------------------------------------------


def _trace_registration(model: nn.Module) -> dict[str, Activation | None]:
    found: dict[str, Activation | None] = {}
    pending: list[str] = []
    for name, m in model.named_modules():
        act = _module_activation(m)
        if act is not None:
            for layer in pending:
                found[layer] = Activation(act.kind, act.slope, name)
            pending = []
        elif _is_weight_layer(m):
            for layer in pending:
                found[layer] = None
            pending = [name]
    for layer in pending:
        found[layer] = None
    return found


def following_activations(
    model: nn.Module, sample_input: Any | None = None
) -> tuple[dict[str, Activation | None], str]:
    """The activation that follows each layer of ``model`` in its forward pass.

    Tries a ``torch.fx`` trace (data flow, no data needed), then one forward pass on ``sample_input``
    in eval mode without gradients (execution order of modules and of functional activations), then
    the registration order of the modules.

    Args:
        model: the model.
        sample_input: a batch for the forward pass (``model(x)``; a tuple is unpacked into positional
            arguments, a mapping into keyword arguments); only used where the model does not trace.

    Returns:
        ``({layer name: Activation or None}, method)`` where method is ``"fx"``, ``"hooks"`` or
        ``"registration"``. Layers are the modules that own parameters, except normalisation layers,
        embeddings and recurrent layers.
    """
    try:
        return _trace_fx(model), "fx"
    except Exception:  # any model that symbolic tracing cannot follow
        pass
    if sample_input is not None:
        return _trace_hooks(model, sample_input), "hooks"
    return _trace_registration(model), "registration"
