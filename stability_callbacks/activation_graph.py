"""Which activation follows each layer of a model: :func:`following_activations`.

Plain PyTorch, no Lightning. It learns the activation that follows each layer, most precise first:

1. a ``torch.fx`` trace (data flow; no data needed), so ``F.relu`` or ``torch.tanh`` written in
   ``forward`` count, and the nearest activation downstream of a layer wins, through normalisation,
   dropout, pooling, reshapes and residual additions; the trace leaves no attribute of the model
   changed, even where it fails half-way;
2. where the model does not trace, the execution order of one forward pass on a sample batch, in eval
   mode without gradients, seen by a :class:`~stability_callbacks.forward_recorder.ForwardRecorder`;
3. else the order in which the modules are registered.

A layer is a module that owns parameters, except normalisation layers, embeddings and recurrent
layers, whose initialisation does not depend on what follows them. Which modules and functions are
activations is told by :mod:`stability_callbacks.activation_kinds`; the recorder lives in
:mod:`stability_callbacks.forward_recorder`. The names of both are re-exported here.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from stability_callbacks.activation_kinds import (
    FUNCTION_KINDS,
    function_activation,
    is_weight_layer,
    module_activation,
    owns_parameters,
    recurrent_activation,
)
from stability_callbacks.forward_recorder import (
    ActivationEvent,
    ForwardRecorder,
    compiled_modules,
    eager_compiled,
)
from stability_callbacks.init_schemes import NORM_TYPES, Activation, call_model, eval_no_grad
from stability_callbacks.stats import user_name

__all__ = [
    "FUNCTION_KINDS",
    "ActivationEvent",
    "ForwardRecorder",
    "compiled_modules",
    "eager_compiled",
    "following_activations",
    "function_activation",
    "fx_traceable",
    "is_weight_layer",
    "module_activation",
    "recurrent_activation",
    "registration_activations",
]

# -- what the fx walk reads: activation methods, and the nodes a layer's output passes through ---------

_METHOD_KINDS = {
    "relu": "relu",
    "relu_": "relu",
    "tanh": "tanh",
    "tanh_": "tanh",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
}

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
        if owns_parameters(m) or module_activation(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


@contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Restore every module's attributes on exit: symbolic tracing runs ``forward`` with proxies, and a
    ``forward`` that caches something on ``self`` (a mask, a positional table) would keep a proxy."""
    slots = ("_parameters", "_buffers", "_modules")
    saved = [(m, dict(m.__dict__), [dict(getattr(m, s)) for s in slots]) for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs, contents in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for slot, content in zip(slots, contents, strict=True):
                getattr(m, slot).clear()
                getattr(m, slot).update(content)


def _trace(model: nn.Module) -> fx.Graph:
    with _attributes_kept(model):
        return _LayerTracer().trace(model)


def fx_traceable(model: nn.Module) -> bool:
    """Whether ``torch.fx`` traces ``model`` (then :func:`following_activations` needs no data)."""
    try:
        _trace(model)
    except Exception:  # any model that symbolic tracing cannot follow
        return False
    return True


def _node_activation(node: fx.Node, modules: Mapping[str, nn.Module]) -> Activation | None:
    if node.op == "call_module":
        act = module_activation(modules[str(node.target)])
        return None if act is None else Activation(act.kind, act.slope, str(node.target))
    if node.op == "call_function":
        return function_activation(node.target, node.args, node.kwargs)
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
    graph = _trace(model)
    modules = dict(model.named_modules())
    found: dict[str, Activation | None] = {}
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) in found:
            continue
        if not is_weight_layer(modules[str(node.target)]):
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
        found[user_name(str(node.target))] = act
    return found


# -- 2. one forward pass ----------------------------------------------------------------------------


def _trace_hooks(model: nn.Module, sample_input: Any) -> dict[str, Activation | None]:
    recorder = ForwardRecorder()
    with ExitStack() as stack:
        stack.enter_context(eval_no_grad(model))
        stack.enter_context(recorder.start(model))
        call_model(model, sample_input)
    return recorder.following()


# -- 3. registration order --------------------------------------------------------------------------


def registration_activations(model: nn.Module) -> dict[str, Activation | None]:
    """The activation after each layer by the order in which the modules are registered: the next
    activation module before the next layer (the guess of last resort)."""
    found: dict[str, Activation | None] = {}
    pending: list[str] = []
    for raw, m in model.named_modules():
        name = user_name(raw)
        act = module_activation(m)
        if act is not None:
            for layer in pending:
                found[layer] = Activation(act.kind, act.slope, name)
            pending = []
        elif is_weight_layer(m):
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
        embeddings and recurrent layers; names are user names (no ``_orig_mod.``).
    """
    try:
        return _trace_fx(model), "fx"
    except Exception:  # any model that symbolic tracing cannot follow
        pass
    if sample_input is not None:
        return _trace_hooks(model, sample_input), "hooks"
    return registration_activations(model), "registration"
