"""Initialisation schemes: activation gains, tensor initialisers, recurrent and gated weights, and LSUV.

Plain PyTorch, no Lightning. Every initialiser works in place under ``torch.no_grad`` and keeps the
tensor object, so an optimizer that holds the parameter keeps working.

* ReLU family -> He / Kaiming (He et al., 2015, "Delving Deep into Rectifiers"), with the negative
  slope of a LeakyReLU in its gain; ELU, SiLU, GELU and friends -> He as for ReLU;
* tanh -> Xavier / Glorot with gain 5/3, sigmoid -> Xavier with gain 1, no activation -> Xavier
  (Glorot & Bengio, 2010, "Understanding the difficulty of training deep feedforward neural networks");
* RNN, LSTM, GRU -> Xavier input weights, orthogonal recurrent weights per gate block (Saxe et al.,
  2014), zero biases and an LSTM forget-gate bias of 1 (Jozefowicz et al., 2015).

LSUV, layer-sequential unit-variance initialisation (Mishkin & Matas, 2016, "All you need is a good
init"): orthogonal weights, then, in forward order, each Linear/Conv layer's weight is scaled until its
output standard deviation on a data batch is 1 within ``tol``. With ``center=True`` (the default) the
bias is also set so that each output unit has zero mean on the batch (as in fast.ai's LSUV); this is
what rescues sigmoid networks, whose 0.5-mean outputs otherwise push every unit into saturation.
``center=False`` is the paper's algorithm and matches the ``lsuv`` package weight for weight.
:class:`LSUVPass` holds LSUV's hooks, so the measurement can also run inside a real training step.

:func:`default_init` tells how PyTorch's own ``reset_parameters`` initialises a parameter, so that
``init_swap(model, "auto")`` can tell a layer nobody initialised from one that the model initialised
on purpose (GPT-2's N(0, 0.02) with its residual projections scaled by 1/sqrt(2 n_layer), timm's
truncated normal, torchvision's He fan-out), and keep the latter.

Which activation follows each layer is found by :mod:`stability_callbacks.activation_graph`; the whole
model is re-initialised by :func:`stability_callbacks.init.init_swap`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stability_callbacks._checks import check_bool, check_choice, check_int, check_number

__all__ = [
    "EMBEDDING_TYPES",
    "HE_KINDS",
    "LSUV_TYPES",
    "NORMAL_STD",
    "NORM_TYPES",
    "SCHEMES",
    "TENSOR_SCHEMES",
    "Activation",
    "LSUVPass",
    "LSUVResult",
    "activation_gain",
    "call_model",
    "default_init",
    "eval_no_grad",
    "init_blocks_",
    "init_parameter_",
    "init_recurrent_",
    "init_tensor_",
    "lsuv_",
    "lsuv_layer_names",
    "matches_default",
    "orthogonal_layers_",
    "own_init_method",
    "plan_scheme",
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
"""Schemes of :func:`~stability_callbacks.init.init_swap`. An override may also say ``"keep"``."""

TENSOR_SCHEMES = (
    "normal",
    "uniform",
    "xavier_uniform",
    "xavier_normal",
    "he_uniform",
    "he_normal",
    "orthogonal",
)
"""Schemes of :func:`init_tensor_`."""

NORMAL_STD = 0.02
"""Standard deviation of the ``"normal"`` scheme (the GPT-2 / BERT convention)."""

LSUV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""The layers LSUV scales."""

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)
"""Normalisation layers (weight 1, bias 0)."""

EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
"""Embeddings (no fan to preserve: kept unless named in an override)."""

HE_KINDS = frozenset({"elu", "celu", "silu", "gelu", "mish", "softplus", "hardswish"})
"""Smooth rectifiers initialised as for ReLU (He, gain sqrt(2))."""

_GATES = {"LSTM": 4, "GRU": 3}


# -- PyTorch's own initialisation --------------------------------------------------------------------


