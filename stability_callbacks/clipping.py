"""Clipping callbacks: fixed norm and value clipping, AutoClip, ZClip and unit-wise AGC.

Each callback acts in ``on_before_optimizer_step`` (after AMP unscaling, once per optimizer step) and
is a thin layer over plain-PyTorch functions, re-exported here for a plain loop:

- :mod:`~stability_callbacks.clip_functions`: :func:`clip_grad_norm_to`, :func:`clip_grad_value_`,
  :func:`scale_grads_`, :class:`ClipDecision`;
- :mod:`~stability_callbacks.policies`: :class:`PercentilePolicy` (AutoClip) and :class:`ZScorePolicy`
  (ZClip), thresholds whose state stays on the device;
- :mod:`~stability_callbacks.agc`: :func:`adaptive_clip_grad_`, :class:`UnitwisePlan`;
- total norms come from :func:`stability_callbacks.stats.total_norm`.

Nothing here reads a value to the host off logging steps. A step whose total norm is not finite is
left untouched (coefficient 1): it belongs to AMP's GradScaler or to
:class:`~stability_callbacks.guard.NonFiniteGuard`. Use one clipping callback per trainer.

Manual optimization: the callbacks refuse to run there (they cannot know which gradients belong to
which step). Call layer 1 yourself between ``manual_backward`` and ``opt.step()``::

    policy = PercentilePolicy(percentile=10.0)          # in __init__
    ...
    self.manual_backward(loss)
    grads = [p.grad for p in self.parameters() if p.grad is not None]
    norm = total_norm(grads)
    clip_grad_norm_to(grads, policy.step(norm), total=norm)
    opt.step()
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer

from stability_callbacks._checks import check_int, check_number
from stability_callbacks._trainer import (
    ForwardOrder,
    StabilityCallback,
    check_one_clipper,
    is_logging_step,
    log_every,
    log_scalars,
    optimizer_grads,
    refuse_sharded,
)
from stability_callbacks.agc import UnitwisePlan, adaptive_clip_grad_, agc_decision, agc_scale, unitwise_norms
from stability_callbacks.clip_functions import (
    ClipDecision,
    clip_coefficient,
    clip_grad_norm_to,
    clip_grad_value_,
    scale_grads_,
)
from stability_callbacks.policies import PercentilePolicy, ZScorePolicy
from stability_callbacks.stats import total_norm, user_name

__all__ = [
    "AGC",
    "AutoClip",
    "ClipDecision",
    "ClippingCallback",
    "NormClip",
    "PercentilePolicy",
    "UnitwisePlan",
    "ValueClip",
    "ZClip",
    "ZScorePolicy",
    "adaptive_clip_grad_",
    "check_clipping_fit_start",
    "check_clipping_setup",
    "clip_coefficient",
    "clip_grad_norm_to",
    "clip_grad_value_",
    "scale_grads_",
    "total_norm",
    "unitwise_norms",
]


def check_clipping_setup(trainer: pl.Trainer, name: str, dtensor_ok: bool = True) -> None:
    """Raise a clear error where a clipping callback cannot be correct (called at setup).

    ``dtensor_ok``: the callback is exact on DTensor gradients (``ModelParallelStrategy``).
    """
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val:
        raise MisconfigurationException(
            f"{name} clips the gradients itself; remove `Trainer(gradient_clip_val={clip_val})` (both would "
            "clip the same step, and Lightning's clipping would run after this callback's)."
        )
    refuse_sharded(
        trainer,
        name,
        "each rank holds a shard of the gradients, so the local norms are not the global ones",
        "Use DDP, or ModelParallelStrategy (FSDP2, tensor parallel): it clips DTensor gradients exactly."
        if dtensor_ok
        else "Use DDP, or ZClip, AutoClip or NormClip, which clip the DTensor gradients of "
        "ModelParallelStrategy exactly.",
        dtensor_ok=dtensor_ok,
    )


def check_clipping_fit_start(trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
    """Raise a clear error for manual optimization and fused optimizers under a GradScaler."""
    if not pl_module.automatic_optimization:
        raise MisconfigurationException(
            f"{name} acts in automatic optimization only. Under manual optimization, call the functions of "
            "`stability_callbacks.clipping` between `manual_backward` and `opt.step()` (see that module's "
            "docstring)."
        )
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        for optimizer in trainer.optimizers:
            if getattr(optimizer, "_step_supports_amp_scaling", False):
                raise MisconfigurationException(
                    f"{name} cannot clip with the fused optimizer {type(optimizer).__name__} under "
                    "'16-mixed': its gradients are still scaled when the callback runs. Use a non-fused "
                    "optimizer or 'bf16-mixed'."
                )


_AGCPlan = tuple[UnitwisePlan, Tensor, list[Tensor], Tensor]  # plan, clip mask, scale views, scale buffer


def _norm_of(grads: list[Tensor], norm: Tensor | None) -> Tensor:
    return norm if norm is not None else total_norm(grads)


class ClippingCallback(StabilityCallback):
    """Base of the clipping callbacks: checks, gradient gathering, counters, logging, state.

    A subclass implements ``_clip(params, grads, pl_module, norm) -> ClipDecision`` (clip ``grads`` in
    place; ``norm`` is their total norm when the caller has it) and, for running state,
    ``_extra_state`` / ``_load_extra_state``; :meth:`clip` is the public per-step call.

    Args:
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    modifies_gradients = True
    clips_gradients = True
    supports_dtensor = True  # exact on the DTensor gradients of ModelParallelStrategy

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        super().__init__()
        check_int("log_every_n_steps", log_every_n_steps, allow_none=True)
        self.log_every_n_steps = log_every_n_steps
        self.steps = 0  # optimizer steps with gradients seen
        self._clipped: Tensor | None = None  # device counters
        self._skipped: Tensor | None = None
        self._warned_no_grads = False

    @property
    def _key_args(self) -> dict[str, Any]:
        return {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._key_args)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in [k for k in state if k.startswith("_cache")]:
            state[key] = None
        return state

    # -- checks ----------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            check_clipping_setup(trainer, type(self).__name__, self.supports_dtensor)
            check_one_clipper(trainer, self)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_clipping_fit_start(trainer, pl_module, type(self).__name__)

    # -- the step --------------------------------------------------------------------------------------

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        """Clip ``grads`` (those of ``params``) in place; ``norm`` is their total norm when known."""
        raise NotImplementedError

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params, grads = optimizer_grads(optimizer)
        if grads:
            self.clip(trainer, pl_module, params, grads)

    def clip(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: list[Tensor],
        grads: list[Tensor],
        norm: Tensor | None = None,
    ) -> ClipDecision:
        """Clip ``grads`` (the gradients of ``params``) in place, count, and log on logging steps.

        The step of ``on_before_optimizer_step``, public so a composing callback can run it on the
        gradients it gathered, passing their total norm when it has it already. Returns the
        :class:`ClipDecision` (device tensors; nothing is read on the host off logging steps).
        """
        decision = self._clip(params, grads, pl_module, norm)
        self.steps += 1
        device = decision.norm_pre.device
        if self._clipped is None or self._skipped is None:
            self._clipped = torch.zeros((), dtype=torch.float32, device=device)
            self._skipped = torch.zeros((), dtype=torch.float32, device=device)
        elif self._clipped.device != device:  # restored from a checkpoint onto another device
            self._clipped, self._skipped = self._clipped.to(device), self._skipped.to(device)
        self._clipped += decision.clipped
        self._skipped += (~decision.finite).float()
        if trainer.loggers and is_logging_step(trainer, log_every(trainer, self.log_every_n_steps)):
            log_scalars(
                trainer,
                {
                    "clip/norm_pre": decision.norm_pre,
                    "clip/norm_post": decision.norm_post,
                    "clip/threshold": decision.threshold,
                    "clip/coef": decision.coef,
                    "clip/clipped": decision.clipped,
                },
            )
        return decision

    # -- state -----------------------------------------------------------------------------------------

    @property
    def clipped_steps(self) -> Tensor:
        """Steps clipped so far (for AGC, the sum of the clipped-unit fractions), a device tensor."""
        return self._clipped if self._clipped is not None else torch.zeros(())

    @property
    def skipped_steps(self) -> Tensor:
        """Steps with a non-finite total norm (left to the GradScaler or a guard), a device tensor."""
        return self._skipped if self._skipped is not None else torch.zeros(())

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "clipped": float(self.clipped_steps.detach().cpu()),
            "skipped": float(self.skipped_steps.detach().cpu()),
            **self._extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict.get("steps", 0))
        self._clipped = torch.tensor(float(state_dict.get("clipped", 0.0)))
        self._skipped = torch.tensor(float(state_dict.get("skipped", 0.0)))
        self._load_extra_state(state_dict)


