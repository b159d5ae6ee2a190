"""Activation-aware weight initialisation, LSUV, and the ``InitSwap`` callback.

Layer 1 (plain PyTorch) re-initialises a model in place, layer by layer, for the activation that
follows each layer in the forward pass:

* ReLU family -> He / Kaiming (He et al., 2015, "Delving Deep into Rectifiers"), with the negative
  slope of a LeakyReLU in its gain; ELU, SiLU, GELU and friends -> He as for ReLU;
* tanh -> Xavier / Glorot with gain 5/3, sigmoid -> Xavier with gain 1, no activation -> Xavier
  (Glorot & Bengio, 2010, "Understanding the difficulty of training deep feedforward neural networks");
* RNN, LSTM, GRU -> Xavier input weights, orthogonal recurrent weights per gate block (Saxe et al.,
  2014), zero biases and an LSTM forget-gate bias of 1 (Jozefowicz et al., 2015);
* normalisation layers -> weight 1, bias 0; every other bias -> 0; other 1-D parameters are kept.

"The activation that follows" comes from a ``torch.fx`` trace where the model traces (so ``F.relu`` or
``torch.tanh`` written in ``forward`` count), else from the execution order of one forward pass on a
sample batch (module hooks plus a ``TorchFunctionMode`` that sees functional activations), else from
the order in which modules are registered.

LSUV, layer-sequential unit-variance initialisation (Mishkin & Matas, 2016, "All you need is a good
init"): orthogonal weights, then, in forward order, each Linear/Conv layer's weight is scaled until its
output standard deviation on a data batch is 1 within ``tol``. With ``center=True`` (the default) the
bias is also set so that each output unit has zero mean on the batch (as in fast.ai's LSUV); this is
what rescues sigmoid networks, whose 0.5-mean outputs otherwise push every unit into saturation.
``center=False`` is the paper's algorithm and matches the ``lsuv`` package weight for weight.

Layer 2 is :class:`InitSwap`, which applies this at the start of a fit, or once when the gradients of
the first steps are diagnosed as vanishing by :class:`~stability_callbacks.monitor.GradientDiagnostician`.

Example, from a plain PyTorch loop::

    report = init_swap(model)                                 # activation-aware, data-free
    report = init_swap(model, "lsuv", sample_input=x_batch)   # data-driven
    print(report)
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, fx, nn
from torch.optim import Optimizer
from torch.overrides import TorchFunctionMode

from stability_callbacks._trainer import (
    StabilityCallback,
    forward_order,
    log_scalars,
    optimizer_params,
    tensorboard_writer,
)
from stability_callbacks.monitor import GradientDiagnostician
from stability_callbacks.stats import LayerIndex, layer_norms, tensor_norms

__all__ = [
    "SCHEMES",
    "Activation",
    "InitRecord",
    "InitReport",
    "InitSwap",
    "LSUVResult",
    "activation_gain",
    "broadcast_module_",
    "check_overrides_match",
    "following_activations",
    "init_swap",
    "init_tensor_",
    "lsuv_",
]

SCHEMES = (
    "auto",
    "normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "orthogonal",
    "lsuv",
)
"""Schemes of :func:`init_swap`. An override may also say ``"keep"`` (leave the parameters as they are)."""

_TENSOR_SCHEMES = (
    "normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "orthogonal",
)
NORMAL_STD = 0.02
"""Standard deviation of the ``"normal"`` scheme (the GPT-2 / BERT convention)."""

_LSUV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
_GATES = {"LSTM": 4, "GRU": 3}

# -- activations ----------------------------------------------------------------------------------

_HE_KINDS = frozenset({"elu", "celu", "silu", "gelu", "mish", "softplus", "hardswish"})


@dataclass(frozen=True)
class Activation:
    """The activation that follows a layer.

    Attributes:
        kind: ``"relu"``, ``"leaky_relu"``, ``"elu"``, ``"celu"``, ``"selu"``, ``"silu"``, ``"gelu"``,
            ``"mish"``, ``"softplus"``, ``"hardswish"``, ``"tanh"`` or ``"sigmoid"``.
        slope: negative slope (``"leaky_relu"`` only).
        via: what was seen: a module name or a function such as ``F.relu``.
    """

    kind: str
    slope: float = 0.0
    via: str = ""

    def describe(self) -> str:
        name = f"LeakyReLU({self.slope:g})" if self.kind == "leaky_relu" else self.kind
        return f"{name} ({self.via})" if self.via else name


def activation_gain(activation: Activation | None) -> float:
    """The variance-preserving gain of an activation (``torch.nn.init.calculate_gain``'s values).

    ReLU: sqrt(2); LeakyReLU(a): sqrt(2 / (1 + a^2)); ELU, SiLU, GELU and the other smooth rectifiers:
    sqrt(2); SELU: 3/4; tanh: 5/3; sigmoid and no activation: 1.

    Args:
        activation: the activation, or ``None`` for none.
    """
    if activation is None or activation.kind == "sigmoid":
        return 1.0
    if activation.kind in ("relu", "leaky_relu"):
        return math.sqrt(2.0 / (1.0 + activation.slope**2))
    if activation.kind in _HE_KINDS:
        return math.sqrt(2.0)
    return nn.init.calculate_gain(activation.kind)  # type: ignore[arg-type]  # tanh, selu


def _module_activation(m: nn.Module) -> Activation | None:
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
    """A module owning parameters whose initialisation depends on what follows it."""
    return _owns_params(m) and not isinstance(m, (*_NORM_TYPES, *_EMBEDDING_TYPES, nn.RNNBase))


_PASS_MODULES: tuple[type[nn.Module], ...] = (
    *_NORM_TYPES,
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


class _LayerTracer(fx.Tracer):
    """Keeps layers and activation modules as single ``call_module`` nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _owns_params(m) or _module_activation(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


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


class _FunctionRecorder(TorchFunctionMode):
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


def _call(model: nn.Module, sample_input: Any) -> Any:
    """``model(*x)`` for a tuple, ``model(**x)`` for a mapping, else ``model(x)``."""
    if isinstance(sample_input, tuple):
        return model(*sample_input)
    if isinstance(sample_input, Mapping):
        return model(**sample_input)
    return model(sample_input)


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for measuring forward passes; every module's own mode is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


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
        stack.enter_context(_eval_no_grad(model))
        stack.enter_context(_FunctionRecorder(events, depth))
        _call(model, sample_input)
    found: dict[str, Activation | None] = {}
    for i, (kind, value) in enumerate(events):
        if kind == "layer" and value not in found:
            nxt = events[i + 1] if i + 1 < len(events) else None
            found[value] = nxt[1] if nxt is not None and nxt[0] == "act" else None
    return found


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


# -- one tensor -------------------------------------------------------------------------------------


def init_tensor_(
    tensor: Tensor, scheme: str, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Re-initialise one weight tensor in place (``torch.no_grad``; the tensor object is kept).

    Schemes: ``"normal"`` N(0, 0.02^2); ``"uniform"`` U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's
    default for Linear/Conv); ``"xavier_uniform"`` / ``"xavier_normal"`` variance
    gain^2 * 2 / (fan_in + fan_out); ``"he_uniform"`` / ``"he_normal"`` variance gain^2 / fan_in (pass
    gain sqrt(2) for ReLU); ``"orthogonal"`` a (semi-)orthogonal matrix times gain. Values are drawn in
    float32 (float64 for float64 tensors) and copied, so half-precision weights work too.

    Args:
        tensor: a tensor with at least 2 dimensions.
        scheme: one of the schemes above.
        gain: the activation gain (see :func:`activation_gain`); ignored by normal and uniform.
        generator: random generator (the global one if ``None``).

    Returns:
        ``tensor``.
    """
    if scheme not in _TENSOR_SCHEMES:
        raise ValueError(f"`scheme` must be one of {_TENSOR_SCHEMES}, got {scheme!r}")
    if tensor.dim() < 2:
        raise ValueError(
            f"`tensor` needs at least 2 dimensions for {scheme!r}, got shape {tuple(tensor.shape)}"
        )
    dtype = tensor.dtype if tensor.dtype == torch.float64 else torch.float32
    values = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
    fan_in, _ = nn.init._calculate_fan_in_and_fan_out(values)
    with torch.no_grad():
        if scheme == "normal":
            values.normal_(0.0, NORMAL_STD, generator=generator)
        elif scheme == "uniform":
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            values.uniform_(-bound, bound, generator=generator)
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(values, gain, generator=generator)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(values, gain, generator=generator)
        elif scheme == "he_normal":
            values.normal_(0.0, gain / math.sqrt(max(fan_in, 1)), generator=generator)
        elif scheme == "he_uniform":
            bound = gain * math.sqrt(3.0 / max(fan_in, 1))
            values.uniform_(-bound, bound, generator=generator)
        else:
            nn.init.orthogonal_(values, gain, generator=generator)
        tensor.copy_(values)
    return tensor


# -- LSUV -------------------------------------------------------------------------------------------


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


def _lsuv_layer_names(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, _LSUV_TYPES) and getattr(m, "weight", None) is not None and m.weight.requires_grad
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
    ``tol`` of ``target_std``, at most ``max_iters`` times. All of it happens in one forward pass: a
    hook on each layer adjusts the layer, re-evaluates it on the same input and hands the corrected
    output on, so every layer is measured on the output of the layers before it after their own
    correction, as in the paper's layer-by-layer loop, at the cost of one forward pass instead of one
    per layer. The pass runs in eval mode without gradients; every module's train/eval mode is
    restored and every hook removed, also on error.

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
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"`tol` must be > 0, got {tol!r}")
    if not (isinstance(max_iters, int) and max_iters >= 1):
        raise ValueError(f"`max_iters` must be an integer >= 1, got {max_iters!r}")
    if not (isinstance(target_std, (int, float)) and target_std > 0):
        raise ValueError(f"`target_std` must be > 0, got {target_std!r}")
    names = _lsuv_layer_names(model, layers)
    modules = dict(model.named_modules())
    if orthogonal:
        for n in names:
            m = modules[n]
            init_tensor_(m.weight, "orthogonal", 1.0, generator)
            if getattr(m, "bias", None) is not None:
                with torch.no_grad():
                    m.bias.zero_()
    results: dict[str, LSUVResult] = {}

    def make_hook(name: str) -> Callable[..., Any]:
        def hook(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            if name in results:  # a layer called twice is adjusted on its first call only
                return None
            results[name], out = _lsuv_layer(mod, args, kwargs, out, tol, max_iters, target_std, center)
            return out

        return hook

    with ExitStack() as stack:
        for n in names:
            stack.callback(modules[n].register_forward_hook(make_hook(n), with_kwargs=True).remove)
        stack.enter_context(_eval_no_grad(model))
        _call(model, sample_input)
    for n in names:
        if n not in results:
            results[n] = LSUVResult(math.nan, math.nan, 0, False, called=False)
    return results


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
            out = m.forward(*args, **kwargs)
        tries += 1
        std, mean_err, unit_mean, centred = stats(out)
    return LSUVResult(before, std, tries, ok(std, mean_err)), out


# -- the model --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InitRecord:
    """What :func:`init_swap` did to one parameter.

    Attributes:
        param: dotted parameter name.
        layer: dotted name of the module that owns it.
        shape: the parameter's shape.
        scheme: what was applied (``"he_normal"``, ``"zeros"``, ``"ones"``, ``"kept"``, ...).
        reason: why, in words (the activation that follows, the layer type, an override...).
        old_std: standard deviation before (population std, 0 for one element).
        new_std: standard deviation after.
    """

    param: str
    layer: str
    shape: tuple[int, ...]
    scheme: str
    reason: str
    old_std: float
    new_std: float

    @property
    def changed(self) -> bool:
        return self.scheme != "kept"


@dataclass(frozen=True)
class InitReport:
    """The result of :func:`init_swap`: one :class:`InitRecord` per parameter, in module order.

    Attributes:
        records: the records.
        scheme: the scheme asked for.
        traced_by: how the following activations were found (``"fx"``, ``"hooks"``, ``"registration"``).
        lsuv: per-layer LSUV results where LSUV ran.
    """

    records: tuple[InitRecord, ...]
    scheme: str
    traced_by: str
    lsuv: dict[str, LSUVResult] = field(default_factory=dict)

    def __getitem__(self, param: str) -> InitRecord:
        for r in self.records:
            if r.param == param:
                return r
        raise KeyError(param)

    @property
    def changed(self) -> list[InitRecord]:
        """Records of the parameters that were re-initialised."""
        return [r for r in self.records if r.changed]

    def _rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(r.param, f"{r.old_std:.4g}", r.scheme, f"{r.new_std:.4g}", r.reason) for r in self.records]

    def _title(self) -> str:
        return (
            f"init_swap(scheme={self.scheme!r}): {len(self.changed)} of {len(self.records)} parameters "
            f"re-initialised; activations found by {self.traced_by}"
        )

    def table(self) -> str:
        """A fixed-width table: parameter, old std, scheme, new std, reason."""
        head = ("parameter", "old std", "scheme", "new std", "why")
        rows = [head, *self._rows()]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [self._title()]
        for k, row in enumerate(rows):
            cells = [row[i].ljust(widths[i]) for i in range(4)]
            lines.append("  ".join([*cells, row[4]]).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in [*widths, len(head[4])]))
        return "\n".join(lines)

    def markdown(self) -> str:
        """The same table in Markdown (TensorBoard's text plugin renders it)."""
        lines = [
            f"**{self._title()}**",
            "",
            "| parameter | old std | scheme | new std | why |",
            "|---|---:|---|---:|---|",
        ]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self._rows()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_scheme(name: str, scheme: Any, allow_keep: bool = False) -> None:
    allowed = (*SCHEMES, "keep") if allow_keep else SCHEMES
    if scheme not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}, got {scheme!r}")


def _check_overrides(overrides: Mapping[str, str] | None) -> dict[str, str]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"`overrides` must be a mapping of name pattern to scheme, got {overrides!r}")
    for pattern, scheme in overrides.items():
        if not isinstance(pattern, str):
            raise ValueError(f"`overrides` keys must be name patterns (str), got {pattern!r}")
        _check_scheme(f"overrides[{pattern!r}]", scheme, allow_keep=True)
    return dict(overrides)


def _named_params(model: nn.Module) -> list[tuple[str, str, nn.Module, str, nn.Parameter]]:
    """(layer name, param name, module, local name, parameter) for every parameter, once each."""
    seen: set[int] = set()
    out = []
    for mod_name, m in model.named_modules():
        for local, p in m.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((mod_name, f"{mod_name}.{local}" if mod_name else local, m, local, p))
    return out


def check_overrides_match(model: nn.Module, overrides: Mapping[str, str] | None) -> None:
    """Raise ``ValueError`` if a pattern of ``overrides`` matches no parameter or module name of ``model``.

    Args:
        model: the model.
        overrides: ``{fnmatch pattern: scheme}``.
    """
    names: set[str] = set()
    for layer, param, *_ in _named_params(model):
        names.update((layer, param))
    for pattern in _check_overrides(overrides):
        if not any(fnmatchcase(n, pattern) for n in names):
            raise ValueError(
                f"`overrides` pattern {pattern!r} matches no parameter or module of {type(model).__name__}"
            )


def _stds(tensors: Sequence[Tensor]) -> list[float]:
    if not tensors:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = [0.0] * len(tensors)
    for idx in by_device.values():
        values = torch.stack([tensors[i].detach().float().std(correction=0) for i in idx]).tolist()
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    return out


def _block_init_(
    tensor: Tensor, blocks: int, scheme: str, gain: float, generator: torch.Generator | None
) -> None:
    """Initialise ``tensor`` as ``blocks`` stacked gate blocks along dim 0, each on its own."""
    dtype = tensor.dtype if tensor.dtype == torch.float64 else torch.float32
    values = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
    for chunk in values.chunk(blocks, dim=0):
        init_tensor_(chunk, scheme, gain, generator)
    with torch.no_grad():
        tensor.copy_(values)


def _plan_scheme(requested: str, act: Activation | None) -> tuple[str, float, str]:
    """(scheme, gain, reason) for a weight followed by ``act``."""
    what = "no activation" if act is None else act.describe()
    if requested in ("auto", "lsuv"):
        if act is not None and (act.kind in ("relu", "leaky_relu") or act.kind in _HE_KINDS):
            gain = activation_gain(act)
            return "he_normal", gain, f"followed by {what}: He (fan_in), gain {gain:.4g}"
        if act is not None and act.kind == "selu":
            return "he_normal", 1.0, f"followed by {what}: LeCun normal (gain 1), as SELU needs"
        gain = activation_gain(act)
        return "xavier_uniform", gain, f"followed by {what}: Xavier, gain {gain:.4g}"
    if requested.startswith("he_"):
        gain = (
            activation_gain(act) if act is not None and act.kind in ("relu", "leaky_relu") else math.sqrt(2)
        )
        return requested, gain, f"requested; followed by {what}, gain {gain:.4g}"
    if requested in ("xavier_uniform", "xavier_normal", "orthogonal"):
        gain = activation_gain(act)
        return requested, gain, f"requested; followed by {what}, gain {gain:.4g}"
    return requested, 1.0, "requested"


def init_swap(
    model: nn.Module,
    scheme: str = "auto",
    sample_input: Any | None = None,
    overrides: Mapping[str, str] | None = None,
    *,
    lsuv_tol: float = 0.1,
    lsuv_max_iters: int = 10,
    lsuv_center: bool = True,
    forget_bias: float = 1.0,
    generator: torch.Generator | None = None,
) -> InitReport:
    """Re-initialise every trainable parameter of ``model`` in place for the activations it uses.

    Parameters keep their identity (values are copied in under ``torch.no_grad``), so an optimizer
    holding them keeps working. Frozen parameters (``requires_grad=False``) and embeddings are kept
    unless an override names them. Normalisation layers get weight 1 and bias 0 (and fresh running
    statistics); biases 0; other 1-D parameters are kept (no fan-based scheme applies to them).
    Recurrent layers get Xavier input weights and orthogonal recurrent weights per gate block, zero
    biases and, for LSTMs, a total forget-gate bias of ``forget_bias``.

    Args:
        model: the model.
        scheme: one of :data:`SCHEMES`. ``"auto"`` picks per layer from the activation that follows it
            (He for the ReLU family, Xavier with tanh gain 5/3 for tanh, Xavier for sigmoid and none);
            an explicit scheme is applied with the gain of that activation; ``"lsuv"`` is the ``auto``
            treatment plus LSUV on the Linear/Conv layers.
        sample_input: a data batch, needed for ``"lsuv"`` and used to find activations where the model
            does not trace with ``torch.fx``.
        overrides: ``{fnmatch pattern: scheme or "keep"}`` matched against parameter and module names;
            the first matching pattern wins. A pattern that matches nothing is an error.
        lsuv_tol, lsuv_max_iters, lsuv_center: ``tol``, ``max_iters`` and ``center`` of :func:`lsuv_`.
        forget_bias: LSTM forget-gate bias.
        generator: random generator (the global one if ``None``).

    Returns:
        An :class:`InitReport`; ``print(report)`` shows the table.
    """
    _check_scheme("scheme", scheme)
    overrides = _check_overrides(overrides)
    check_overrides_match(model, overrides)
    params = _named_params(model)

    def requested_for(layer: str, param: str) -> tuple[str, str]:
        for pattern, s in overrides.items():
            if fnmatchcase(param, pattern) or fnmatchcase(layer, pattern):
                return s, f"override {pattern!r}"
        return scheme, ""

    wants_lsuv = any(
        p.requires_grad and isinstance(m, _LSUV_TYPES) and requested_for(layer, name)[0] == "lsuv"
        for layer, name, m, _, p in params
    )
    if wants_lsuv and sample_input is None:
        raise ValueError("scheme 'lsuv' needs `sample_input`, a data batch to measure the layers on")
    if scheme == "lsuv":
        _lsuv_layer_names(model, None)  # a clear error before anything changes

    acts, traced_by = following_activations(model, sample_input)
    old = _stds([p for *_, p in params])
    plan: list[tuple[str, str]] = []
    lsuv_layers: list[str] = []
    reset_norms: list[nn.Module] = []
    for layer, name, m, local, p in params:
        requested, source = requested_for(layer, name)
        prefix = f"{source}: " if source else ""
        if not p.requires_grad:
            plan.append(("kept", "frozen"))
            continue
        if requested == "keep":
            plan.append(("kept", f"{prefix}keep"))
            continue
        if isinstance(m, _NORM_TYPES):
            value = 1.0 if local == "weight" else 0.0
            with torch.no_grad():
                p.fill_(value)
            plan.append(("ones" if value else "zeros", f"{prefix}normalisation layer"))
            reset_norms.append(m)
            continue
        if isinstance(m, nn.RNNBase):
            plan.append(_init_rnn_param(m, local, p, requested, prefix, forget_bias, generator))
            continue
        if p.dim() < 2:
            if "bias" in local:
                with torch.no_grad():
                    p.zero_()
                if lsuv_center and requested == "lsuv" and isinstance(m, _LSUV_TYPES):
                    plan.append(("lsuv", f"{prefix}bias 0, then centred by LSUV"))
                else:
                    plan.append(("zeros", f"{prefix}bias"))
            else:
                plan.append(("kept", f"{prefix}1-D parameter: no fan-based scheme applies"))
            continue
        if isinstance(m, _EMBEDDING_TYPES) and not source:
            plan.append(("kept", "embedding: no fan to preserve (name it in `overrides` to change it)"))
            continue
        act = acts.get(layer)
        chosen, gain, why = _plan_scheme(requested, act)
        if requested == "lsuv" and isinstance(m, _LSUV_TYPES):
            lsuv_layers.append(layer)
            plan.append(("lsuv", f"{prefix}orthogonal, then scaled to unit output std"))
            continue
        if requested == "lsuv":
            why = f"LSUV covers Linear/Conv only; {why}"
        if isinstance(m, nn.MultiheadAttention) and local == "in_proj_weight":
            _block_init_(p, 3, chosen, 1.0 if requested == "auto" else gain, generator)
            plan.append((chosen, f"{prefix}attention input projection, per q/k/v block"))
            continue
        init_tensor_(p, chosen, gain, generator)
        plan.append((chosen, prefix + why))
    for m in reset_norms:
        reset = getattr(m, "reset_running_stats", None)
        if callable(reset):
            reset()
    lsuv_results: dict[str, LSUVResult] = {}
    if lsuv_layers:
        lsuv_results = lsuv_(
            model,
            sample_input,
            layers=lsuv_layers,
            tol=lsuv_tol,
            max_iters=lsuv_max_iters,
            center=lsuv_center,
            generator=generator,
        )
    new = _stds([p for *_, p in params])
    records = []
    for (layer, name, _, _, p), (chosen, why), o, n in zip(params, plan, old, new, strict=True):
        if chosen == "lsuv" and p.dim() >= 2 and layer in lsuv_results:
            r = lsuv_results[layer]
            if r.called:
                why += f" ({r.std_before:.3g} -> {r.std_after:.3g} in {r.tries} tries)"
            else:
                why = "LSUV: orthogonal only, the forward pass never reached this layer"
        records.append(InitRecord(name, layer, tuple(p.shape), chosen, why, o, n))
    return InitReport(tuple(records), scheme, traced_by, lsuv_results)


def _init_rnn_param(
    m: nn.RNNBase,
    local: str,
    p: Tensor,
    requested: str,
    prefix: str,
    forget_bias: float,
    generator: torch.Generator | None,
) -> tuple[str, str]:
    blocks = _GATES.get(m.mode, 1)
    if local.startswith("bias"):
        with torch.no_grad():
            p.zero_()
            if m.mode == "LSTM" and local.startswith("bias_ih"):
                hidden = p.shape[0] // 4
                p[hidden : 2 * hidden] = forget_bias
                return "zeros", f"{prefix}LSTM bias 0, forget gate {forget_bias:g} (the hidden bias holds 0)"
        return "zeros", f"{prefix}recurrent bias"
    explicit = requested not in ("auto", "lsuv")
    if local.startswith("weight_ih"):
        scheme = requested if explicit else "xavier_uniform"
        _block_init_(p, blocks, scheme, 1.0 if scheme != "he_normal" else math.sqrt(2), generator)
        return scheme, f"{prefix}{m.mode} input weights, per gate block"
    if local.startswith("weight_hr"):
        scheme = requested if explicit else "orthogonal"
        init_tensor_(p, scheme, 1.0, generator)
        return scheme, f"{prefix}{m.mode} projection weights"
    scheme = requested if explicit else "orthogonal"
    _block_init_(p, blocks, scheme, 1.0 if not scheme.startswith("he_") else math.sqrt(2), generator)
    return scheme, f"{prefix}{m.mode} recurrent weights, per gate block"


# -- the callback -----------------------------------------------------------------------------------

_WHEN = ("fit_start", "on_vanishing")


def _default_input(batch: Any) -> Any:
    """The model input of a batch: a tensor as is, the first element of a tuple or list."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(
        f"InitSwap cannot tell the model input in a batch of type {type(batch).__name__}; "
        "pass `get_input`, e.g. InitSwap(get_input=lambda batch: batch['image'])"
    )


def _concat(parts: list[Any]) -> Any:
    """Join the model inputs of several batches along dim 0 (tensors, and tuples/dicts of them)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, tuple):
        return tuple(_concat(list(items)) for items in zip(*parts, strict=True))
    if isinstance(first, Mapping):
        return {k: _concat([p[k] for p in parts]) for k in first}
    return first


