"""Initialise one parameter for its layer's type: normalisation, recurrent, attention, embedding, Linear/Conv.

Plain PyTorch, no Lightning; in place under ``torch.no_grad``, keeping the tensor object.
:func:`init_parameter_` dispatches on the layer type and uses the schemes of
:mod:`stability_callbacks.init_schemes` for the weights that have a fan to preserve. Recurrent layers
(:func:`init_recurrent_`): RNN, LSTM, GRU -> Xavier input weights, orthogonal recurrent weights per gate
block (Saxe et al., 2014), zero biases and an LSTM forget-gate bias of 1 (Jozefowicz et al., 2015).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from stability_callbacks.init_schemes import (
    EMBEDDING_TYPES,
    LSUV_TYPES,
    NORM_TYPES,
    Activation,
    init_blocks_,
    init_tensor_,
    plan_scheme,
    write_full_,
)

__all__ = ["init_parameter_", "init_recurrent_"]

_GATES = {"LSTM": 4, "GRU": 3}


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
        values = torch.zeros(param.shape, dtype=param.dtype, device=param.device)
        lstm_input = mode == "LSTM" and name.startswith("bias_ih")
        if lstm_input:
            hidden = param.shape[0] // 4
            values[hidden : 2 * hidden] = forget_bias
        write_full_(param, values)  # a sharded bias keeps its shard of the full values
        if lstm_input:
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