_LOG_TABLE = """
    Logged every ``log_every_n_steps`` optimizer steps (default: the trainer's), one host transfer:

    ==================  =====================================================================
    key                 value
    ==================  =====================================================================
    ``clip/norm_pre``   total L2 norm of the gradients before clipping
    ``clip/norm_post``  total L2 norm after clipping
    ``clip/threshold``  {threshold}
    ``clip/coef``       {coef}
    ``clip/clipped``    {clipped}
    ==================  =====================================================================
"""


class NormClip(ClippingCallback):
    """Clip the total gradient norm to a fixed ``max_norm`` (``gradient_clip_val``, observable and sync-free).

    Args:
        max_norm: the bound on the total L2 norm (> 0).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's.
    """

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
        threshold="``max_norm``",
        coef="factor applied to the gradients (1 when untouched)",
        clipped="1.0 when the norm exceeded the threshold",
    )

    def __init__(self, max_norm: float = 1.0, log_every_n_steps: int | None = None) -> None:
        check_number("max_norm", max_norm, 0, low_open=True)
        super().__init__(log_every_n_steps)
        self.max_norm = float(max_norm)

    @property
    def _key_args(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        return clip_grad_norm_to(grads, self.max_norm, total=_norm_of(grads, norm))


class ValueClip(ClippingCallback):
    """Clamp every gradient element to ``[-max_value, max_value]``, with logging.

    Clamping turns an infinite gradient element into ``±max_value``: put :class:`NonFiniteGuard` before
    this callback in the callback list so it still sees the infinity (AMP's GradScaler detects it
    before any callback runs).

    Args:
        max_value: the bound on each element's magnitude (> 0).
        log_every_n_steps: logging cadence in optimizer steps; ``None`` uses the trainer's. The norms
            are only computed on logging steps.
    """

    hides_nonfinite = True

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
        threshold="``max_value``",
        coef="``norm_post / norm_pre``",
        clipped="1.0 when some element was clamped",
    )

    def __init__(self, max_value: float = 1.0, log_every_n_steps: int | None = None) -> None:
        check_number("max_value", max_value, 0, low_open=True)
        super().__init__(log_every_n_steps)
        self.max_value = float(max_value)

    @property
    def _key_args(self) -> dict[str, Any]:
        return {"max_value": self.max_value}

    def _clip(
        self, params: list[Tensor], grads: list[Tensor], pl_module: pl.LightningModule, norm: Tensor | None
    ) -> ClipDecision:
        for p in params:
            if p.grad is not None and p.grad.is_sparse and not p.grad.is_coalesced():
                p.grad = p.grad.coalesce()
        grads = [p.grad for p in params]  # type: ignore[misc]
        device = grads[0].device
        # Two fused L2 passes on every step, so that the counters count every step: a clamped value
        # lowers the norm (a max-abs pass instead would be several times slower on CPU).
        pre = total_norm(grads)
        clip_grad_value_(grads, self.max_value)
        post = total_norm(grads)
        finite = torch.isfinite(pre)
        return ClipDecision(
            norm_pre=pre,
            norm_post=post,
            threshold=torch.full((), self.max_value, device=device),
            coef=torch.where(pre > 0, post / pre, torch.ones_like(pre)),
            clipped=(finite & (post < pre)).float(),
            finite=finite,
        )


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

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
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
        norm = _norm_of(grads, norm)
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

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
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
        decision = self.policy.step(_norm_of(grads, norm))
        scale_grads_(grads, decision.coef)
        return decision

    def _extra_state(self) -> dict[str, Any]:
        return {"policy": self.policy.state_dict()}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state.get("policy", {}))


class AGC(ClippingCallback):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021), fused across parameters.

    Not under sharded strategies yet: setup raises a clear error there.

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

    __doc__ = (__doc__ or "") + _LOG_TABLE.format(
        threshold="``clip_factor``",
        coef="``norm_post / norm_pre``",
        clipped="fraction of the units (rows, output channels) that were clipped",
    )

    supports_dtensor = False

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
        return agc_decision(g_norm, scale, clip, self.clip_factor)

    def _extra_state(self) -> dict[str, Any]:
        return {"excluded_names": list(self.excluded_names or [])} if self.excluded_names is not None else {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "excluded_names" in state:
            self.excluded_names = list(state["excluded_names"])
            self._cache_plan = None
