"""Loss-spike detection on the device: running loss statistics and a spike test against them.

:class:`LossSpikeDetector` is the rule of Lightning's ``SpikeDetection`` and of the loss-spike checks of
OLMo and Megatron-DeepSpeed, kept in device tensors: ``observe(loss)`` returns a 0-d bool tensor and
reads nothing on the host. Plain PyTorch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from stability_callbacks._checks import check_choice, check_int, check_number

__all__ = ["LossSpikeDetector"]

_MODES = ("zscore", "ratio")
_DEFAULT_THRESHOLD = {"zscore": 6.0, "ratio": 3.0}


class LossSpikeDetector:
    """Running statistics of the training loss on the device, and a spike test against them.

    ``mode="zscore"``: the mean and variance are exact (Welford) over the first ``warmup`` losses, then
    exponential moving averages with weight ``alpha`` on the past; a loss is a spike when
    ``(loss - mean) / max(std, rel_std_floor * |mean|) > threshold`` (only rises count).
    ``mode="ratio"``: the median of the last ``window`` accepted losses; a spike is
    ``loss > threshold * median``. In both modes a spike must also rise more than ``atol`` above the
    mean (the median), so that a loss near zero does not turn harmless absolute wiggles into spikes.

    A non-finite loss is always a spike, also during warm-up; no spike is judged before ``warmup``
    losses were accepted; a spike never enters the statistics. Nothing here reads a value to the host.

    Args:
        mode: ``"zscore"`` or ``"ratio"``.
        threshold: z-score (default 6) or ratio to the median (default 3), > 0 (ratio: > 1).
        warmup: accepted losses before the first judgement (>= 2).
        alpha: EMA weight of the past in (0, 1) (``"zscore"``).
        window: losses in the running median (``"ratio"``, >= 1).
        rel_std_floor: floor of the standard deviation relative to ``|mean|`` (>= 0), so a very smooth
            loss curve does not turn small wiggles into spikes (``"zscore"``).
        atol: smallest rise above the mean (the median) that can be a spike (>= 0), in loss units.
    """

    def __init__(
        self,
        mode: str = "zscore",
        threshold: float | None = None,
        warmup: int = 20,
        alpha: float = 0.98,
        window: int = 50,
        rel_std_floor: float = 0.05,
        atol: float = 0.0,
    ) -> None:
        check_choice("mode", mode, _MODES)
        if threshold is None:
            threshold = _DEFAULT_THRESHOLD[mode]
        check_number("threshold", threshold, 1.0 if mode == "ratio" else 0.0, low_open=True)
        check_int("warmup", warmup, 2)
        check_number("alpha", alpha, 0, 1, low_open=True, high_open=True)
        check_int("window", window)
        check_number("rel_std_floor", rel_std_floor, 0)
        check_number("atol", atol, 0)
        self.mode = mode
        self.threshold = float(threshold)
        self.warmup = warmup
        self.alpha = float(alpha)
        self.window = window
        self.rel_std_floor = float(rel_std_floor)
        self.atol = float(atol)
        self.count: Tensor | None = None  # accepted losses (float64, device)
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.history: Tensor | None = None  # ratio mode: ring of accepted losses, NaN = empty

    def _ensure(self, device: torch.device) -> None:
        if self.count is None or self.mean is None or self.var is None or self.history is None:
            self.count = torch.zeros((), dtype=torch.float64, device=device)
            self.mean = torch.zeros((), dtype=torch.float64, device=device)
            self.var = torch.zeros((), dtype=torch.float64, device=device)
            self.history = torch.full((self.window,), float("nan"), dtype=torch.float64, device=device)
        elif self.count.device != device:
            self.count, self.mean = self.count.to(device), self.mean.to(device)
            self.var, self.history = self.var.to(device), self.history.to(device)

    def observe(self, loss: Tensor) -> Tensor:
        """Judge ``loss`` (a scalar tensor) against the statistics, then add it unless it is a spike.

        Returns a 0-d bool tensor on the loss's device: ``True`` for a spike or a non-finite loss.
        """
        x = loss.detach().reshape(()).to(torch.float64)
        self._ensure(x.device)
        assert self.count is not None and self.mean is not None and self.var is not None
        assert self.history is not None
        finite = torch.isfinite(x)
        ready = self.count >= self.warmup
        xs = torch.where(finite, x, self.mean)  # a finite stand-in keeps NaN out of the arithmetic
        if self.mode == "zscore":
            std = torch.maximum(self.var.clamp_min(0).sqrt(), self.rel_std_floor * self.mean.abs())
            high = (xs - self.mean) > torch.clamp_min(self.threshold * std, self.atol)
        else:
            median = torch.nanmedian(self.history)
            high = (xs > self.threshold * median) & (xs - median > self.atol)
        spike = ~finite | (ready & high)
        accept = ~spike
        # statistics update, masked by `accept`
        n1 = self.count + 1
        delta = xs - self.mean
        if self.mode == "zscore":
            warm = self.count < self.warmup
            mean_w = self.mean + delta / n1
            var_w = (self.count * self.var + delta * (xs - mean_w)) / n1
            mean_e = self.mean + (1 - self.alpha) * delta
            var_e = self.alpha * (self.var + (1 - self.alpha) * delta * delta)
            new_mean = torch.where(warm, mean_w, mean_e)
            new_var = torch.where(warm, var_w, var_e)
            self.mean.copy_(torch.where(accept, new_mean, self.mean))
            self.var.copy_(torch.where(accept, new_var, self.var))
        else:
            slot = torch.remainder(self.count, self.window).long()
            onehot = torch.arange(self.window, device=x.device) == slot
            updated = torch.where(onehot, xs, self.history)
            self.history.copy_(torch.where(accept, updated, self.history))
            self.mean.copy_(torch.where(accept, self.mean + delta / n1, self.mean))
        self.count.add_(accept.to(torch.float64))
        return spike

    def reset(self) -> None:
        """Forget the statistics (warm-up starts again)."""
        self.count = self.mean = self.var = self.history = None

    def state_dict(self) -> dict[str, Any]:
        """Statistics as CPU tensors (empty before the first loss)."""
        if self.count is None:
            return {}
        return {
            "count": self.count.detach().cpu().clone(),
            "mean": self.mean.detach().cpu().clone(),  # type: ignore[union-attr]
            "var": self.var.detach().cpu().clone(),  # type: ignore[union-attr]
            "history": self.history.detach().cpu().clone(),  # type: ignore[union-attr]
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; an empty or mismatched state is a fresh start."""
        history = state.get("history")
        if not state or not isinstance(history, Tensor) or history.numel() != self.window:
            self.reset()
            return
        device = self.count.device if self.count is not None else torch.device("cpu")
        self.count = torch.as_tensor(state["count"], dtype=torch.float64).to(device).clone()
        self.mean = torch.as_tensor(state["mean"], dtype=torch.float64).to(device).clone()
        self.var = torch.as_tensor(state["var"], dtype=torch.float64).to(device).clone()
        self.history = history.to(device, torch.float64).clone()


# ----------------------------------------------------------------------------------------------------