def _torch_reset(module: nn.Module) -> bool:
    """Whether ``module`` initialises itself as its torch base class does (no ``reset_parameters`` of its
    own)."""
    reset = getattr(type(module), "reset_parameters", None)
    return reset is None or getattr(reset, "__module__", "").startswith("torch.nn")


def default_init(module: nn.Module, name: str, param: Tensor) -> tuple[str, float] | None:
    """How PyTorch's ``reset_parameters`` initialises the parameter ``name`` of ``module``.

    Returns ``("uniform", bound)`` for U(-bound, bound), ``("normal", std)``, ``("constant", value)``,
    or ``None`` where the layer type is not one of torch's (HF's ``Conv1D``, a custom module) or
    overrides ``reset_parameters``.

    Args:
        module: the module that owns the parameter.
        name: the parameter's local name.
        param: the parameter.
    """
    if isinstance(module, NORM_TYPES):
        return ("constant", 1.0 if name == "weight" else 0.0)
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return ("uniform", 1.0 / math.sqrt(module.hidden_size)) if module.hidden_size > 0 else None
    if isinstance(module, nn.MultiheadAttention):
        if name == "in_proj_bias":
            return ("constant", 0.0)
        if name.endswith("proj_weight") and param.dim() == 2:
            fan_out, fan_in = param.shape
            return ("uniform", math.sqrt(6.0 / (fan_in + fan_out)))
        return None
    if isinstance(module, EMBEDDING_TYPES):
        return ("normal", 1.0) if name == "weight" else None
    layer_types = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
    if not isinstance(module, layer_types) or not _torch_reset(module):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2 or name not in ("weight", "bias"):
        return None
    if isinstance(module, nn.Bilinear):
        fan_in = weight.shape[1]
    else:
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
    return ("uniform", 1.0 / math.sqrt(fan_in)) if fan_in > 0 else None


INIT_METHODS = ("_init_weights", "init_weights", "reset_parameters")
"""Methods by which a model or module initialises itself (transformers' ``PreTrainedModel._init_weights``,
timm's ``VisionTransformer.init_weights``, Lightning's demo ``SimpleLSTM.init_weights``)."""


def own_init_method(module: nn.Module) -> str | None:
    """The name of the method by which ``module``'s class initialises it, where that method is not
    torch's own (every torch layer has a ``reset_parameters``: that is PyTorch's default); else ``None``."""
    for name in INIT_METHODS:
        method = getattr(type(module), name, None)
        if callable(method) and not getattr(method, "__module__", "").startswith("torch."):
            return name
    return None


def matches_default(spec: tuple[str, float], numel: int, std: float, low: float, high: float) -> bool:
    """Whether values with these statistics look drawn from the default ``spec`` of :func:`default_init`.

    A uniform default needs every value within its bound and the std within sampling error of
    ``bound / sqrt(3)`` (10%, or 1.8/sqrt(n) for small tensors); a normal one its std within 10% (or
    2.2/sqrt(n)); a constant every value equal to it.

    Args:
        spec: from :func:`default_init`.
        numel: number of values.
        std: their population standard deviation.
        low, high: their smallest and largest values.
    """
    kind, value = spec
    if kind == "constant":
        return low == value and high == value
    n = max(numel, 1)
    if kind == "uniform":
        if max(abs(low), abs(high)) > value * (1.0 + 1e-3):
            return False
        return abs(std / (value / math.sqrt(3.0)) - 1.0) <= max(0.1, 1.8 / math.sqrt(n))
    return abs(std / value - 1.0) <= max(0.1, 2.2 / math.sqrt(n))


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
    if activation.kind in HE_KINDS:
        return math.sqrt(2.0)
    return nn.init.calculate_gain(activation.kind)  # type: ignore[arg-type]  # tanh, selu


def plan_scheme(requested: str, activation: Activation | None) -> tuple[str, float, str]:
    """The scheme, gain and reason (in words) for a weight followed by ``activation``.

    ``"auto"`` and ``"lsuv"`` pick He for the ReLU family, LeCun normal for SELU and Xavier otherwise;
    an explicit scheme keeps its name and gets the gain of the activation.

    Args:
        requested: one of :data:`SCHEMES`.
        activation: the activation that follows the weight's layer, or ``None``.
    """
    act = activation
    what = "no activation" if act is None else act.describe()
    if requested in ("auto", "lsuv"):
        if act is not None and (act.kind in ("relu", "leaky_relu") or act.kind in HE_KINDS):
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


