"""Adaptive clipping thresholds: AutoClip's percentile and ZClip's z-score, with state on the device.

- :class:`PercentilePolicy`: the AutoClip threshold of Seetharaman, Wichern, Pardo and Le Roux,
  "AutoClip: Adaptive Gradient Clipping for Source Separation Networks", 2020 (arXiv:2007.14469): a
  percentile of the past total norms, kept in a bounded ring buffer.
- :class:`ZScorePolicy`: the ZClip threshold of Kumar, Owen, Ashkboos and others, "ZClip: Adaptive
  Spike Mitigation for LLM Pre-Training", 2025 (arXiv:2504.02507): z-score of the total norm against an
  exponential moving mean and variance, after a warm-up.

Every policy keeps its state in device tensors and updates it with ``torch.where``: a non-finite norm
never enters a statistic, and nothing reads a value back to the host. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from stability_callbacks._checks import check_bool, check_choice, check_int, check_number
from stability_callbacks.clip_functions import CLIP_EPS, ClipDecision
from stability_callbacks.stats import wide_dtype

__all__ = ["PercentilePolicy", "ZScorePolicy"]


class PercentilePolicy:
    """AutoClip threshold: the ``percentile``-th percentile of the last ``history`` finite total norms.

    ``step(norm)`` returns the threshold for this step and records ``norm`` (if finite). With
    ``include_current=True`` (the paper's rule) the current norm is recorded first and takes part in the
    percentile; with ``False`` the threshold comes from past norms only and is ``inf`` on the first step,
    the behaviour of ``autoclip``'s ``QuantileClip(global_threshold=True)``. The percentile uses linear
    interpolation, exactly as ``torch.quantile``.

    Args:
        percentile: in ``[0, 100]``.
        history: the ring buffer's length (a positive int).
        include_current: whether the current norm takes part in its own threshold.
    """

    def __init__(self, percentile: float = 10.0, history: int = 1000, include_current: bool = True) -> None:
        check_number("percentile", percentile, 0, 100)
        check_int("history", history)
        check_bool("include_current", include_current)
        self.percentile = float(percentile)
        self.history = history
        self.include_current = bool(include_current)
        self.buffer: Tensor | None = None
        self.count: Tensor | None = None
        self._arange: Tensor | None = None

    def _ensure(self, device: torch.device) -> None:
        if self.buffer is None or self.count is None:
            self.buffer = torch.zeros(self.history, dtype=torch.float32, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
        elif self.buffer.device != device:
            self.buffer, self.count = self.buffer.to(device), self.count.to(device)
        if self._arange is None or self._arange.device != device:
            self._arange = torch.arange(self.history, device=device)

    def _record(self, x: Tensor, finite: Tensor) -> None:
        assert self.buffer is not None and self.count is not None
        pos = (self.count % self.history).view(1)
        old = self.buffer.gather(0, pos)
        self.buffer.scatter_(0, pos, torch.where(finite, x, old.view(())).view(1))
        self.count += finite.long()

    def _threshold(self) -> Tensor:
        assert self.buffer is not None and self.count is not None and self._arange is not None
        n = self.count.clamp(max=self.history)
        values = torch.where(self._arange < n, self.buffer, torch.full_like(self.buffer, math.inf))
        ordered = torch.sort(values).values
        q = torch.full((), self.percentile / 100.0, dtype=torch.float32, device=values.device)
        ranks = q * (n - 1).clamp(min=0).float()
        below = ranks.long()
        above = ranks.ceil().long()
        lo = ordered.gather(0, below.view(1)).view(())
        hi = ordered.gather(0, above.view(1)).view(())
        value = lo.lerp(hi, ranks - below)
        return torch.where(n > 0, value, torch.full_like(value, math.inf))

    def step(self, norm: Tensor) -> Tensor:
        """Threshold for a step whose total norm is ``norm`` (0-d float32 tensor); records ``norm``."""
        x = norm.detach().float().reshape(())
        self._ensure(x.device)
        finite = torch.isfinite(x)
        if self.include_current:
            self._record(x, finite)
            return self._threshold()
        threshold = self._threshold()
        self._record(x, finite)
        return threshold

    def state_dict(self) -> dict[str, Any]:
        """Ring buffer (a list of floats) and count (an int); empty before the first step."""
        if self.buffer is None or self.count is None:
            return {}
        return {"buffer": self.buffer.detach().cpu().tolist(), "count": int(self.count.detach().cpu())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a buffer of another length keeps its most recent entries (missing state: fresh start)."""
        if "buffer" not in state:
            self.buffer = self.count = None
            return
        buffer = torch.as_tensor(state["buffer"], dtype=torch.float32).reshape(-1)
        count = torch.as_tensor(state["count"], dtype=torch.int64).reshape(())
        if buffer.numel() != self.history:  # re-lay the saved entries, oldest first, into a new ring
            n = int(min(int(count), buffer.numel()))
            start = int(count) % buffer.numel() if int(count) > buffer.numel() else 0
            ordered = torch.cat([buffer[start:], buffer[:start]])[:n][-self.history :]
            buffer = torch.zeros(self.history)
            buffer[: ordered.numel()] = ordered
            count = torch.tensor(ordered.numel(), dtype=torch.int64)
        self.buffer, self.count = buffer.clone(), count.clone()


class ZScorePolicy:
    """ZClip threshold: z-score of the total norm against an EMA mean and variance, after a warm-up.

    Makes the decisions of the ``zclip`` package (1.0.0) on the same norms, except that a non-finite
    norm is ignored (no clipping, no statistics) instead of poisoning the statistics:

    - warm-up: the first ``warmup_steps`` finite norms are collected; the EMA starts from their mean and
      (population) variance. During warm-up only ``max_grad_norm`` clips, like ``clip_grad_norm_``.
    - ``mode="zscore"``: ``z = (norm - mean) / (std + eps)``; when ``z > z_thresh`` the clip value is
      ``(mean + z_thresh * std / (z / z_thresh)) * clip_factor`` (``clip_option="adaptive_scaling"``) or
      ``mean`` (``clip_option="mean"``).
    - ``mode="percentile"``: the clip value is ``mean + z_thresh * std`` whenever the norm exceeds it.
    - the clip value is capped by ``max_grad_norm``; the gradients are scaled by
      ``value / (norm + 1e-6)`` when ``norm > value``.
    - the EMA is updated with the clip value on a spike (skipped when ``skip_update_on_spike``) and
      with the norm otherwise: ``mean = a*mean + (1-a)*x``, ``var = a*var + (1-a)*(x - mean)**2``.

    Args:
        alpha: EMA smoothing in (0, 1).
        z_thresh: the z-score threshold (> 0).
        max_grad_norm: an absolute cap on the norm, or ``None``.
        warmup_steps: finite norms collected before the EMA starts (>= 1).
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (mode ``"zscore"`` only).
        clip_factor: multiplier of the adaptive threshold (> 0).
        skip_update_on_spike: keep a spike out of the EMA.
        eps: added to the standard deviation in the z-score.
    """

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
    ) -> None:
        check_number("alpha", alpha, 0, 1, low_open=True, high_open=True)
        check_number("z_thresh", z_thresh, 0, low_open=True)
        check_number("max_grad_norm", max_grad_norm, 0, low_open=True, allow_none=True)
        check_int("warmup_steps", warmup_steps)
        check_choice("mode", mode.lower() if isinstance(mode, str) else mode, ("zscore", "percentile"))
        clip_option_ = clip_option.lower() if isinstance(clip_option, str) else clip_option
        check_choice("clip_option", clip_option_, ("adaptive_scaling", "mean"))
        check_number("clip_factor", clip_factor, 0, low_open=True)
        check_bool("skip_update_on_spike", skip_update_on_spike)
        check_number("eps", eps, 0)
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.warmup_steps = warmup_steps
        self.mode = mode.lower()
        self.clip_option = clip_option.lower()
        self.clip_factor = float(clip_factor)
        self.skip_update_on_spike = bool(skip_update_on_spike)
        self.eps = float(eps)
        self.buffer: Tensor | None = None
        self.count: Tensor | None = None
        self.mean: Tensor | None = None
        self.var: Tensor | None = None

    _KEYS = ("buffer", "count", "mean", "var")

    def _ensure(self, device: torch.device) -> None:
        if self.buffer is None:
            dtype = wide_dtype(device)
            self.buffer = torch.zeros(self.warmup_steps, dtype=dtype, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
            self.mean = torch.zeros((), dtype=dtype, device=device)
            self.var = torch.zeros((), dtype=dtype, device=device)
        elif self.buffer.device != device:  # restored from a checkpoint
            for key in self._KEYS:
                t = getattr(self, key)
                setattr(self, key, t.to(device) if key == "count" else t.to(device, wide_dtype(device)))

    def step(self, norm: Tensor) -> ClipDecision:
        """Decide the clipping of a step whose total norm is ``norm`` and update the statistics.

        Returns a :class:`ClipDecision` whose ``coef`` is the factor to apply to the gradients
        (``norm_post`` = ``norm_pre * coef``; ``threshold`` = the norm above which this step clips).
        """
        norm32 = norm.detach().float().reshape(())
        self._ensure(norm32.device)
        assert self.buffer is not None and self.count is not None
        assert self.mean is not None and self.var is not None
        dtype = self.buffer.dtype
        x = norm32.to(dtype)
        finite = torch.isfinite(x)
        xs = torch.where(finite, x, torch.zeros_like(x))
        one = torch.ones_like(xs)
        active = self.count >= self.warmup_steps  # the EMA is initialised

        # Warm-up: collect the norm; initialise the EMA when the buffer is full.
        record = ~active & finite
        pos = self.count.clamp(max=self.warmup_steps - 1).view(1)
        old = self.buffer.gather(0, pos).view(())
        self.buffer.scatter_(0, pos, torch.where(record, xs, old).view(1))
        count = self.count + record.long()
        just_full = record & (count == self.warmup_steps)
        init_mean = self.buffer.sum() / self.warmup_steps
        init_var = (self.buffer - init_mean).square().sum() / self.warmup_steps

        # Active: spike detection against the statistics before this step.
        std = self.var.sqrt()
        if self.mode == "percentile":
            spike_level = self.mean + self.z_thresh * std
            spike = xs > spike_level
            clip_value = spike_level
        else:
            z = (xs - self.mean) / (std + self.eps)
            spike_level = self.mean + self.z_thresh * (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                eta = z / self.z_thresh
                clip_value = (self.mean + (self.z_thresh * std) / eta) * self.clip_factor
            else:
                clip_value = self.mean
        adaptive = torch.where(spike, clip_value, xs)
        effective = adaptive if self.max_grad_norm is None else adaptive.clamp(max=self.max_grad_norm)
        over = xs > effective
        coef_active = torch.where(over, effective / (xs + CLIP_EPS), one)
        level = spike_level if self.max_grad_norm is None else spike_level.clamp(max=self.max_grad_norm)

        # EMA update.
        value = torch.where(spike, clip_value, xs)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * value
        new_var = self.alpha * self.var + (1 - self.alpha) * (value - new_mean).square()
        update = active & finite
        if self.skip_update_on_spike:
            update = update & ~spike
        self.mean = torch.where(just_full, init_mean, torch.where(update, new_mean, self.mean))
        self.var = torch.where(just_full, init_var, torch.where(update, new_var, self.var))
        self.count = count

        # Warm-up clipping: only the cap, with clip_grad_norm_'s clamped coefficient.
        if self.max_grad_norm is None:
            coef_warm, level_warm, over_warm = one, torch.full_like(xs, math.inf), torch.zeros_like(finite)
        else:
            coef_warm = torch.clamp(self.max_grad_norm / (xs + CLIP_EPS), max=1.0)
            level_warm = torch.full_like(xs, self.max_grad_norm)
            over_warm = xs > self.max_grad_norm
        coef = torch.where(finite, torch.where(active, coef_active, coef_warm), one).float()
        threshold = torch.where(active, level, level_warm).float()
        clipped = finite & torch.where(active, over, over_warm)
        return ClipDecision(
            norm_pre=norm32,
            norm_post=norm32 * coef,
            threshold=threshold,
            coef=coef,
            clipped=clipped.float(),
            finite=finite,
        )

    def state_dict(self) -> dict[str, Any]:
        """Warm-up buffer, count, EMA mean and variance as plain numbers; empty before the first step."""
        if self.buffer is None:
            return {}
        return {key: getattr(self, key).detach().cpu().tolist() for key in self._KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the statistics (missing state: fresh start)."""
        if not all(key in state for key in self._KEYS) or len(state["buffer"]) != self.warmup_steps:
            self.buffer = self.count = self.mean = self.var = None
            return
        wide = torch.float64
        self.buffer = torch.tensor(state["buffer"], dtype=wide)
        self.count = torch.tensor(int(state["count"]), dtype=torch.int64)
        self.mean = torch.tensor(float(state["mean"]), dtype=wide)
        self.var = torch.tensor(float(state["var"]), dtype=wide)
