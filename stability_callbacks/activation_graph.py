"""Which activation follows each layer of a model, and the activations a forward pass runs.

Plain PyTorch, no Lightning. Two tools live here:

* :func:`module_activation` says which activation a module applies: the classes of torch, and by
  class name those of timm and transformers (``NewGELUActivation``, ``QuickGELU``, ``SwishMe``...),
  without importing either; :data:`FUNCTION_KINDS` does the same for functions (``F.relu``,
  ``torch.tanh``, ``Tensor.sigmoid``...).
* :class:`ForwardRecorder` watches the forward passes that run while it is started: hooks on every
  module keep the stack of running modules, and a ``TorchFunctionMode`` sees functional activations.
  A function called inside an activation module (HF's ``NewGELUActivation`` calls ``torch.tanh``) is
  part of that activation, not a second one. It records the order of layers and activations (what
  initialisation reads) and hands every activation output to a callback (what
  :class:`~stability_callbacks.activations.ActivationMonitor` measures). Start it around a real
  training step to learn a model's structure without guessing how to call the model.

:func:`following_activations` learns the activation that follows each layer, most precise first:

1. a ``torch.fx`` trace (data flow; no data needed), so ``F.relu`` or ``torch.tanh`` written in
   ``forward`` count, and the nearest activation downstream of a layer wins, through normalisation,
   dropout, pooling, reshapes and residual additions; the trace leaves no attribute of the model
   changed, even where it fails half-way;
2. where the model does not trace, the execution order of one forward pass on a sample batch, in eval
   mode without gradients, seen by a :class:`ForwardRecorder`;
3. else the order in which the modules are registered.

A layer is a module that owns parameters, except normalisation layers, embeddings and recurrent
layers, whose initialisation does not depend on what follows them.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.overrides import TorchFunctionMode

from stability_callbacks.init_schemes import (
    EMBEDDING_TYPES,
    NORM_TYPES,
    Activation,
    call_model,
    eval_no_grad,
)
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
_METHOD_KINDS = {
    "relu": "relu",
    "relu_": "relu",
    "tanh": "tanh",
    "tanh_": "tanh",
    "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid",
}


def _func_name(func: Any) -> str:
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
    name = _func_name(func)
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


def _owns_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def is_weight_layer(m: nn.Module) -> bool:
    """Whether ``m`` owns parameters whose initialisation depends on what follows it."""
    return _owns_params(m) and not isinstance(m, (*NORM_TYPES, *EMBEDDING_TYPES, nn.RNNBase))


def _is_leaf_layer(m: nn.Module) -> bool:
    """A module that owns parameters and none of whose submodules does: what runs inside it (HF's
    ``Conv1D``, a gated unit) belongs to it."""
    return _owns_params(m) and not any(_owns_params(c) for c in m.modules() if c is not m)


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


# -- torch.compile --------------------------------------------------------------------------------


def compiled_modules(model: nn.Module) -> list[str]:
    """User names of the parts of ``model`` that ``torch.compile`` wraps (``[""]`` for the model itself
    when Lightning compiled it); module hooks added after compilation do not run in compiled code."""
    found = [user_name(n) for n, m in model.named_modules() if hasattr(m, "_orig_mod")]
    if getattr(model, "_compiler_ctx", None) and "" not in found:
        found.insert(0, "")
    return found


@contextmanager
def eager_compiled() -> Iterator[bool]:
    """Run ``torch.compile``'d code eagerly inside (``torch.compiler.set_stance("force_eager")``), so that
    module hooks and ``TorchFunctionMode`` see every call; other code is unaffected. Yields ``False``
    (and changes nothing) where this torch has no ``set_stance``."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    try:
        stance = None if set_stance is None else set_stance("force_eager")
    except RuntimeError:  # called from inside a compiled region: leave the stance alone
        stance = None
    if stance is None:
        yield False
        return
    with stance:
        yield True


