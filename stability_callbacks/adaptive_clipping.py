"""Adaptive clipping callbacks: :class:`AutoClip`, :class:`ZClip` and unit-wise :class:`AGC`.

AutoClip and ZClip clip the total gradient norm to a threshold that follows the run (a percentile of
past norms, an EMA z-score: :mod:`~stability_callbacks.policies`, whose state stays on the device); AGC
clips each unit's gradient against its weight norm (:mod:`~stability_callbacks.agc`). All three are
thin layers on the base :class:`~stability_callbacks.clipping_base.ClippingCallback`, which checks,
counts and logs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from stability_callbacks._checks import check_number
from stability_callbacks._trainer import ForwardOrder
from stability_callbacks.agc import UnitwisePlan, agc_decision, agc_scale
from stability_callbacks.clip_functions import ClipDecision, clip_grad_norm_to, scale_grads_
from stability_callbacks.clipping_base import CLIP_LOG_TABLE, ClippingCallback, given_or_total_norm
from stability_callbacks.policies import PercentilePolicy, ZScorePolicy
from stability_callbacks.stats import user_name

__all__ = ["AGC", "AutoClip", "ZClip"]

_AGCPlan = tuple[UnitwisePlan, Tensor, list[Tensor], Tensor]  # plan, clip mask, scale views, scale buffer


class AutoClip(ClippingCallback):
    """AutoClip (Seetharaman et al. 2020): clip to a percentile of the history of total gradient norms.

    With ``include_current=False`` it makes the same decisions as ``autoclip``'s
    ``QuantileClip(quantile=percentile / 100, history_length=history, global_threshold=True)``.
    Non-finite norms are neither clipped nor recorded.

    Args:
        percentile: the percentile of past norms used as the threshold, in ``[0, 100]``.
        history: how many past norms are kept (a ring buffer, > 0).
        include_current: whether the current norm takes part in its own threshold (the paper's rule).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + CLIP_LOG_TABLE.format(
        threshold="the percentile of the norm history (``inf`` before the first norm)",
        coef="factor applied to the gradients (1 when untouched)",
        clipped="1.0 when the norm exceeded the threshold",
    )

    def __init__(
        self,
        percentile: float = 10.0,
        history: int = 1000,
        include_current: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.policy = PercentilePolicy(percentile, history, include_current)
        super().__init__(log_every_n_steps)

    @property
    def _key_args(self) -> dict[str, Any]:
        p = self.policy
        return {"percentile": p.percentile, "history": p.history, "include_current": p.include_current}

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        norm = given_or_total_norm(grads, norm)
        return clip_grad_norm_to(grads, self.policy.step(norm), total=norm)

    def _extra_state(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state.get("policy", {}))


class ZClip(ClippingCallback):
    """ZClip (Kumar et al. 2025): clip total-norm spikes detected by a z-score against EMA statistics.

    Configured like the ``zclip`` package (1.0.0) it makes the same decisions on the same gradients;
    unlike it, a non-finite norm never enters the statistics (the package's turn NaN for good), the
    statistics survive resume, and nothing syncs the host. See :class:`ZScorePolicy` for the rule.

    Args:
        alpha: EMA smoothing in (0, 1).
        z_thresh: z-score threshold (> 0).
        max_grad_norm: absolute cap on the norm, or ``None`` (the package's default is 1.0).
        warmup_steps: finite norms collected before the EMA starts (>= 1).
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (mode ``"zscore"``).
        clip_factor: multiplier of the adaptive threshold (> 0).
        skip_update_on_spike: keep spikes out of the EMA.
        eps: added to the standard deviation in the z-score.
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + CLIP_LOG_TABLE.format(
        threshold="norm above which this step is clipped (spike level, capped by ``max_grad_norm``)",
        coef="factor applied to the gradients (1 when untouched)",
        clipped="1.0 when the step was clipped",
    )

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_grad_norm: float | None = None,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
        log_every_n_steps: int | None = None,
    ) -> None:
        self.policy = ZScorePolicy(
            alpha,
            z_thresh,
            max_grad_norm,
            warmup_steps,
            mode,
            clip_option,
            clip_factor,
            skip_update_on_spike,
            eps,
        )
        super().__init__(log_every_n_steps)

    @property
    def _key_args(self) -> dict[str, Any]:
        p = self.policy
        return {
            "alpha": p.alpha,
            "z_thresh": p.z_thresh,
            "max_grad_norm": p.max_grad_norm,
            "warmup_steps": p.warmup_steps,
            "mode": p.mode,
            "clip_option": p.clip_option,
            "clip_factor": p.clip_factor,
            "skip_update_on_spike": p.skip_update_on_spike,
        }

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        decision = self.policy.step(given_or_total_norm(grads, norm))
        scale_grads_(grads, decision.coef)
        return decision

    def _extra_state(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state.get("policy", {}))


class AGC(ClippingCallback):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021), fused across parameters.

    Under ``ModelParallelStrategy`` (FSDP2, tensor parallel) the unit norms are those of the full
    tensors, whether a shard holds whole units or parts of every unit, and the logged numbers are
    global (:mod:`~stability_callbacks.agc`); every rank clips its shard with the same factors.
    FSDP1 and DeepSpeed, whose gradients are flat shards, are refused at setup.

    With ``exclude=[]`` the gradients equal those of ``timm.utils.agc.adaptive_clip_grad``. Sparse
    gradients are left alone.

    Args:
        clip_factor: largest allowed ratio of a unit's gradient norm to its weight norm (> 0).
        eps: floor of the weight norm (>= 0), so zero-initialised units still train.
        exclude: ``None`` leaves out the final classifier layer (the last module with parameters to run
            in the first training step's forward pass), as the paper does; ``[]`` clips everything;
            otherwise ``fnmatch`` patterns on parameter names (``"head.*"``).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + CLIP_LOG_TABLE.format(
        threshold="``clip_factor``",
        coef="``norm_post / norm_pre``",
        clipped="fraction of the units (rows, output channels) that were clipped",
    )

    def __init__(
        self,
        clip_factor: float = 0.01,
        eps: float = 1e-3,
        exclude: Sequence[str] | None = None,
        log_every_n_steps: int | None = None,
    ) -> None:
        check_number("clip_factor", clip_factor, 0, low_open=True)
        check_number("eps", eps, 0)
        if exclude is not None and (isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude)):
            raise ValueError(f"`exclude` must be None or a list of fnmatch patterns, got {exclude!r}")
        super().__init__(log_every_n_steps)
        self.clip_factor = float(clip_factor)
        self.eps = float(eps)
        self.exclude = None if exclude is None else list(exclude)
        self.excluded_names: list[str] | None = None  # resolved parameter names
        self._order = ForwardOrder()
        self._cache_plan: tuple[tuple[int, ...], _AGCPlan] | None = None

    @property
    def _key_args(self) -> dict[str, Any]:
        return {"clip_factor": self.clip_factor, "eps": self.eps, "exclude": self.exclude}

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.exclude is None and self.excluded_names is None:
            self._order.start(pl_module)

    def _close_order(self, pl_module: nn.Module) -> None:
        """Once the first forward pass has run, exclude the parameters of the last layer it called."""
        if not self._order.stop() or not self._order.order:
            return
        last = self._order.order[-1]  # a user name, as are the names matched in _plan
        prefix = f"{last}." if last else ""
        module = next((m for n, m in pl_module.named_modules() if user_name(n) == last), None)
        params = [] if module is None else module.named_parameters(recurse=False)
        self.excluded_names = [prefix + n for n, _ in params]
        self._cache_plan = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._close_order(pl_module)

    def _excluded(self, name: str) -> bool:
        if self.exclude is None:
            return name in (self.excluded_names or [])
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def _plan(self, params: list[Tensor], pl_module: nn.Module) -> _AGCPlan:
        """The unit layout of ``params`` with its exclusion mask, built again when the parameters change."""
        key = tuple(map(id, params))
        if self._cache_plan is None or self._cache_plan[0] != key:
            names = {id(p): user_name(n) for n, p in pl_module.named_parameters()}
            plan = UnitwisePlan(params)
            mask = torch.cat(
                [
                    torch.full((rows,), not self._excluded(names.get(id(params[i]), "")), dtype=torch.bool)
                    for i, rows in zip(plan.order, plan.rows, strict=True)
                ]
            ).to(plan.device)
            buffer = torch.ones(plan.num_units, device=plan.device)
            self._cache_plan = (key, (plan, mask, plan.scale_views(buffer), buffer))
        return self._cache_plan[1]

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        self._close_order(pl_module)  # the forward pass of the first step has run
        dense = [p for p in params if not p.grad.is_sparse]  # type: ignore[union-attr]
        if not dense:
            zero = torch.zeros((), device=params[0].device)
            return ClipDecision(zero, zero, zero, zero + 1, zero, torch.ones((), dtype=torch.bool))
        plan, mask, views, buffer = self._plan(dense, pl_module)
        dgrads = [p.grad for p in dense]
        w_norm = plan.norms(dense)
        g_norm = plan.norms(dgrads)  # type: ignore[arg-type]
        scale, clip = agc_scale(w_norm, g_norm, self.clip_factor, self.eps)
        clip = clip & mask
        scale = torch.where(mask, scale, torch.ones_like(scale))
        buffer.copy_(scale)
        plan.mul_(dgrads, views)  # type: ignore[arg-type]
        return agc_decision(g_norm, scale, clip, self.clip_factor, plan)

    def _extra_state(self) -> dict[str, Any]:
        return {"excluded_names": list(self.excluded_names or [])} if self.excluded_names is not None else {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "excluded_names" in state:
            self.excluded_names = list(state["excluded_names"])
            self._cache_plan = None
