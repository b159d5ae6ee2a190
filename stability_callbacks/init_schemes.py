"""Initialisation schemes: activation gains, PyTorch's defaults and the tensor initialisers.

Plain PyTorch, no Lightning. Every initialiser works in place under ``torch.no_grad`` and keeps the
tensor object, so an optimizer that holds the parameter keeps working.

* ReLU family -> He / Kaiming (He et al., 2015, "Delving Deep into Rectifiers"), with the negative
  slope of a LeakyReLU in its gain; ELU, SiLU, GELU and friends -> He as for ReLU;
* tanh -> Xavier / Glorot with gain 5/3, sigmoid -> Xavier with gain 1, no activation -> Xavier
  (Glorot & Bengio, 2010, "Understanding the difficulty of training deep feedforward neural networks").

:func:`plan_scheme` makes that choice for a weight; :func:`init_tensor_` and :func:`init_blocks_` draw
the values. :func:`default_init` tells how PyTorch's own ``reset_parameters`` initialises a parameter,
so that ``init_swap(model, "auto")`` can tell a layer nobody initialised from one that the model
initialised on purpose (GPT-2's N(0, 0.02) with its residual projections scaled by 1/sqrt(2 n_layer),
timm's truncated normal, torchvision's He fan-out), and keep the latter.

Sharded parameters (the DTensors of FSDP2 ``fully_shard`` and tensor parallelism) get the values of
the full tensor: fans come from the global shape, the full tensor is drawn on every rank (one
parameter at a time: its full size in float32 of extra memory, for the moment of its draw) and
:func:`write_full_` keeps this rank's shard of rank zero's draw, so the result is the tensor the
unsharded model gets at the same seed, orthogonal matrices included.

Beside it: :mod:`stability_callbacks.layer_init` initialises one parameter for its layer type
(normalisation, recurrent and attention layers, embeddings), :mod:`stability_callbacks.lsuv` holds
LSUV, :mod:`stability_callbacks.activation_graph` finds which activation follows each layer, and
:func:`stability_callbacks.init.init_swap` re-initialises the whole model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stability_callbacks._checks import check_choice
from stability_callbacks.stats import local_tensor

try:  # DTensor: the parameters of FSDP2 (fully_shard) and tensor parallelism
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a build of torch without torch.distributed
    DTensor = distribute_tensor = None  # type: ignore[assignment,misc]

__all__ = [
    "EMBEDDING_TYPES",
    "HE_KINDS",
    "INIT_METHODS",
    "LSUV_TYPES",
    "NORMAL_STD",
    "NORM_TYPES",
    "SCHEMES",
    "TENSOR_SCHEMES",
    "Activation",
    "activation_gain",
    "call_model",
    "default_init",
    "eval_no_grad",
    "init_blocks_",
    "init_tensor_",
    "matches_default",
    "own_init_method",
    "plan_scheme",
    "write_full_",
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


def write_full_(tensor: Tensor, values: Tensor) -> Tensor:
    """Copy ``values``, shaped as the full ``tensor``, into it in place (no grad; the object is kept).

    For a DTensor (FSDP2, tensor parallelism) this rank keeps its shard of global rank zero's
    ``values`` (``distribute_tensor`` scatters them, one collective), so every rank holds a shard of
    the same full tensor even where the ranks' random generators differ.

    Args:
        tensor: the destination, a plain tensor or a DTensor (``tensor.shape`` is the full shape).
        values: the full values.

    Returns:
        ``tensor``.
    """
    with torch.no_grad():
        if DTensor is not None and isinstance(tensor, DTensor):
            shard = distribute_tensor(values.to(tensor.dtype), tensor.device_mesh, tensor.placements)
            local_tensor(tensor).copy_(shard.to_local())
        else:
            tensor.copy_(values)
    return tensor


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
        tensor: a tensor with at least 2 dimensions (a DTensor gets its shard of the full draw:
            :func:`write_full_`).
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
    return write_full_(tensor, values)


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
    return write_full_(tensor, values)