def _first_loader(loaders: Any) -> Any:
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    return loaders


def _traces(model: nn.Module) -> bool:
    try:
        _LayerTracer().trace(model)
    except Exception:  # any model that symbolic tracing cannot follow
        return False
    return True


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` to all ranks, in place.

    One broadcast per device and dtype (flattened); a no-op without an initialised process group.

    Args:
        module: the module (the same architecture on every rank).
        src: the global rank whose values win.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in [*module.parameters(), *module.buffers()]:
        groups.setdefault((t.device, t.dtype), []).append(t)
    with torch.no_grad():
        for tensors in groups.values():
            flat = torch._utils._flatten_dense_tensors([t.detach() for t in tensors])
            dist.broadcast(flat, src=src)
            for t, v in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors), strict=True):
                t.copy_(v)


class InitSwap(StabilityCallback):
    """Re-initialises the model for the activations it uses, at the start of a fit or once gradients vanish.

    With ``when="fit_start"`` the model is re-initialised once, in ``on_train_start`` (before the first
    optimizer step; after the sanity check), in place, so the optimizer keeps its parameters. A fit
    that resumes from a checkpoint (``ckpt_path``) is never touched, and the callback remembers in its
    state that it has acted.

    With ``when="on_vanishing"`` it watches the first ``watch_steps`` optimizer steps: per-layer
    gradient norms go to :class:`~stability_callbacks.monitor.GradientDiagnostician`, and when the
    gradients have been vanishing for ``patience`` consecutive steps the model is re-initialised once,
    the optimizer state is cleared (moments, step counts; the param groups and learning rates stay),
    the gradients of that step are dropped (the step changes nothing), and a message says so. The watch
    window copies the norms to the host once per step (one sync a step, for ``watch_steps`` steps at
    most, and one all-reduce of the decision under DDP); after it, the callback costs nothing.

    ``"lsuv"`` (and models that ``torch.fx`` cannot trace) need data: ``lsuv_batches`` batches of the
    train dataloader, their model input picked by ``get_input``, moved to the module's device. Under
    DDP every rank initialises and rank zero's parameters and buffers are then broadcast, so all ranks
    hold identical weights. The report (per parameter: old std, scheme and why, new std) is printed
    on rank zero and written to TensorBoard as text under ``init/report``. Sharded strategies (FSDP,
    DeepSpeed, model parallel) are refused at setup.

    Args:
        scheme: one of :data:`SCHEMES` (see :func:`init_swap`).
        when: ``"fit_start"`` or ``"on_vanishing"``.
        overrides: ``{fnmatch pattern: scheme or "keep"}`` on parameter/module names; a pattern that
            matches nothing raises ``ValueError`` at setup.
        lsuv_batches: train batches joined into the LSUV batch.
        patience: consecutive vanishing steps before acting (``"on_vanishing"``).
        watch_steps: optimizer steps watched from the start (``"on_vanishing"``).
        vanishing_ratio, vanishing_norm: the vanishing rule of the diagnostician.
        lsuv_tol, lsuv_max_iters, lsuv_center: see :func:`lsuv_`.
        get_input: ``batch -> model input``; default: a tensor batch as is, else its first element.
        verbose: say on rank zero what was changed and why (a warning when re-initialising mid-run,
            then the report); ``False`` leaves that to the ``init/report`` text and ``init/reinit``.

    Logged keys:

    ==================  ===================================================================
    key                 meaning
    ==================  ===================================================================
    ``init/reinit``     1.0 at the step the model was re-initialised (logged only then)
    ``init/report``     TensorBoard text: the table of :class:`InitReport`
    ==================  ===================================================================
    """

    def __init__(
        self,
        scheme: str = "auto",
        when: str = "fit_start",
        overrides: Mapping[str, str] | None = None,
        lsuv_batches: int = 1,
        patience: int = 3,
        watch_steps: int = 50,
        vanishing_ratio: float = 1e-3,
        vanishing_norm: float = 1e-8,
        lsuv_tol: float = 0.1,
        lsuv_max_iters: int = 10,
        lsuv_center: bool = True,
        get_input: Callable[[Any], Any] | None = None,
        verbose: bool = True,
    ) -> None:
        _check_scheme("scheme", scheme)
        if when not in _WHEN:
            raise ValueError(f"`when` must be one of {_WHEN}, got {when!r}")
        self.overrides = _check_overrides(overrides)
        for name, value in (
            ("lsuv_batches", lsuv_batches),
            ("patience", patience),
            ("watch_steps", watch_steps),
            ("lsuv_max_iters", lsuv_max_iters),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        if not (isinstance(lsuv_tol, (int, float)) and lsuv_tol > 0):
            raise ValueError(f"`lsuv_tol` must be > 0, got {lsuv_tol!r}")
        if get_input is not None and not callable(get_input):
            raise ValueError(f"`get_input` must be callable or None, got {get_input!r}")
        self.scheme = scheme
        self.when = when
        self.lsuv_batches = lsuv_batches
        self.patience = patience
        self.watch_steps = watch_steps
        self.lsuv_tol = lsuv_tol
        self.lsuv_max_iters = lsuv_max_iters
        self.lsuv_center = lsuv_center
        self.get_input = get_input
        self.verbose = verbose
        self.diagnostician = GradientDiagnostician(
            vanishing_ratio=vanishing_ratio, vanishing_norm=vanishing_norm, patience=patience
        )
        self.applied = False
        self.reinit_step = -1
        self.last_report: InitReport | None = None
        self._order: list[str] | None = None
        self._order_stack: ExitStack | None = None
        self._index_cache: dict[tuple[int, ...], LayerIndex] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.scheme, when=self.when)

    # -- set-up -----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        strategy = trainer.strategy
        if (
            isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))
            or "DeepSpeed" in type(strategy).__name__
        ):
            raise ValueError(
                f"InitSwap cannot re-initialise sharded parameters under {type(strategy).__name__}; "
                "initialise the model before wrapping it, e.g. with init_swap(model)"
            )
        check_overrides_match(pl_module, self.overrides)
        self._order = None
        self._index_cache.clear()

    # -- acting -----------------------------------------------------------------------------------

    def _needs_data(self, pl_module: nn.Module) -> bool:
        return self.scheme == "lsuv" or "lsuv" in self.overrides.values() or not _traces(pl_module)

    def _sample_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any | None:
        loader = _first_loader(trainer.train_dataloader)
        datamodule = getattr(trainer, "datamodule", None)
        if loader is None and datamodule is not None:
            loader = _first_loader(datamodule.train_dataloader())
        if loader is None:
            return None
        get_input = self.get_input or _default_input
        parts = []
        for batch in loader:
            parts.append(get_input(batch))
            if len(parts) == self.lsuv_batches:
                break
        if not parts:
            return None
        return move_data_to_device(_concat(parts), pl_module.device)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, why: str) -> InitReport:
        sample = self._sample_input(trainer, pl_module) if self._needs_data(pl_module) else None
        report = init_swap(
            pl_module,
            self.scheme,
            sample_input=sample,
            overrides=self.overrides,
            lsuv_tol=self.lsuv_tol,
            lsuv_max_iters=self.lsuv_max_iters,
            lsuv_center=self.lsuv_center,
        )
        broadcast_module_(pl_module)
        self.applied = True
        self.reinit_step = trainer.global_step
        self.last_report = report
        if self.verbose:
            rank_zero_info(f"InitSwap: {why}\n{report.table()}")
        writer = tensorboard_writer(trainer)
        if writer is not None:
            writer.add_text("init/report", report.markdown(), global_step=trainer.global_step)
        log_scalars(trainer, {"init/reinit": 1.0})
        return report

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when != "fit_start" or self.applied:
            return
        self.applied = True
        if trainer.ckpt_path is not None:
            if self.verbose:
                rank_zero_info(
                    "InitSwap: the fit resumes from a checkpoint; the weights are left as they are."
                )
            return
        self._apply(trainer, pl_module, "re-initialised the model before the first step.")

    # -- watching for vanishing gradients -----------------------------------------------------------

    def _watching(self, trainer: pl.Trainer) -> bool:
        return self.when == "on_vanishing" and not self.applied and trainer.global_step < self.watch_steps

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._watching(trainer) and self._order is None and self._order_stack is None:
            self._order_stack = ExitStack()
            self._order = self._order_stack.enter_context(forward_order(pl_module))

    def _close_order(self) -> None:
        if self._order_stack is not None:
            self._order_stack.close()
            self._order_stack = None
            self._index_cache.clear()

    def _index(self, pl_module: pl.LightningModule, optimizer: Optimizer) -> LayerIndex:
        """Trainable parameters of the optimizer by layer, layers in forward order (cached)."""
        trainable = [p for p in optimizer_params(optimizer) if p.requires_grad]
        key = (id(optimizer), *(id(p) for p in trainable))
        if key not in self._index_cache:
            index = LayerIndex.build(pl_module)
            if self._order:
                index = index.reorder(self._order)
            wanted = {id(p) for p in trainable}
            keep = [i for i, p in enumerate(index.params) if id(p) in wanted]
            used = sorted({index.layer_of[i] for i in keep})
            remap = {old: new for new, old in enumerate(used)}
            self._index_cache[key] = LayerIndex(
                [index.layer_names[i] for i in used],
                [index.param_names[i] for i in keep],
                [index.params[i] for i in keep],
                [remap[index.layer_of[i]] for i in keep],
            )
        return self._index_cache[key]

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self._close_order()
        if not self._watching(trainer):
            return
        index = self._index(pl_module, optimizer)
        grads = [p.grad for p in index.params]
        if not grads or all(g is None for g in grads):
            return
        per_param = tensor_norms(grads)
        per_layer = layer_norms(per_param, index)
        total = torch.linalg.vector_norm(per_param.double()).float()
        has_grad = [False] * len(index.layer_names)
        for g, layer in zip(grads, index.layer_of, strict=True):
            has_grad[layer] = has_grad[layer] or g is not None
        host = torch.cat([total.reshape(1), per_layer]).tolist()  # the watch window's one sync a step
        norms = [v if has_grad[i] else None for i, v in enumerate(host[1:])]
        diagnosis = self.diagnostician.update(host[0], norms, index.layer_names)
        if not trainer.strategy.reduce_boolean_decision(diagnosis.vanishing, all=False):
            return
        ratio = "n/a" if diagnosis.depth_ratio is None else f"{diagnosis.depth_ratio:.3g}"
        what = (
            f"gradients vanished for {self.patience} consecutive steps (depth ratio {ratio} at step "
            f"{trainer.global_step}); re-initialised the model with scheme {self.scheme!r}, cleared the "
            "optimizer state and dropped this step's gradients."
        )
        if self.verbose:
            rank_zero_warn(f"InitSwap: {what}", category=UserWarning)
        self._apply(trainer, pl_module, what)
        for opt in trainer.optimizers:
            opt.state.clear()
        for p in pl_module.parameters():
            p.grad = None

    # -- lifecycle and state ----------------------------------------------------------------------

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close_order()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close_order()
        super().on_exception(trainer, pl_module, exception)

    def state_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "reinit_step": self.reinit_step,
            "diagnostician": self.diagnostician.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict.get("applied", False))
        self.reinit_step = int(state_dict.get("reinit_step", -1))
        self.diagnostician.load_state_dict(state_dict.get("diagnostician", {}))