# -- forward passes on a sample batch ---------------------------------------------------------------


def call_model(model: nn.Module, sample_input: Any) -> Any:
    """``model(*x)`` for a tuple, ``model(**x)`` for a mapping, else ``model(x)``."""
    if isinstance(sample_input, tuple):
        return model(*sample_input)
    if isinstance(sample_input, Mapping):
        return model(**sample_input)
    return model(sample_input)


@contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for measuring forward passes; every module's own mode is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


# -- tensors ----------------------------------------------------------------------------------------


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
        scheme: one of :data:`TENSOR_SCHEMES`.
        gain: the activation gain (see :func:`activation_gain`); ignored by normal and uniform.
        generator: random generator (the global one if ``None``).

    Returns:
        ``tensor``.
    """
    check_choice("scheme", scheme, TENSOR_SCHEMES)
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


def init_blocks_(
    tensor: Tensor, blocks: int, scheme: str, gain: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Initialise ``tensor`` as ``blocks`` stacked blocks along dim 0, each on its own (gates, q/k/v).

    Args:
        tensor: a tensor with at least 2 dimensions whose first dimension ``blocks`` divides.
        blocks: number of blocks.
        scheme, gain, generator: as for :func:`init_tensor_`, applied to each block.

    Returns:
        ``tensor``.
    """
    dtype = tensor.dtype if tensor.dtype == torch.float64 else torch.float32
    values = torch.empty(tensor.shape, dtype=dtype, device=tensor.device)
    for chunk in values.chunk(blocks, dim=0):
        init_tensor_(chunk, scheme, gain, generator)
    with torch.no_grad():
        tensor.copy_(values)
    return tensor