# -- the recorder ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationEvent:
    """One activation seen by a :class:`ForwardRecorder`.

    Attributes:
        name: the activation module's user name; for a function, the user name of the module that called
            it, a dot and the function (``layers.0.relu``; ``relu_1`` for its second call there), or the
            function alone when the model itself called it.
        activation: what it applies.
        output: its output (only the first tensor of a tuple).
        module: the activation module (``None`` for a function, or a recurrent layer's hidden states).
        in_layer: it ran inside a module that owns parameters and whose submodules own none (part of a
            layer such as a gated unit, rather than an activation that follows a layer).
    """

    name: str
    activation: Activation
    output: Tensor | None
    module: nn.Module | None
    in_layer: bool


class _Mode(TorchFunctionMode):
    """Hands every call to its recorder while the recorder is active."""

    def __init__(self, recorder: ForwardRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(
        self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.recorder.active:
            self.recorder._function_called(func, args, kwargs, out)
        return out


class ForwardRecorder:
    """Watches the forward passes that run between :meth:`start` and :meth:`stop`.

    Hooks on every module keep the stack of running modules; a ``TorchFunctionMode`` sees the
    functional activations. It records, in order, each layer's output (``("layer", name)``, layers as
    in :func:`is_weight_layer`) and each activation (an :class:`ActivationEvent`): activation modules
    (:func:`module_activation`), activation functions called outside any activation module, and, with
    ``recurrent=True``, the hidden states of recurrent layers (:func:`recurrent_activation`).

    ``torch.compile``'d code runs eagerly while it records (:func:`eager_compiled`), so that the hooks
    run. Nothing it does can fail the forward pass: an error in its own bookkeeping is kept in
    :attr:`error` and recording stops. Names are user names (no ``_orig_mod.``).

    Args:
        on_activation: called with each :class:`ActivationEvent` as it happens (e.g. to compute
            statistics on the device); ``None`` to only record.
        recurrent: also report the hidden states of recurrent layers.
        functions: also see functional activations (a ``TorchFunctionMode`` while recording).
        keep_outputs: keep each event's output tensor in :attr:`events` (off by default: only the
            callback sees it, so no activation outlives the step).
        watch: more modules to report as activations (e.g. ``nn.Softsign``, which initialisation has no
            gain for); their activation kind is their lower-cased class name.
    """

    def __init__(
        self,
        on_activation: Callable[[ActivationEvent], None] | None = None,
        recurrent: bool = False,
        functions: bool = True,
        keep_outputs: bool = False,
        watch: Callable[[nn.Module], bool] | None = None,
    ) -> None:
        self.on_activation = on_activation
        self.watch = watch
        self.recurrent = recurrent
        self.functions = functions
        self.keep_outputs = keep_outputs
        self.events: list[tuple[str, Any]] = []
        self.modules_run: set[str] = set()
        self.error: str | None = None
        self.active = False
        self._stack: list[tuple[str, int]] = []  # (user name, flags) of the running modules
        self._calls: dict[tuple[str, str], int] = {}
        self._exit: ExitStack | None = None

    _ACT, _LAYER, _LEAF = 1, 2, 4

    @property
    def recording(self) -> bool:
        """Whether hooks are in place."""
        return self._exit is not None

    def start(self, model: nn.Module) -> ForwardRecorder:
        """Hook ``model`` and begin recording (a no-op while recording); returns ``self``."""
        if self._exit is not None:
            return self
        stack = ExitStack()
        for raw, m in model.named_modules():
            flags = 0
            act = module_activation(m)
            if act is None and self.recurrent:
                act = recurrent_activation(m)
            if act is None and self.watch is not None and self.watch(m):
                act = Activation(type(m).__name__.lower())
            if act is not None:
                flags |= self._ACT
            if is_weight_layer(m):
                flags |= self._LAYER
            if _is_leaf_layer(m):
                flags |= self._LEAF
            name = user_name(raw)
            stack.callback(m.register_forward_pre_hook(self._make_pre(name, flags)).remove)
            post = self._make_post(name, flags, act)
            stack.callback(m.register_forward_hook(post, always_call=True).remove)
        stack.enter_context(eager_compiled())
        if self.functions:
            stack.enter_context(_Mode(self))
        self._exit = stack
        self._stack = []
        self._calls = {}
        self.active = True
        return self

    def stop(self) -> bool:
        """Remove the hooks and end recording; ``True`` when this call ended a recording."""
        if self._exit is None:
            return False
        self.active = False
        exit_stack, self._exit = self._exit, None
        exit_stack.close()
        self._stack = []
        return True

    def __enter__(self) -> ForwardRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_exit=None, _stack=[], active=False, events=[], on_activation=None, watch=None)
        return state

    # -- what the hooks do ------------------------------------------------------------------------

    def _fail(self, error: BaseException) -> None:
        self.error = f"{type(error).__name__}: {error}"
        self.active = False

    def _inside(self, flag: int) -> bool:
        return any(f & flag for _, f in self._stack)

    def _make_pre(self, name: str, flags: int) -> Callable[..., None]:
        def pre(module: nn.Module, args: Any) -> None:
            if self.active:
                self._stack.append((name, flags))
                self.modules_run.add(name)

        return pre

    def _make_post(self, name: str, flags: int, act: Activation | None) -> Callable[..., None]:
        def post(module: nn.Module, args: Any, output: Any) -> None:
            if not self.active or not self._stack:
                return
            try:
                self._stack.pop()
                if self._inside(self._ACT):
                    return  # inside an activation module: part of it
                if flags & self._ACT and act is not None:
                    out = output[0] if isinstance(output, (tuple, list)) and output else output
                    if hasattr(out, "data") and not isinstance(out, Tensor):  # a PackedSequence
                        out = out.data
                    via = Activation(act.kind, act.slope, name)
                    self._emit(
                        ActivationEvent(
                            name,
                            via,
                            out if isinstance(out, Tensor) else None,
                            module,
                            self._inside(self._LEAF),
                        )
                    )
                elif flags & self._LAYER:
                    self.events.append(("layer", name))
            except Exception as error:  # never fail the model's forward pass
                self._fail(error)

        return post

    def _function_called(self, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> None:
        try:
            act = function_activation(func, args, kwargs)
            if act is None or self._inside(self._ACT):
                return
            owner = self._stack[-1][0] if self._stack else ""
            short = _func_name(func)
            count = self._calls.get((owner, short), 0)
            self._calls[(owner, short)] = count + 1
            name = (f"{owner}." if owner else "") + short + (f"_{count}" if count else "")
            via = Activation(act.kind, act.slope, f"{act.via} in {owner or 'the model'}")
            self._emit(
                ActivationEvent(
                    name, via, out if isinstance(out, Tensor) else None, None, self._inside(self._LEAF)
                )
            )
        except Exception as error:  # never fail the model's forward pass
            self._fail(error)

    def _emit(self, event: ActivationEvent) -> None:
        if self.on_activation is not None:
            self.on_activation(event)
        if not self.keep_outputs:
            event = ActivationEvent(event.name, event.activation, None, event.module, event.in_layer)
        self.events.append(("act", event))

    # -- what it learnt ---------------------------------------------------------------------------

    def following(self) -> dict[str, Activation | None]:
        """The activation that runs right after each layer's first call (``None`` where a layer or
        nothing comes next). Activations inside a layer (see :class:`ActivationEvent`) do not count."""
        events = [e for e in self.events if e[0] == "layer" or not e[1].in_layer]
        found: dict[str, Activation | None] = {}
        for i, (kind, value) in enumerate(events):
            if kind == "layer" and value not in found:
                nxt = events[i + 1] if i + 1 < len(events) else None
                found[value] = nxt[1].activation if nxt is not None and nxt[0] == "act" else None
        return found

    def activations(self) -> list[str]:
        """Names of the activations seen, once each, in the order they first ran."""
        return list(dict.fromkeys(e[1].name for e in self.events if e[0] == "act"))


# -- 1. torch.fx ------------------------------------------------------------------------------------


class _LayerTracer(fx.Tracer):
    """Keeps layers and activation modules as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _owns_params(m) or module_activation(m) is not None:
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
