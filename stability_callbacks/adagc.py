"""AdaGC: per-tensor adaptive gradient clipping against an EMA of each tensor's own clipped norm.

Wang, Li, Chen, Zeng, Yang, Yu, Ma and Shen, "AdaGC: Improving Training Stability for Large Language
Model Pretraining", 2025 (arXiv:2502.11034). For parameter tensor ``i`` at step ``t``, with gradient
``g`` and ``gamma_i`` the running level of its clipped norm:

- warm-up (the first ``warmup_steps`` steps): global clipping, ``h = min(lambda_abs / ||g||_total, 1)``
  for every tensor, and ``gamma_i = min(gamma_i, ||h g_i||)`` (the first step sets it);
- afterwards, per tensor: ``h_i = min(lambda_rel * max(gamma_i, eps) / max(||g_i||, eps), 1)`` and
  ``gamma_i = beta * gamma_i + (1 - beta) * ||h_i g_i||``.

The paper's defaults: ``beta=0.98``, ``lambda_rel=1.05``, ``lambda_abs=1.0``, 100 warm-up steps; with
``warmup_steps=W`` the rule makes the same decisions as ``pytorch_optimizer.AdaGC(warmup_steps=W + 1)``
(whose step count starts at 1) on the same gradients.

Layer 1 is :func:`adagc_clip_`: plain PyTorch, no Lightning, no host sync. The per-tensor norms come from
:func:`stability_callbacks.stats.tensor_norms` (one fused pass; the full tensor's norm for DTensor
gradients), the scaling is one ``torch._foreach_mul_`` per device and dtype, and ``gamma`` stays a
device tensor. Layer 2 is :class:`AdaGC`, a :class:`~stability_callbacks.clipping.ClippingCallback`.

A step whose total norm is not finite is left untouched and leaves ``gamma`` unchanged: it belongs to
AMP's GradScaler or to :class:`~stability_callbacks.guard.NonFiniteGuard`. A tensor first seen after
warm-up (``gamma = inf``: no history) is left unclipped on that step and starts its level there.

From a plain PyTorch loop::

    gamma = torch.full((len(params),), math.inf)          # once
    ...
    loss.backward()
    grads = [p.grad for p in params]
    adagc_clip_(grads, gamma, warmup=step < 100)
    opt.step()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from stability_callbacks._checks import check_int, check_number
from stability_callbacks.clip_functions import ClipDecision, clip_coefficient
from stability_callbacks.clipping_base import ClippingCallback
from stability_callbacks.stats import combine_norms, local_tensor, tensor_norms, user_name

__all__ = ["AdaGC", "AdaGCStep", "adagc_clip_", "scale_each_"]


@dataclass(frozen=True)
class AdaGCStep:
    """What :func:`adagc_clip_` saw and did; every field a tensor on the gradients' device.

    Attributes:
        decision: the step as a :class:`~stability_callbacks.clip_functions.ClipDecision`: total norms
            before and after, ``threshold`` (``lambda_abs`` in warm-up, else the L2 norm of the
            per-tensor thresholds), ``coef = norm_post / norm_pre`` and ``clipped``, the fraction of
            tensors that were scaled down.
        norms: per-tensor L2 norms before clipping (float32, shape ``(n,)``).
        coefs: per-tensor factors applied (1 where untouched).
    """

    decision: ClipDecision
    norms: Tensor
    coefs: Tensor


def scale_each_(grads: Sequence[Tensor], coefs: Tensor) -> None:
    """Multiply ``grads[i]`` in place by ``coefs[i]`` (a 1-d device tensor), fused per device and dtype.

    DTensor gradients are scaled shard by shard; sparse gradients one by one.
    """
    local = [local_tensor(g) for g in grads]
    factors = coefs.unbind()
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, g in enumerate(local):
        if g.is_sparse:
            g.mul_(factors[i].to(g.device))
        elif g.numel():
            groups.setdefault((g.device, g.dtype), []).append(i)
    for (device, _), idx in groups.items():
        parts = [factors[i] if factors[i].device == device else factors[i].to(device) for i in idx]
        torch._foreach_mul_([local[i] for i in idx], parts)


def adagc_clip_(
    grads: Sequence[Tensor],
    gamma: Tensor,
    warmup: bool,
    lambda_abs: float = 1.0,
    lambda_rel: float = 1.05,
    beta: float = 0.98,
    eps: float = 1e-8,
    norms: Tensor | None = None,
) -> AdaGCStep:
    """Clip ``grads`` in place by the AdaGC rule and update ``gamma`` in place, without a host sync.

    Args:
        grads: the gradients, one per parameter tensor (modified in place).
        gamma: float32 tensor of shape ``(len(grads),)`` on the gradients' device: each tensor's running
            level of its clipped norm, ``inf`` where it has none yet (updated in place).
        warmup: whether this step is in the warm-up phase (global clipping to ``lambda_abs``).
        lambda_abs: the warm-up bound on the total norm (> 0).
        lambda_rel: the per-tensor bound, a multiple of ``gamma`` (> 0).
        beta: EMA weight of the past in ``[0, 1)``.
        eps: floor of ``gamma`` and of the gradient norms in the per-tensor ratio.
        norms: the per-tensor norms if already computed (:func:`~stability_callbacks.stats.tensor_norms`).

    Returns:
        The :class:`AdaGCStep`.
    """
    if norms is None:
        norms = tensor_norms(grads)
    norms = norms.float()
    device = norms.device
    total = combine_norms(norms)
    finite = torch.isfinite(total)
    fresh = torch.isinf(gamma)
    if warmup:
        threshold = torch.full((), float(lambda_abs), device=device)
        coefs = clip_coefficient(total, threshold).expand_as(norms)
        clipped_norms = norms * coefs
        new_gamma = torch.minimum(gamma, clipped_norms)
    else:
        limit = lambda_rel * gamma.clamp_min(eps)
        coefs = torch.where(fresh, 1.0, (limit / norms.clamp_min(eps)).clamp(max=1.0))
        threshold = combine_norms(torch.where(fresh, math.inf, limit))
        clipped_norms = norms * coefs
        new_gamma = torch.where(fresh, clipped_norms, torch.lerp(clipped_norms, gamma, beta))
    coefs = torch.where(finite, coefs, torch.ones_like(coefs))
    gamma.copy_(torch.where(finite, new_gamma, gamma))
    scale_each_(grads, coefs)
    post = combine_norms(norms * coefs)
    ratio = torch.where(finite & (total > 0), post / total, torch.ones_like(total))
    was_clipped = (coefs < 1.0).float().mean() if coefs.numel() else torch.zeros((), device=device)
    decision = ClipDecision(
        norm_pre=total,
        norm_post=torch.where(finite, post, total),
        threshold=threshold.float(),
        coef=ratio,
        clipped=torch.where(finite, was_clipped, torch.zeros_like(was_clipped)),
        finite=finite,
    )
    return AdaGCStep(decision=decision, norms=norms, coefs=coefs)


# parameter ids, their positions in `gamma`, and the parameters (held, so that their ids stay theirs)
_Index = tuple[tuple[int, ...], Tensor, list[Tensor]]


class AdaGC(ClippingCallback):
    """AdaGC (Wang et al. 2025): clip each parameter tensor against an EMA of its own clipped norm.

    For ``warmup_steps`` optimizer steps the total norm is clipped to ``lambda_abs`` (global clipping)
    while each tensor's level starts at the minimum of its clipped norms; afterwards each tensor is
    clipped to ``lambda_rel`` times its level, which follows an EMA (weight ``beta``) of the clipped
    norms. See :mod:`stability_callbacks.adagc` for the rule and :func:`adagc_clip_` for layer 1.

    The levels are kept per parameter name (the user's dotted names), so a checkpoint resumes them
    exactly and a parameter that has no gradient on some step keeps its level. Under
    ``ModelParallelStrategy`` (FSDP2, tensor parallel) the per-tensor norms of DTensor gradients are
    those of the whole tensors, so every rank clips alike.

    Args:
        lambda_abs: warm-up bound on the total gradient norm (> 0).
        lambda_rel: per-tensor bound relative to the tensor's level (> 0; the paper: 1.05).
        beta: EMA weight of the past in ``[0, 1)`` (the paper: 0.98).
        warmup_steps: optimizer steps of global clipping before the per-tensor rule (>= 0).
        eps: floor of the levels and norms in the per-tensor ratio (>= 0).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.

    Logged every ``log_every_n_steps`` optimizer steps (default: the trainer's), one host transfer:

    ==================  =====================================================================
    key                 value
    ==================  =====================================================================
    ``clip/norm_pre``   total L2 norm of the gradients before clipping
    ``clip/norm_post``  total L2 norm after clipping
    ``clip/threshold``  ``lambda_abs`` in warm-up, then the L2 norm of the per-tensor bounds
                        ``lambda_rel * level`` (``inf`` while some tensor has no level)
    ``clip/coef``       ``norm_post / norm_pre``
    ``clip/clipped``    fraction of the parameter tensors scaled down on this step
    ==================  =====================================================================
    """

    def __init__(
        self,
        lambda_abs: float = 1.0,
        lambda_rel: float = 1.05,
        beta: float = 0.98,
        warmup_steps: int = 100,
        eps: float = 1e-8,
        log_every_n_steps: int | None = None,
    ) -> None:
        check_number("lambda_abs", lambda_abs, 0, low_open=True)
        check_number("lambda_rel", lambda_rel, 0, low_open=True)
        check_number("beta", beta, 0, 1, high_open=True)
        check_int("warmup_steps", warmup_steps, 0)
        check_number("eps", eps, 0)
        super().__init__(log_every_n_steps)
        self.lambda_abs = float(lambda_abs)
        self.lambda_rel = float(lambda_rel)
        self.beta = float(beta)
        self.warmup_steps = warmup_steps
        self.eps = float(eps)
        self.names: list[str] = []  # parameter names, in the order of `gamma`
        self.gamma: Tensor | None = None  # float32 levels, inf = none yet
        self._cache_index: _Index | None = None

    @property
    def _key_args(self) -> dict[str, Any]:
        return {
            "lambda_abs": self.lambda_abs,
            "lambda_rel": self.lambda_rel,
            "beta": self.beta,
            "warmup_steps": self.warmup_steps,
        }

    def _positions(self, params: list[Tensor], pl_module: pl.LightningModule, device: torch.device) -> Tensor:
        """Positions of ``params`` in :attr:`gamma`, adding new names (built again when the list changes)."""
        key = tuple(map(id, params))
        cached = self._cache_index
        if cached is not None and cached[0] == key and cached[1].device == device:
            return cached[1]
        named = {id(p): user_name(n) for n, p in pl_module.named_parameters()}
        where = {n: i for i, n in enumerate(self.names)}
        positions = []
        for i, p in enumerate(params):
            name = named.get(id(p), f"<optimizer parameter {i}>")
            if name not in where:
                where[name] = len(self.names)
                self.names.append(name)
            positions.append(where[name])
        gamma = self.gamma.to(device) if self.gamma is not None else torch.empty(0, device=device)
        missing = len(self.names) - gamma.numel()
        self.gamma = torch.cat([gamma, torch.full((missing,), math.inf, device=device)])
        index = torch.tensor(positions, dtype=torch.long, device=device)
        self._cache_index = (key, index, list(params))
        return index

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        norms = tensor_norms(grads)
        index = self._positions(params, pl_module, norms.device)
        assert self.gamma is not None
        gamma = self.gamma.index_select(0, index)
        step = adagc_clip_(
            grads,
            gamma,
            warmup=self.steps < self.warmup_steps,
            lambda_abs=self.lambda_abs,
            lambda_rel=self.lambda_rel,
            beta=self.beta,
            eps=self.eps,
            norms=norms,
        )
        self.gamma.index_copy_(0, index, gamma)
        return step.decision

    def _extra_state(self) -> dict[str, Any]:
        if self.gamma is None:
            return {}
        return {"names": list(self.names), "gamma": self.gamma.detach().cpu().tolist()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        names, gamma = state.get("names"), state.get("gamma")
        self._cache_index = None
        if names is None or gamma is None or len(names) != len(gamma):
            self.names, self.gamma = [], None
            return
        self.names = [str(n) for n in names]
        self.gamma = torch.tensor([float(g) for g in gamma], dtype=torch.float32)