def init_recurrent_(
    module: nn.RNNBase,
    name: str,
    param: Tensor,
    requested: str = "auto",
    forget_bias: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[str, str]:
    """Re-initialise one parameter of an RNN, LSTM or GRU in place, gate block by gate block.

    ``"auto"`` (and ``"lsuv"``): Xavier input weights, orthogonal recurrent and projection weights,
    zero biases and, for an LSTM, ``forget_bias`` on the forget gate of the input bias (the hidden bias
    holds 0). An explicit scheme replaces Xavier and orthogonal alike.

    Args:
        module: the recurrent layer.
        name: the parameter's local name (``"weight_ih_l0"``, ``"bias_hh_l1_reverse"``...).
        param: the parameter.
        requested: one of :data:`SCHEMES`.
        forget_bias: LSTM forget-gate bias.
        generator: random generator (the global one if ``None``).

    Returns:
        ``(scheme applied, reason in words)``.
    """
    blocks = _GATES.get(module.mode, 1)
    mode = module.mode
    if name.startswith("bias"):
        with torch.no_grad():
            param.zero_()
            if mode == "LSTM" and name.startswith("bias_ih"):
                hidden = param.shape[0] // 4
                param[hidden : 2 * hidden] = forget_bias
                return "zeros", f"LSTM bias 0, forget gate {forget_bias:g} (the hidden bias holds 0)"
        return "zeros", "recurrent bias"
    explicit = requested not in ("auto", "lsuv")
    if name.startswith("weight_ih"):
        scheme = requested if explicit else "xavier_uniform"
        init_blocks_(param, blocks, scheme, 1.0 if scheme != "he_normal" else math.sqrt(2), generator)
        return scheme, f"{mode} input weights, per gate block"
    if name.startswith("weight_hr"):
        scheme = requested if explicit else "orthogonal"
        init_tensor_(param, scheme, 1.0, generator)
        return scheme, f"{mode} projection weights"
    scheme = requested if explicit else "orthogonal"
    init_blocks_(param, blocks, scheme, 1.0 if not scheme.startswith("he_") else math.sqrt(2), generator)
    return scheme, f"{mode} recurrent weights, per gate block"


def init_parameter_(
    module: nn.Module,
    name: str,
    param: Tensor,
    requested: str = "auto",
    activation: Activation | None = None,
    *,
    named: bool = False,
    lsuv_center: bool = True,
    forget_bias: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[str, str]:
    """Re-initialise one parameter in place for its layer's type and the activation that follows it.

    Normalisation layers get weight 1 and bias 0 (resetting their running statistics is the caller's
    part); recurrent layers go to :func:`init_recurrent_`; biases get 0 and other 1-D parameters are
    kept (no fan-based scheme applies to them); embeddings are kept unless ``named``; a Linear/Conv
    weight under ``"lsuv"`` is left for :func:`lsuv_`, which starts from orthogonal weights; an
    attention input projection is initialised per q/k/v block; every other weight gets
    :func:`plan_scheme`'s choice.

    Args:
        module: the module that owns the parameter.
        name: the parameter's local name in ``module`` (``"weight"``, ``"in_proj_weight"``...).
        param: the parameter.
        requested: one of :data:`SCHEMES`.
        activation: the activation that follows ``module``, or ``None``.
        named: the parameter was named explicitly (an override): embeddings are re-initialised too.
        lsuv_center: LSUV will centre the biases of its layers (only changes the reason given).
        forget_bias: LSTM forget-gate bias.
        generator: random generator (the global one if ``None``).

    Returns:
        ``(scheme applied, reason in words)``; the scheme is ``"lsuv"`` for what LSUV still has to do.
    """
    if isinstance(module, NORM_TYPES):
        value = 1.0 if name == "weight" else 0.0
        with torch.no_grad():
            param.fill_(value)
        return ("ones" if value else "zeros"), "normalisation layer"
    if isinstance(module, nn.RNNBase):
        return init_recurrent_(module, name, param, requested, forget_bias, generator)
    lsuv = requested == "lsuv" and isinstance(module, LSUV_TYPES)
    known = isinstance(module, (*LSUV_TYPES, *EMBEDDING_TYPES, nn.MultiheadAttention, nn.Bilinear))
    if not known and "weight" not in name and "bias" not in name and not named:
        return "kept", "not a layer weight: no fan-based scheme applies (name it in `overrides` to change it)"
    if param.dim() < 2:
        if "bias" not in name:
            return "kept", "1-D parameter: no fan-based scheme applies"
        with torch.no_grad():
            param.zero_()
        if lsuv and lsuv_center:
            return "lsuv", "bias 0, then centred by LSUV"
        return "zeros", "bias"
    if isinstance(module, EMBEDDING_TYPES) and not named:
        return "kept", "embedding: no fan to preserve (name it in `overrides` to change it)"
    chosen, gain, why = plan_scheme(requested, activation)
    if lsuv:
        return "lsuv", "orthogonal, then scaled to unit output std"
    if requested == "lsuv":
        why = f"LSUV covers Linear/Conv only; {why}"
    if isinstance(module, nn.MultiheadAttention) and name == "in_proj_weight":
        init_blocks_(param, 3, chosen, 1.0 if requested == "auto" else gain, generator)
        return chosen, "attention input projection, per q/k/v block"
    if _transposed(module, name, param):  # HF's Conv1D holds its weight as (in_features, out_features)
        init_tensor_(param.T, chosen, gain, generator)
        return chosen, f"{why} (weight stored as (in, out))"
    init_tensor_(param, chosen, gain, generator)
    return chosen, why


def _transposed(module: nn.Module, name: str, param: Tensor) -> bool:
    """A ``Conv1D`` of transformers (GPT-2): a linear layer whose weight is (in_features, out_features)."""
    nf = getattr(module, "nf", None)
    return (
        type(module).__name__ == "Conv1D"
        and name == "weight"
        and param.dim() == 2
        and isinstance(nf, int)
        and param.shape[1] == nf
    )


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
